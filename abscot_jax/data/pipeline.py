"""Packing pipeline (grain): `SequenceExample`s -> fixed-shape batches of packed rows.

    source -> equal shards (one per process) -> shuffle (reshuffled each epoch) -> repeat
           -> first-fit-decreasing packing in windows -> batch

Each batch is a dict of numpy arrays [B, T]: `tokens`, `positions` (restart at 0 in each
packed example), `segment_ids` (1, 2, ... per example in a row; 0 is padding), `roles`
(padding: Role.PROMPT), `targets`, `loss_mask` (float32; 0 on padding). Targets were shifted
inside each example by the builder, so nothing here looks across examples.

Why our own packer and not grain's `FirstFitPackIterDataset`: grain's carries our extra fields
and per-segment positions fine, but it packs in arrival order and emits all its bins as soon as
one example fits none of them; on a long-tailed length mix (lognormal, mean 0.43 T) that left
4-11% padding with 8-128 bins and ran at about 1k examples/s on the 2-core machine. First-fit
decreasing over a window of 256 examples pads about 1% and runs 3-4x faster
(`scripts/bench_data.py --compare-packers`, docs/BENCHMARKS.md). It is deterministic: a window's rows depend only on its examples and
(seed, window index), which is also what makes the iterator state small: the parent's state at
the start of the current window plus the number of rows already emitted from it. Restoring
re-reads and re-packs that window and skips those rows.

Multi-host: every process reads its own shard (by `jax.process_index()` unless given), of
equal size. Packing makes the number of rows per shard differ slightly, so train by a number
of steps over an endless stream (`num_epochs=None`, the default), never "until exhausted",
or the processes fall out of step at the end.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import grain
import numpy as np

from abscot_jax.data.sequences import SequenceExample

BATCH_KEYS = ("tokens", "positions", "segment_ids", "roles", "targets", "loss_mask")


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices into `lengths`: longest first, each into the first bin with room."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))  # ties: stable, deterministic
    free = np.zeros(len(lengths), np.int64)  # room left in each opened bin
    bins: list[list[int]] = []
    for i in order:
        fits = np.flatnonzero(free[:len(bins)] >= lengths[i])
        if len(fits):
            bins[fits[0]].append(i)
            free[fits[0]] -= lengths[i]
        else:
            free[len(bins)] = capacity - lengths[i]
            bins.append([i])
    return bins


def pack_row(examples: Sequence[SequenceExample], seq_len: int) -> dict[str, np.ndarray]:
    """One packed row [seq_len] of the given examples, in order, padded at the end."""
    row = {
        "tokens": np.zeros(seq_len, np.int32), "positions": np.zeros(seq_len, np.int32),
        "segment_ids": np.zeros(seq_len, np.int32), "roles": np.zeros(seq_len, np.int32),  # 0 = Role.PROMPT
        "targets": np.zeros(seq_len, np.int32), "loss_mask": np.zeros(seq_len, np.float32),
    }
    start = 0
    for segment, ex in enumerate(examples, start=1):
        end = start + len(ex)
        if end > seq_len:
            raise ValueError(f"example {ex.id!r} ({len(ex)} tokens) does not fit in seq_len={seq_len}; "
                             "build examples with the same seq_len as the pipeline")
        row["tokens"][start:end] = ex.tokens
        row["positions"][start:end] = np.arange(len(ex))
        row["segment_ids"][start:end] = segment
        row["roles"][start:end] = ex.roles
        row["targets"][start:end] = ex.targets
        row["loss_mask"][start:end] = ex.loss_mask
        start = end
    return row


class PackIterDataset(grain.IterDataset):
    """Packs a stream of `SequenceExample`s into rows of `seq_len` tokens, first-fit decreasing
    within windows of `window` examples; the rows of a window come out in a seeded random order."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, window: int = 256, seed: int = 0):
        super().__init__(parent)
        if window < 1 or seq_len < 1:
            raise ValueError(f"window ({window}) and seq_len ({seq_len}) must be positive")
        self._seq_len, self._window, self._seed = seq_len, window, seed

    def __iter__(self) -> grain.DatasetIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._window, self._seed)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len}, window={self._window})"


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, seq_len: int, window: int, seed: int):
        super().__init__(parent)
        self._seq_len, self._window, self._seed = seq_len, window, seed
        self._window_start = copy.deepcopy(parent.get_state())  # parent state before this window
        self._window_index = 0
        self._rows: list[dict] | None = None  # this window's rows, packed lazily
        self._next_row = 0

    def _pack_window(self) -> list[dict]:
        examples = []
        for _ in range(self._window):
            try:
                examples.append(next(self._parent))
            except StopIteration:
                break
        if not examples:
            raise StopIteration
        bins = first_fit_decreasing([len(ex) for ex in examples], self._seq_len)
        order = np.random.default_rng([self._seed, self._window_index]).permutation(len(bins))
        return [pack_row([examples[i] for i in bins[b]], self._seq_len) for b in order]

    def __next__(self) -> dict[str, np.ndarray]:
        while self._rows is None or self._next_row >= len(self._rows):
            if self._rows is not None:  # window used up: the next starts where the parent is now
                self._window_start = copy.deepcopy(self._parent.get_state())
                self._window_index += 1
                self._next_row = 0
                self._rows = None  # so that an exhausted parent keeps raising StopIteration
            self._rows = self._pack_window()
        row = self._rows[self._next_row]
        self._next_row += 1
        return row

    def get_state(self) -> dict:
        return {"parent": copy.deepcopy(self._window_start), "window_index": self._window_index,
                "next_row": self._next_row}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(copy.deepcopy(state["parent"]))
        self._window_start = copy.deepcopy(state["parent"])
        self._window_index = int(state["window_index"])
        self._next_row = int(state["next_row"])
        self._rows = None  # re-packed from the window start on the next call


def make_dataset(examples: Sequence[SequenceExample], *, batch_size: int, seq_len: int, seed: int = 0,
                 window: int = 256, num_epochs: int | None = None, shard_index: int | None = None,
                 shard_count: int | None = None) -> grain.IterDataset:
    """Batches [batch_size, seq_len] of packed rows (per process). `iter(dataset)` gives an
    iterator with `get_state()` / `set_state()`. num_epochs None repeats forever; each epoch is
    shuffled anew. Shards default to this process's index among `jax.process_count()`."""
    if shard_index is None or shard_count is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    per_shard = len(examples) // shard_count
    if per_shard == 0:
        raise ValueError(f"{len(examples)} examples cannot feed {shard_count} shards; need at least one each")
    ds = grain.MapDataset.source(examples)
    # Equal shards (the few left over are dropped) so every process sees as many examples.
    ds = ds[: per_shard * shard_count][shard_index::shard_count]
    ds = ds.shuffle(seed=seed).repeat(num_epochs)
    # In-memory examples: grain's reader threads would only add overhead.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    ds = PackIterDataset(ds, seq_len=seq_len, window=window, seed=seed)
    return ds.batch(batch_size, drop_remainder=True)


def packing_efficiency(batch: dict[str, np.ndarray]) -> float:
    """Fraction of non-padding tokens in a batch."""
    return float(np.mean(batch["segment_ids"] != 0))
