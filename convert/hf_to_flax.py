"""Convert a Hugging Face Qwen3 directory into an Orbax checkpoint (params + config + tokenizer).

    python convert/hf_to_flax.py --hf-dir HF --out CKPT [--param-dtype float32|bfloat16] [--overwrite]

The pipeline reads HF directories itself; the Orbax copy is for JAX code of your own:
`abscot_jax.checkpoint.load_checkpoint(CKPT, shardings)` restores each parameter straight into
its sharding, and convert/flax_to_hf.py writes it back as HF.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


def weights_bytes(hf_config: dict, dtype: str) -> int:
    """Bytes of the model's weights in `dtype`: what a conversion writes, for its progress."""
    import numpy as np

    from abscot_jax.model.config import DTYPES, Qwen3Config
    from abscot_jax.model.hf_names import hf_tensor_specs

    specs = hf_tensor_specs(Qwen3Config.from_hf_dict(hf_config))
    return sum(math.prod(s.shape) for s in specs) * np.dtype(DTYPES[dtype]).itemsize


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
    from abscot_jax.checkpoint.orbax_io import read_hf_config, weights_dtype
    from abscot_jax.progress import writing

    try:  # the size to expect, for the ETA; a directory that cannot say fails in the conversion below
        total = weights_bytes(read_hf_config(args.hf_dir), args.param_dtype or weights_dtype(args.hf_dir))
    except (ValueError, OSError):
        total = None
    with writing("hf_to_flax", args.out, total):
        convert_hf_to_checkpoint(args.hf_dir, args.out, param_dtype=args.param_dtype, overwrite=args.overwrite)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from abscot_jax.errors import run_cli

    sys.exit(run_cli(main, interrupt_line=True))
