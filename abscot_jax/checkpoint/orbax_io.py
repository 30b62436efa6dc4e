"""Orbax checkpoints of a Qwen3 model: `params/` (an Orbax PyTree checkpoint of the model's
parameters as a flat dict, `nnx.state(model, nnx.Param).to_pure_dict()`), `config.json` (HF form)
and the tokenizer files beside it, so a directory is self-describing and exports back to HF alone.

The parameters are written one at a time (Orbax's partial save) and the conversions read them one
at a time (partial load), so converting a checkpoint holds about one parameter in host memory.
Both come from Orbax's v1 API (`orbax.checkpoint.v1`, still marked experimental in 0.12); the
layout on disk is Orbax's ordinary PyTree checkpoint (`params/state/`).
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from orbax.checkpoint import v1 as ocp

from abscot_jax.checkpoint.hf import (
    Shardings, abstract_model, assemble, atomic_output_dir, copy_companions, ensure_new_dir, hf_config_dict,
    hf_tensors, open_hf_dir, read_param, resolve_sharding, write_hf_dir,
)
from abscot_jax.checkpoint.safetensors_io import SafetensorsDir
from abscot_jax.errors import CheckpointError, ConfigError
from abscot_jax.model.config import DTYPES, Qwen3Config
from abscot_jax.model.qwen3 import Qwen3

PARAMS = "params"


def _orbax_context(partial_load: bool = False) -> ocp.Context:
    ctx = ocp.Context()
    # zstd made saving ~10x slower than the disk on our machine, for ~10% smaller weight files.
    ctx.array.saving.use_compression = False
    # Every save here is synchronous: nothing can change an array while it is written, so no copy.
    ctx.memory_options.deepcopy_host_arrays = False
    ctx.pytree.loading.partial_load = partial_load
    return ctx


def _write_checkpoint(ckpt_dir, params: Iterable[tuple[str, np.ndarray | jax.Array]], cfg: Qwen3Config,
                      hf_config: dict | None, tokenizer_dir, overwrite: bool) -> Path:
    with atomic_output_dir(ckpt_dir, overwrite) as tmp, _orbax_context():
        for name, value in params:
            ocp.partial.save(tmp / PARAMS, {name: value})
            del value  # the next parameter is read only after this one is on disk and released
        ocp.partial.finalize(tmp / PARAMS)
        config = hf_config_dict(cfg, hf_config, cfg.param_dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_dir is not None:
            copy_companions(tokenizer_dir, tmp)
    return Path(ckpt_dir)


def save_checkpoint(model: Qwen3, ckpt_dir: str | Path, tokenizer_dir: str | Path | None = None,
                    hf_config: dict | None = None, *, overwrite: bool = False) -> Path:
    """Write the model's parameters, its HF config (`hf_config` keeps fields we do not model) and
    the tokenizer files of `tokenizer_dir`; the directory appears only when complete."""
    cfg = model.config.replace(vocab_size=model.embed.shape[0])
    params = nnx.state(model, nnx.Param).to_pure_dict()
    return _write_checkpoint(ckpt_dir, params.items(), cfg, hf_config, tokenizer_dir, overwrite)


def weights_dtype(hf_dir: str | Path) -> str:
    """The dtype an HF directory's weights are stored in, as a parameter dtype: bfloat16 for bf16
    weights, float32 for fp32 (and fp16/fp64 ones, which fp32 holds or rounds least)."""
    stored = {dtype for _, _, dtype, _ in SafetensorsDir(hf_dir).tensors.values()}
    return "bfloat16" if stored == {np.dtype(DTYPES["bfloat16"])} else "float32"


def convert_hf_to_checkpoint(hf_dir: str | Path, ckpt_dir: str | Path, *, param_dtype: str | None = None,
                             overwrite: bool = False) -> Path:
    """HF directory -> checkpoint, one parameter in host memory at a time (never the whole model).
    `param_dtype` defaults to the weights' own (`weights_dtype`): nothing is rounded."""
    ensure_new_dir(ckpt_dir, overwrite)  # fail before the slow part
    param_dtype = param_dtype or weights_dtype(hf_dir)
    cfg, reader = open_hf_dir(hf_dir, param_dtype=param_dtype, compute_dtype=param_dtype)
    leaves = abstract_model(cfg)[1].to_pure_dict()
    # One host buffer, reused for every parameter (each is on disk before the next is read):
    # fresh memory costs a page fault per page, which dominates on some VMs.
    buffer = np.empty(max(leaf.size * leaf.dtype.itemsize for leaf in leaves.values()), np.uint8)

    def params():
        for name, leaf in leaves.items():
            out = buffer[: leaf.size * leaf.dtype.itemsize].view(leaf.dtype).reshape(leaf.shape)
            yield name, read_param(reader, name, leaf.shape, leaf.dtype, out=out)

    return _write_checkpoint(ckpt_dir, params(), cfg, read_hf_config(hf_dir), hf_dir, overwrite)


