"""Hugging Face directories <-> Qwen3 NNX model, streamed one tensor at a time.

Loading builds the model abstractly (no random init is materialised) and fills each stacked
parameter straight into its target sharding, each device's shard read from just the HF rows it
needs, so host memory holds about one parameter shard at a time. Saving writes each
safetensors header from the shapes alone and then streams the tensors into the file one by
one, so host memory holds about one parameter (the stacked array being split) at a time.
Our parameter names map to HF's in `abscot_jax.model.hf_names`; the file format is read and
written in `safetensors_io`.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from abscot_jax.checkpoint.safetensors_io import INDEX_FILE, SafetensorsDir, write_safetensors
from abscot_jax.errors import CheckpointError
from abscot_jax.files import temporary_sibling
from abscot_jax.model.config import DTYPES, Qwen3Config
from abscot_jax.model.hf_names import HF_GLOBAL_NAMES, HF_LAYER_NAMES, TRANSPOSED, HFSpec, hf_tensor_specs
from abscot_jax.model.qwen3 import Qwen3


# Files that travel with the weights: tokenizer, chat template, generation defaults.
COMPANION_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)

Shardings = jax.sharding.Sharding | Mapping[str, jax.sharding.Sharding] | Callable[[str], jax.sharding.Sharding] | None


# ---- model skeleton ---------------------------------------------------------------------------
def resolve_sharding(shardings: Shardings, name: str) -> jax.sharding.Sharding:
    """The target sharding of parameter `name`; default: the first device."""
    if shardings is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        return shardings
    if isinstance(shardings, Mapping):
        return shardings[name]
    return shardings(name)


def abstract_model(cfg: Qwen3Config):
    """(graphdef, abstract state) of a Qwen3: shapes and metadata only, no arrays allocated."""
    return nnx.split(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0))))


def assemble(graphdef, abstract_state, arrays: Mapping[str, jax.Array]) -> Qwen3:
    nnx.replace_by_pure_dict(abstract_state, dict(arrays))
    return nnx.merge(graphdef, abstract_state)


# ---- reading ----------------------------------------------------------------------------------
def _shard_shape(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))


def read_param(reader: SafetensorsDir, name: str, shape: tuple[int, ...], dtype, index=None,
               out: np.ndarray | None = None) -> np.ndarray:
    """Our parameter `name` (or the block `index` of it) on the host, built from the HF tensors
    (into `out` if given)."""
    index = tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ()))
    if out is None:
        out = np.empty(_shard_shape(index, shape), np.dtype(dtype))
    transposed = name in TRANSPOSED
    if name in HF_GLOBAL_NAMES:
        reader.copy_into(out, HF_GLOBAL_NAMES[name], index, transposed)
    else:  # stacked [layers, ...]: one HF tensor per layer
        for j, layer in enumerate(range(*index[0].indices(shape[0]))):
            reader.copy_into(out[j], HF_LAYER_NAMES[name].format(layer), index[1:], transposed)
    return out


def open_hf_dir(hf_dir: str | Path, **config_fields) -> tuple[Qwen3Config, SafetensorsDir]:
    """The config and tensors of an HF directory, checked against each other before any data is read."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise CheckpointError(f"{hf_dir} is not a directory; pass the Hugging Face model directory")
    cfg = Qwen3Config.from_hf_dir(hf_dir, **config_fields)
    reader = SafetensorsDir(hf_dir)
    reader.check(cfg)
    return cfg, reader


def load_hf(hf_dir: str | Path, *, param_dtype: str = "float32", compute_dtype: str | None = None,
            shardings: Shardings = None, **config_overrides) -> Qwen3:
    """A Qwen3 model from an HF directory (config.json + safetensors), each parameter placed
    straight into `shardings` (a Sharding, a mapping or a callable from parameter name)."""
    cfg, reader = open_hf_dir(hf_dir, param_dtype=param_dtype, compute_dtype=compute_dtype or param_dtype,
                              **config_overrides)
    graphdef, state = abstract_model(cfg)
    arrays = {
        name: jax.make_array_from_callback(
            leaf.shape, resolve_sharding(shardings, name),
            lambda index, name=name, leaf=leaf: read_param(reader, name, leaf.shape, leaf.dtype, index),
        )
        for name, leaf in state.to_pure_dict().items()
    }
    return assemble(graphdef, state, arrays)


