"""Export an Orbax checkpoint (from hf_to_flax.py or training) as a Hugging Face Qwen3 directory.

    python convert/flax_to_hf.py --ckpt CKPT --out HF [--dtype bfloat16|float32] [--max-shard-size 5GB] [--overwrite]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint directory (params/ + config.json)")
    parser.add_argument("--out", required=True, type=Path, help="HF directory to create")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="dtype of the written weights")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)

    from abscot_jax.checkpoint import export_checkpoint_to_hf

    export_checkpoint_to_hf(args.ckpt, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                            overwrite=args.overwrite)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from abscot_jax.checkpoint import run_cli

    sys.exit(run_cli(main))
