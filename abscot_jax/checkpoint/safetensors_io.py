"""The safetensors format, read and written by hand, for host memory and speed: each tensor's
byte offset from the header we parse ourselves, bands of rows read with plain reads into a small
buffer (no memory map), and files written front to back through one buffer with O_DIRECT where
the file system takes it."""
from __future__ import annotations

import errno
import json
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from abscot_jax.errors import CheckpointError
from abscot_jax.model.config import DTYPES, Qwen3Config
from abscot_jax.model.hf_names import hf_tensor_specs

BAND_BYTES = 1 << 20  # rows read (and written) per step: small enough to stay in cache
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ST_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
             "BF16": np.dtype(DTYPES["bfloat16"])}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


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


# ---- writing ----------------------------------------------------------------------------------
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
