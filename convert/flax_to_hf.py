"""Export a checkpoint (from hf_to_flax.py, or a training phase) as a Hugging Face Qwen3 directory.

    python convert/flax_to_hf.py --ckpt CKPT --out HF [--merge-lora] [--base-dir BASE]
                                 [--dtype bfloat16|float32] [--max-shard-size 5GB] [--overwrite]

Weights are written in the checkpoint's own dtype unless --dtype says otherwise.

CKPT is a checkpoint from convert/hf_to_flax.py, or a training phase: its directory (RUN/round_1/phase_a,
the latest step) or one step of it (RUN/round_1/phase_a/checkpoints/40); the last line names the
step exported. A LoRA phase holds only the adapters and new-token rows: --merge-lora folds them into
the base model the phase started from (recorded in the phase's phase.json; --base-dir replaces it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, type=Path,
                        help="checkpoint directory (params/ + config.json), or a training phase directory or step")
    parser.add_argument("--out", required=True, type=Path, help="HF directory to create")
    parser.add_argument("--merge-lora", action="store_true",
                        help="LoRA training checkpoint: merge the adapters into the base weights (required there)")
    parser.add_argument("--base-dir", type=Path, default=None,
                        help="training checkpoint: the base model's HF directory, instead of the one in phase.json")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                        help="dtype of the written weights (default: the checkpoint's, so nothing is rounded)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)

    from abscot_jax.checkpoint import export_checkpoint_to_hf
    from abscot_jax.checkpoint.orbax_io import read_hf_config
    from abscot_jax.checkpoint.training import CHECKPOINTS, export_phase_checkpoint, find_phase_checkpoint, read_phase_meta
    from abscot_jax.errors import CheckpointError
    from abscot_jax.progress import writing
    from hf_to_flax import weights_bytes  # (this directory is the script's first path entry)

    options = dict(dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    phase = find_phase_checkpoint(args.ckpt)
    if phase is None and args.base_dir is not None:
        raise CheckpointError(f"--base-dir is for training-phase checkpoints; {args.ckpt} is not one "
                              "(a converted checkpoint carries all its weights): drop --base-dir")
    try:  # the size to expect, for the ETA; a checkpoint that cannot say fails in the export below
        meta = read_phase_meta(phase[0]) if phase else None
        config = meta["config"] if meta else read_hf_config(args.ckpt)
        total = weights_bytes(config, args.dtype or (meta["param_dtype"] if meta else config.get("dtype", "float32")))
    except (ValueError, OSError, KeyError):
        total = None
    with writing("flax_to_hf", args.out, total):
        if phase is not None:
            export_phase_checkpoint(*phase, args.out, merge_lora=args.merge_lora, base_dir=args.base_dir, **options)
        else:  # a converted checkpoint has no adapters: --merge-lora has nothing to do
            export_checkpoint_to_hf(args.ckpt, args.out, **options)
    if phase is None:
        print(f"wrote {args.out}")
        return
    phase_dir, step_dir = phase
    steps = sorted(int(p.name) for p in (phase_dir / CHECKPOINTS).iterdir() if p.name.isdigit())
    which = "its latest" if int(step_dir.name) == steps[-1] else "not its latest"
    print(f"wrote {args.out} from step {step_dir.name} of {phase_dir} ({which}; steps there: "
          f"{', '.join(map(str, steps))})")


if __name__ == "__main__":
    from abscot_jax.errors import run_cli

    sys.exit(run_cli(main, interrupt_line=True))
