"""Convert a Hugging Face Qwen3 directory into an Orbax checkpoint (params + config + tokenizer).

    python convert/hf_to_flax.py --hf-dir HF --out CKPT [--param-dtype float32|bfloat16] [--overwrite]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", required=True, type=Path, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint directory to create")
    parser.add_argument("--param-dtype", default=None, choices=["float32", "bfloat16"],
                        help="dtype of the stored parameters (default: the weights' own, so nothing is "
                             "rounded; float32: master weights for full fine-tuning)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)

    from abscot_jax.checkpoint import convert_hf_to_checkpoint

    convert_hf_to_checkpoint(args.hf_dir, args.out, param_dtype=args.param_dtype, overwrite=args.overwrite)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from abscot_jax.checkpoint import run_cli

    sys.exit(run_cli(main))
