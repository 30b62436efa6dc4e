"""Hugging Face safetensors <-> Qwen3 NNX model, streamed one tensor at a time.

Loading builds the model abstractly (no random init is materialised) and fills each stacked
parameter straight into its target sharding, each device's shard read from just the HF rows it
needs, so host memory holds about one parameter shard at a time. Saving writes each
safetensors header from the shapes alone and then streams the tensors into the file one by
one, so host memory holds about one parameter (the stacked array being split) at a time.
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import json
import mmap
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from abscot_jax.model.config import DTYPES, Qwen3Config
from abscot_jax.model.hf_names import HF_GLOBAL_NAMES, HF_LAYER_NAMES, TRANSPOSED, HFSpec, hf_tensor_specs
from abscot_jax.model.qwen3 import Qwen3


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file and the fix."""


# Files that travel with the weights: tokenizer, chat template, generation defaults.
COMPANION_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
BAND_BYTES = 1 << 20  # rows read (and written) per step: small enough to stay in cache
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ST_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
             "BF16": np.dtype(DTYPES["bfloat16"])}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}

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


def copy_transposed(dst: np.ndarray, src: np.ndarray, rows: int = 16) -> None:
    """dst[...] = src.T (casting), a band of rows at a time: numpy's whole-matrix strided
    transpose is about 3x slower on large matrices (cache misses)."""
    for i in range(0, src.shape[0], rows):
        dst[:, i:i + rows] = src[i:i + rows].T