# ---- writing ----------------------------------------------------------------------------------
def ensure_new_dir(out_dir: str | Path, overwrite: bool = False) -> None:
    if Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"output directory {out_dir} already exists; remove it or pass --overwrite")


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes `out_dir` only if the block succeeds."""
    ensure_new_dir(out_dir, overwrite)
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():  # overwrite: swap, then delete the old one
            old = tmp.with_name(tmp.name + "-old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_size(size: str | int) -> int:
    """'5GB' -> 5e9 bytes (KB/MB/GB decimal, KiB/MiB/GiB binary, as transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise CheckpointError(f"max shard size {size!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[(m.group(2) or "B").upper()]
    return int(float(m.group(1)) * scale)


@jax.jit
def _layer_of(stacked: jax.Array, layer) -> jax.Array:
    # A traced index compiles once per parameter shape; `stacked[3]` would compile once per layer.
    return jax.lax.dynamic_index_in_dim(stacked, layer, keepdims=False)


def hf_tensors(cfg: Qwen3Config,
               get_param: Callable[[str], jax.Array | np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """(hf_name, host array in HF layout, maybe a strided view) in `hf_tensor_specs` order.
    `get_param(name)` is called once per parameter, so a lazy source holds one at a time."""
    def split(name, group):
        value = get_param(name)
        for hf_name, _, layer, _ in group:
            part = value
            if layer is not None:  # numpy: a view; a device array: only this layer moves to the host
                part = value[layer] if isinstance(value, np.ndarray) else _layer_of(value, layer)
            part = np.asarray(jax.device_get(part))
            yield hf_name, part.T if name in TRANSPOSED else part  # a view: the writer copies it in bands

    for name, group in itertools.groupby(hf_tensor_specs(cfg), key=lambda spec: spec[1]):
        yield from split(name, group)  # its locals (the whole parameter) are gone before the next one


def iter_hf_tensors(model: Qwen3) -> Iterator[tuple[str, np.ndarray]]:
    """The model's tensors in HF names and layout, one at a time (param dtype).

    The seam for LoRA: a merge wraps this iterator and adds its delta to each projection."""
    cfg = model.config.replace(vocab_size=model.embed.shape[0])
    return hf_tensors(cfg, lambda name: getattr(model, name)[...])


def _plan_shards(specs: list[HFSpec], itemsize: int, max_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split of the tensors into files of at most `max_bytes` (a larger tensor stands alone)."""
    shards, size = [[]], 0
    for hf_name, _, _, shape in specs:
        nbytes = int(np.prod(shape)) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((hf_name, shape))
        size += nbytes
    return shards


def hf_config_dict(cfg: Qwen3Config, base: dict | None, dtype: str) -> dict:
    out = cfg.to_hf_dict(base=base, torch_dtype=dtype)
    out["dtype"] = dtype  # transformers >= 5 reads `dtype`; older readers (and vLLM) `torch_dtype`
    return out


def copy_companions(src_dir: str | Path, dst_dir: Path) -> None:
    for name in COMPANION_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copy2(Path(src_dir) / name, dst_dir / name)


def write_hf_dir(cfg: Qwen3Config, tensors: Iterable[tuple[str, np.ndarray]], out_dir: str | Path, *,
                 dtype: str = "bfloat16", max_shard_size: str | int = "5GB", base_config: dict | None = None,
                 tokenizer_dir: str | Path | None = None, tokenizer=None, overwrite: bool = False) -> Path:
    """An HF directory from a stream of tensors in `hf_tensor_specs(cfg)` order: sharded
    safetensors + index, config.json, generation_config.json, tokenizer files."""
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    out_dtype = np.dtype(DTYPES[dtype])
    shards = _plan_shards(hf_tensor_specs(cfg), out_dtype.itemsize, parse_size(max_shard_size))
    stream = iter(tensors)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        weight_map, total = {}, 0
        for k, layout in enumerate(shards, 1):
            file_name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(tmp / file_name, layout, stream, out_dtype)
            for hf_name, shape in layout:
                weight_map[hf_name] = file_name
                total += int(np.prod(shape)) * out_dtype.itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        config = hf_config_dict(cfg, base_config, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_dir is not None:
            copy_companions(tokenizer_dir, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if not (tmp / "generation_config.json").is_file():
            ids = ("bos_token_id", "eos_token_id", "pad_token_id")
            generation = {k: config[k] for k in ids if config.get(k) is not None}
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return Path(out_dir)


def save_hf(model: Qwen3, out_dir: str | Path, *, tokenizer_dir: str | Path | None = None, tokenizer=None,
            dtype: str = "bfloat16", max_shard_size: str | int = "5GB", base_config: dict | None = None,
            overwrite: bool = False, tensors: Iterable[tuple[str, np.ndarray]] | None = None) -> Path:
    """Write `model` as an HF directory (see `write_hf_dir`); the tokenizer comes from
    `tokenizer_dir` or a `tokenizer` object, `base_config` keeps config fields we do not model.

    `tensors` replaces `iter_hf_tensors(model)` (same names and shapes, e.g. with LoRA merged)."""
    cfg = model.config.replace(vocab_size=model.embed.shape[0])  # config.json in step with the embedding
    return write_hf_dir(cfg, iter_hf_tensors(model) if tensors is None else tensors, out_dir, dtype=dtype,
                        max_shard_size=max_shard_size, base_config=base_config, tokenizer_dir=tokenizer_dir,
                        tokenizer=tokenizer, overwrite=overwrite)
