"""HF safetensors <-> JAX parameters (streaming), Orbax save/restore, and the conversion CLIs' error rule."""
from __future__ import annotations

import sys

from abscot_jax.checkpoint.hf import CheckpointError, iter_hf_tensors, load_hf, save_hf
from abscot_jax.checkpoint.orbax_io import (
    convert_hf_to_checkpoint, export_checkpoint_to_hf, load_checkpoint, save_checkpoint,
)
from abscot_jax.model.config import ConfigError

# Mistakes a user can fix (bad path, wrong files, existing output): one line, no traceback.
USER_ERRORS = (CheckpointError, ConfigError, FileNotFoundError, FileExistsError)


def run_cli(main, argv=None) -> int:
    """Run a command-line `main(argv)`; user errors print `error: ...` on stderr and exit 2."""
    try:
        main(argv)
    except USER_ERRORS as e:
        message = " ".join(str(e).split())  # always one line
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "CheckpointError", "ConfigError", "USER_ERRORS", "convert_hf_to_checkpoint", "export_checkpoint_to_hf",
    "iter_hf_tensors", "load_checkpoint", "load_hf",
    "run_cli", "save_checkpoint", "save_hf",
]