# ---- reading ----------------------------------------------------------------------------------
def read_safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype, int]]:
    """name -> (shape, dtype, absolute byte offset); checks the file holds all the data it declares."""
    def corrupt(why):
        return CheckpointError(f"{path} is truncated or corrupt ({why}); re-download or re-copy this file")

    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise corrupt(f"header of {n} bytes in a file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise corrupt(f"unreadable header: {e}") from e
    header.pop("__metadata__", None)
    tensors, data_end = {}, 0
    for name, info in header.items():
        try:
            dtype_name, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise corrupt(f"bad header entry for {name}: {e!r}") from e
        if dtype_name not in ST_DTYPES:
            raise CheckpointError(f"tensor {name} in {path} has dtype {dtype_name}; only {sorted(ST_DTYPES)} load")
        dtype = ST_DTYPES[dtype_name]
        if end - start != int(np.prod(shape)) * dtype.itemsize:
            raise corrupt(f"tensor {name} declares {end - start} bytes for shape {list(shape)}")
        tensors[name] = (shape, dtype, 8 + n + start)
        data_end = max(data_end, end)
    if 8 + n + data_end > size:
        raise corrupt(f"{8 + n + data_end} bytes declared, {size} present")
    return tensors


class SafetensorsDir:
    """The tensors of an HF directory (one file or sharded with an index), read lazily.

    We parse the (simple, documented) safetensors header ourselves to get each tensor's byte
    offset, and read bands of rows with plain reads: `safe_open` memory-maps whole files, whose
    touched pages count as our resident memory while open, and returns a fresh copy of each tensor
    that we would then copy again to transpose it."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as e:
                raise CheckpointError(
                    f"{index} is not a valid safetensors index ({e}); re-download the checkpoint") from e
            for name in files:
                if not (self.dir / name).is_file():
                    raise CheckpointError(
                        f"shard {name} named in {index} is missing; re-download or re-copy the checkpoint")
        elif (self.dir / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise CheckpointError(
                f"no {SINGLE_FILE} or {INDEX_FILE} in {self.dir}; weights load only from safetensors "
                "(re-save the model with save_pretrained(safe_serialization=True))"
            )
        self.tensors: dict[str, tuple[Path, tuple[int, ...], np.dtype, int]] = {}
        for name in files:
            path = self.dir / name
            for key, (shape, dtype, offset) in read_safetensors_header(path).items():
                self.tensors[key] = (path, shape, dtype, offset)

    def check(self, cfg: Qwen3Config) -> None:
        """Every tensor the config needs is present, with the shape the config implies."""
        for hf_name, _, _, shape in hf_tensor_specs(cfg):
            if hf_name not in self.tensors:
                raise CheckpointError(
                    f"tensor {hf_name} is missing from {self.dir}; the checkpoint is incomplete or "
                    "does not match its config.json"
                )
            path, found = self.tensors[hf_name][:2]
            if found != shape:
                raise CheckpointError(
                    f"tensor {hf_name} in {path.name} has shape {list(found)} but {self.dir / 'config.json'} "
                    f"implies {list(shape)}; use the config.json that belongs to these weights"
                )

    def copy_into(self, dst: np.ndarray, hf_name: str, index: tuple[slice, ...], transposed: bool) -> None:
        """dst[...] = tensor[index] (or its transpose; `index` in our [in, out] order).

        Reads a band of rows at a time into a small buffer and copies (transposing, casting) from
        there: the buffer stays in cache, and the file is read with plain reads rather than a
        memory map, whose touched pages would count as our resident memory."""
        path, shape, dtype, offset = self.tensors[hf_name]
        index = index[::-1] if transposed else index
        rows = range(*index[0].indices(shape[0]))
        row_elems = int(np.prod(shape[1:]))
        band = max(1, BAND_BYTES // (row_elems * dtype.itemsize))
        buf = np.empty(band * row_elems, dtype)
        with open(path, "rb", buffering=0) as f:
            for start in range(rows.start, rows.stop, band):
                n = min(band, rows.stop - start)
                chunk = buf[: n * row_elems]
                f.seek(offset + start * row_elems * dtype.itemsize)
                if f.readinto(chunk) != chunk.nbytes:
                    raise CheckpointError(f"{path} ended inside tensor {hf_name}; re-download or re-copy this file")
                part = chunk.reshape((n,) + shape[1:])[(slice(None),) + index[1:]]
                at = slice(start - rows.start, start - rows.start + n)
                if transposed:
                    copy_transposed(dst[:, at], part)
                else:
                    dst[at] = part


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
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
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


def _write_rows(f, value: np.ndarray, dtype: np.dtype) -> None:
    """`value` (maybe a transposed view) to `f` as contiguous `dtype`, a cache-sized band of rows
    at a time through one reused buffer."""
    band = max(1, BAND_BYTES // max(1, value[:1].size * dtype.itemsize))
    buf = np.empty((min(band, len(value)),) + value.shape[1:], dtype)
    for start in range(0, len(value), band):
        rows = value[start:start + band]
        out = buf[: len(rows)]
        if rows.ndim == 2 and rows.strides[0] < rows.strides[1]:  # a transposed view: copy by tiles
            copy_transposed(out, rows.T)
        else:
            out[...] = rows
        f.write(out.reshape(-1).view(np.uint8).data)


class SequentialWriter:
    """A file written front to back through one page-aligned buffer, with O_DIRECT where the file
    system takes it. A buffered write copies every byte into the page cache: on our development VM
    that cost about 2.5 s of kernel CPU per GB, the largest single cost of an export (a direct
    write: about 0.15 s). Where O_DIRECT is refused (tmpfs, some network file systems) it writes
    through the page cache as usual."""

    ALIGN = 4096  # O_DIRECT: buffer address, file offset and length in multiples of the block size
    BUFFER_BYTES = 8 << 20

    def __init__(self, path: Path):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        direct = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere plain writes
        self.fd = None
        if direct:
            try:
                self.fd = os.open(path, flags | direct)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        self.direct = self.fd is not None
        if self.fd is None:
            self.fd = os.open(path, flags)
        self.buffer = mmap.mmap(-1, self.BUFFER_BYTES)  # anonymous memory is page-aligned
        self.view = memoryview(self.buffer)
        self.fill = self.size = 0

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        while len(data):
            n = min(len(data), self.BUFFER_BYTES - self.fill)
            self.view[self.fill:self.fill + n] = data[:n]
            self.fill += n
            self.size += n
            data = data[n:]
            if self.fill == self.BUFFER_BYTES:
                self._flush(self.BUFFER_BYTES)

    def _flush(self, nbytes: int) -> None:
        done = 0
        while done < nbytes:
            try:
                done += os.write(self.fd, self.view[done:nbytes])
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                # The file system wants another alignment: carry on through the page cache.
                import fcntl

                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False
        self.fill = 0

    def close(self, flush: bool = True) -> None:
        """Write what is buffered (a direct write is padded to the block size, the file then cut
        to its true length) and close."""
        try:
            if flush and self.fill:
                end = -(-self.fill // self.ALIGN) * self.ALIGN if self.direct else self.fill
                self.view[self.fill:end] = bytes(end - self.fill)
                self._flush(end)
                if end != self.fill:
                    os.ftruncate(self.fd, self.size)
        finally:
            os.close(self.fd)
            self.view.release()
            self.buffer.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.close(flush=exc_type is None)  # after an error the file is discarded: no more writes


def write_safetensors(path: Path, layout, tensors: Iterator[tuple[str, np.ndarray]], dtype: np.dtype) -> None:
    """Header from the shapes, then each tensor written as soon as it arrives."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for hf_name, shape in layout:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        header[hf_name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors itself writes it
    with SequentialWriter(path) as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for hf_name, shape in layout:
            got_name, value = next(tensors)
            if got_name != hf_name or tuple(value.shape) != tuple(shape):
                raise ValueError(f"tensor stream gave {got_name} {list(value.shape)}, expected {hf_name} {list(shape)}")
            _write_rows(f, value, dtype)
            del value  # may be a view of a whole parameter: release it before the next one is fetched


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
