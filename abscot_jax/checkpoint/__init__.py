"""HF safetensors <-> JAX parameters (streaming) and Orbax save/restore."""
from __future__ import annotations

from abscot_jax.checkpoint.hf import iter_hf_tensors, load_hf, save_hf
from abscot_jax.checkpoint.orbax_io import (
    convert_hf_to_checkpoint, export_checkpoint_to_hf, load_checkpoint, save_checkpoint,
)

__all__ = [
    "convert_hf_to_checkpoint", "export_checkpoint_to_hf", "iter_hf_tensors", "load_checkpoint", "load_hf",
    "save_checkpoint", "save_hf",
]
