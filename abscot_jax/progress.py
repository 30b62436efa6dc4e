"""Progress of the long stages: trace sampling, best-of-k scoring, evaluation, conversion, training.

On a terminal, a tqdm bar redrawn in place (counts, rate, ETA) and cleared at the end. Anywhere
else (a file, a pipe, `nohup`, SLURM, `| tee`), plain lines: one every EVERY_ITEMS items or
EVERY_SECONDS seconds, whichever comes first, so `tail -f` shows where a run is. Either way each
stage ends with one summary line (count, time, rate, and what the stage adds: tokens, loss,
accuracy). Progress goes to stdout, which a stage process shares with the train command; on
several hosts, host 0 alone shows it.

The two intervals are set here, or for one command by ABSCOT_PROGRESS_EVERY (items; 0: by time
only) and ABSCOT_PROGRESS_SECONDS.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

EVERY_ITEMS = 50
EVERY_SECONDS = 30.0

# What the engines call their progress (a caller such as the evaluation names it; `labelled`).
_label = contextvars.ContextVar("progress_label", default="sampling")


def intervals() -> tuple[int, float]:
    """(items, seconds) between two plain progress lines."""
    return (int(os.environ.get("ABSCOT_PROGRESS_EVERY", EVERY_ITEMS)),
            float(os.environ.get("ABSCOT_PROGRESS_SECONDS", EVERY_SECONDS)))


def host0() -> bool:
    """This process is host 0 of the run, as its launcher set it (no JAX needed)."""
    return int(os.environ.get("ABSCOT_PROCESS_ID") or os.environ.get("SLURM_PROCID") or 0) == 0


@contextlib.contextmanager
def labelled(label: str) -> Iterator[None]:
    """Progress started inside (e.g. an engine's) is called `label`."""
    token = _label.set(label)
    try:
        yield
    finally:
        _label.reset(token)


def current_label() -> str:
    return _label.get()


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def amount(n: float, unit: str) -> str:
    """`n` of `unit`: bytes as kB/MB/GB, anything else with thousands separators."""
    if unit == "B":
        for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if n >= scale:
                return f"{n / scale:.2f} {name}"
        return f"{n:.0f} B"
    return f"{n:,.0f} {unit}"


def per_second(rate: float, unit: str) -> str:
    """A rate: `2.31 steps/s`, `1,234 tokens/s`, `120.50 MB/s`."""
    return f"{amount(rate, unit) if unit == 'B' or rate >= 10 else f'{rate:.2f} {unit}'}/s"


def say(line: str, stream=None) -> None:
    """One line of a stage's output (host 0 only), flushed at once."""
    if host0():
        print(line, file=stream or sys.stdout, flush=True)


class Progress:
    """Counts of one stage's work: `update(n, **facts)` as it goes, `close(**facts)` at its end.

    `facts` are shown beside the counts (e.g. loss=0.4512). `terminal` (default: whether `stream`
    is one) picks the bar or the plain lines; `every`/`seconds` default to `intervals()`; `clock`
    is injectable for tests."""

    def __init__(self, desc: str, total: int | None = None, *, unit: str = "items", initial: int = 0,
                 stream=None, terminal: bool | None = None, every: int | None = None,
                 seconds: float | None = None, enabled: bool = True, clock: Callable[[], float] = time.monotonic):
        self.desc, self.total, self.unit, self.initial, self.n = desc, total, unit, initial, initial
        self.stream = stream or sys.stdout
        self.enabled = enabled and host0()
        default_every, default_seconds = intervals()
        self.every = default_every if every is None else every
        self.seconds = default_seconds if seconds is None else seconds
        self.clock = clock
        self.start = self.last_time = clock()
        self.last_n = initial
        self.facts: dict = {}
        self.bar = None
        if terminal is None:
            terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        if self.enabled and terminal:
            from tqdm import tqdm

            # leave=False: the bar goes at the end; the summary line stays.
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit == "B", leave=False,
                            file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1, **facts) -> None:
        """`n` more items done (0: only let the time-based line come due)."""
        self.n += n
        self.facts.update(facts)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if facts:
                self.bar.set_postfix_str(self._facts(facts, ", "), refresh=False)
            return
        now = self.clock()
        if (self.every and self.n - self.last_n >= self.every) or now - self.last_time >= self.seconds:
            self.last_n, self.last_time = self.n, now
            say(self.line(now), self.stream)

    def set(self, n: int, **facts) -> None:
        """The count is now `n` (work measured from outside, e.g. bytes written)."""
        self.update(n - self.n, **facts)

    def rate(self, now: float) -> float | None:
        elapsed = now - self.start
        return (self.n - self.initial) / elapsed if elapsed > 0 else None

    def line(self, now: float) -> str:
        """The plain progress line: count, share, rate, elapsed time, ETA, facts."""
        count = amount(self.n, self.unit)
        if self.total:  # "40/400 steps (10%)"; bytes: "1.20 GB/8.00 GB (15%)"
            count = (f"{count if self.unit == 'B' else f'{self.n:,}'}/{amount(self.total, self.unit)}"
                     f" ({100 * self.n / self.total:.0f}%)")
        parts = [count]
        rate = self.rate(now)
        if rate:
            parts.append(per_second(rate, self.unit))
        parts.append(f"{duration(now - self.start)} elapsed")
        if rate and self.total:
            parts.append(f"ETA {duration(max(0, self.total - self.n) / rate)}")
        line = f"{self.desc}: {', '.join(parts)}"
        return line + (f"; {self._facts(self.facts, '; ')}" if self.facts else "")

    @staticmethod
    def _facts(facts: dict, sep: str) -> str:
        return sep.join(f"{k.replace('_', ' ')} {v:.4g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
                        for k, v in facts.items() if v is not None)

    def close(self, summary: bool = True, **facts) -> None:
        """End the bar; unless `summary=False` (the stage failed), print the summary line:
        `desc: done, N unit in T (R unit/s)[, resumed at I]; facts`."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not (self.enabled and summary):
            return
        now = self.clock()
        done = self.n - self.initial
        rate = self.rate(now)
        line = f"{self.desc}: done, {amount(done, self.unit)} in {duration(now - self.start)}"
        line += f" ({per_second(rate, self.unit)})" if rate else ""
        line += f", resumed at {amount(self.initial, self.unit)}" if self.initial else ""
        line += f"; {self._facts(facts, '; ')}" if any(v is not None for v in facts.values()) else ""
        say(line, self.stream)


@contextlib.contextmanager
def polled(desc: str, measure: Callable[[], int], *, total: int | None = None, unit: str = "B",
           final: Callable[[], int] | None = None, poll_seconds: float = 1.0) -> Iterator[Progress]:
    """Progress of work seen from outside, e.g. the bytes a conversion has written: a thread reads
    `measure()` every `poll_seconds`; plain lines come by time only. On success the count is set
    to `final()` (default `measure()`) and the summary printed."""
    progress = Progress(desc, total, unit=unit, every=0)
    stop = threading.Event()

    def poll():
        while not stop.wait(poll_seconds):
            progress.set(measure())

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    ok = False
    try:
        yield progress
        ok = True
    finally:
        stop.set()
        thread.join()
        if ok:
            progress.set((final or measure)())
        progress.close(summary=ok)


def tree_bytes(*roots) -> int:
    """Bytes of the files under `roots` (files or directories; missing ones count 0). Files may
    vanish while it counts (a writer renaming its temporaries)."""
    total = 0
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass
        if os.path.isfile(root):
            total += os.stat(root).st_size
    return total


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """`datasets` without its bars and info lines inside the block: reading a local file prints
    "Generating train split" on every load, which says nothing (a hub download keeps its bars)."""
    import datasets

    bars_were_off, verbosity = datasets.are_progress_bars_disabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
        datasets.logging.set_verbosity(verbosity)


@contextlib.contextmanager
def writing(desc: str, out_dir, total_bytes: int | None = None) -> Iterator[Progress]:
    """Progress of a command that writes `out_dir` through `checkpoint.hf.atomic_output_dir`: the
    bytes in its temporary sibling (`.NAME.tmp-PID-...`, renamed to NAME when complete)."""
    out = os.path.abspath(out_dir)
    parent, name = os.path.dirname(out), os.path.basename(out)
    prefix = f".{name}.tmp-{os.getpid()}-"

    def measure() -> int:
        try:
            temporaries = [os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(prefix)]
        except OSError:  # the parent is not there yet
            return 0
        return tree_bytes(*temporaries)

    with polled(desc, measure, total=total_bytes, final=lambda: tree_bytes(out)) as progress:
        yield progress