def read_hf_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: pass a directory written by convert/hf_to_flax.py or save_pretrained")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); restore it from the source checkpoint") from e


def _open_checkpoint(ckpt_dir: str | Path, overrides: dict) -> tuple[Path, dict, Qwen3Config]:
    ckpt_dir = Path(ckpt_dir).absolute()
    if not (ckpt_dir / PARAMS).is_dir():
        raise CheckpointError(
            f"{ckpt_dir} has no {PARAMS}/ directory and no checkpoints/: neither a checkpoint from "
            "convert/hf_to_flax.py nor a training phase directory; pass one of those"
        )
    hf = read_hf_config(ckpt_dir)
    saved_dtype = hf.get("dtype") or hf.get("torch_dtype")
    overrides.setdefault("param_dtype", saved_dtype if saved_dtype in DTYPES else "float32")
    overrides.setdefault("compute_dtype", overrides["param_dtype"])
    return ckpt_dir, hf, Qwen3Config.from_hf_dict(hf, **overrides)


def _load(ckpt_dir: Path, abstract: dict, partial: bool = False) -> dict:
    try:
        with _orbax_context(partial_load=partial):
            return ocp.load(ckpt_dir / PARAMS, abstract)
    except (ValueError, KeyError, FileNotFoundError) as e:  # Orbax explains mismatches in many lines
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CheckpointError(
            f"{ckpt_dir / PARAMS} does not match {ckpt_dir / 'config.json'} ({first.strip()}); "
            "use the config.json written with these parameters"
        ) from e


def load_checkpoint(ckpt_dir: str | Path, shardings: Shardings = None, **overrides) -> Qwen3:
    """The model saved by `save_checkpoint`, each parameter restored into its target sharding.
    The parameter dtype defaults to the saved one; `overrides` set Qwen3Config fields."""
    ckpt_dir, _, cfg = _open_checkpoint(ckpt_dir, overrides)
    graphdef, state = abstract_model(cfg)
    target = {
        name: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=resolve_sharding(shardings, name))
        for name, leaf in state.to_pure_dict().items()
    }
    return assemble(graphdef, state, _load(ckpt_dir, target))


def export_checkpoint_to_hf(ckpt_dir: str | Path, out_dir: str | Path, *, dtype: str | None = None,
                            max_shard_size: str | int = "5GB", overwrite: bool = False) -> Path:
    """Checkpoint -> HF directory, one parameter in host memory at a time (never the whole model).
    `dtype` defaults to the checkpoint's parameter dtype: nothing is rounded."""
    ensure_new_dir(out_dir, overwrite)
    ckpt_dir, hf, cfg = _open_checkpoint(ckpt_dir, {})
    dtype = dtype or cfg.param_dtype
    _, state = abstract_model(cfg)
    leaves = state.to_pure_dict()

    def get_param(name):  # host numpy: nothing goes through an accelerator
        leaf = leaves[name]
        return _load(ckpt_dir, {name: np.empty(leaf.shape, leaf.dtype)}, partial=True)[name]

    return write_hf_dir(cfg, hf_tensors(cfg, get_param), out_dir, dtype=dtype, max_shard_size=max_shard_size,
                        base_config=hf, tokenizer_dir=ckpt_dir, overwrite=overwrite)
