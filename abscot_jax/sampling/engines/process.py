"""Engines in another process (another environment's Python, say), through JSONL files: the
worker is this package's command line (__main__.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from abscot_jax.progress import Progress, current_label
from abscot_jax.sampling.protocol import SamplingRequest, SamplingResult, read_results, write_requests

REPO_ROOT = Path(__file__).resolve().parents[3]


class SubprocessEngine:
    """Runs `python -m abscot_jax.sampling.engines --engine NAME` in another process (another
    environment's Python, say), through JSONL files. With `shards` > 1 the requests are split
    round-robin over that many processes started together, `shard_env[i]` added to shard i's
    environment (e.g. CUDA_VISIBLE_DEVICES). A process that fails fails its requests only, each
    with the process's last lines of output."""

    def __init__(self, engine: str, model_dir, *, python: str = sys.executable, args: Sequence[str] = (),
                 shards: int = 1, shard_env: Sequence[dict] | None = None, timeout_s: float | None = None):
        self.engine, self.model_dir, self.python, self.args = engine, str(model_dir), python, list(args)
        self.shards, self.shard_env, self.timeout_s = shards, shard_env or [{}] * shards, timeout_s

    def run_requests(self, requests: Sequence[SamplingRequest]) -> list[SamplingResult]:
        check_accelerators_free()
        # Lines read_requests could not parse are already results; the rest go to the processes.
        results: list[SamplingResult | None] = [r if isinstance(r, SamplingResult) else None for r in requests]
        todo = [i for i, r in enumerate(results) if r is None]
        shards = [(s, todo[s::self.shards]) for s in range(self.shards) if todo[s::self.shards]]
        # The processes report nothing until they end: the progress line counts finished
        # processes' requests, and shows the time so far while they run.
        bar = Progress(f"{current_label()} ({self.engine}, {len(shards)} process{'es' * (len(shards) > 1)})",
                       len(todo), unit="requests", every=0)
        with tempfile.TemporaryDirectory(prefix="abscot_sampling_") as tmp:
            started = [self._start(s, [requests[i] for i in index], Path(tmp)) for s, index in shards]
            for (_, index), run in zip(shards, started):  # all shards run at once; collect in turn
                for i, result in zip(index, self._collect(*run, [requests[i].id for i in index], bar.update)):
                    results[i] = result
                bar.update(len(index))
        bar.close(errors=sum(results[i].finish_reason == "error" for i in todo) or None)
        return results

    def _start(self, shard: int, requests, tmp: Path):
        req_path, out_path, log_path = (tmp / f"{name}{shard}"
                                        for name in ("requests.jsonl", "results.jsonl", "log.txt"))
        write_requests(req_path, requests)
        env = {**os.environ, **self.shard_env[shard],
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        cmd = [self.python, "-m", "abscot_jax.sampling.engines", "--engine", self.engine, "--model", self.model_dir,
               "--requests", str(req_path), "--out", str(out_path), *self.args]
        log = open(log_path, "w")
        try:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        except OSError as e:  # e.g. the configured Python does not exist
            log.write(f"cannot start {self.python}: {e}")
            proc = None
        return proc, out_path, log_path, log

    def _collect(self, proc, out_path: Path, log_path: Path, log, ids: list[str], tick) -> list[SamplingResult]:
        """The results of one process, once it ends; `tick(0)` every second while it runs."""
        code = "an error"
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        while proc is not None:
            try:
                code = proc.wait(timeout=1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() >= deadline:
                    proc.kill()
                    proc.wait()
                    code = f"killed after {self.timeout_s} s"
                    break
                tick(0)
        log.close()
        got = {r.id: r for r in read_results(out_path)} if out_path.exists() else {}
        tail = " | ".join(log_path.read_text().strip().splitlines()[-5:])
        message = f"{self.engine} process exited with {code} without a result: {tail}"
        return [got.get(i) or SamplingResult.failure(i, message) for i in ids]


def check_accelerators_free() -> None:
    """An out-of-process engine needs the accelerators: refuse to start one while JAX in this
    process has a backend on them (XLA holds most of each device's memory until the process ends)."""
    if "jax" not in sys.modules:
        return
    from jax._src import xla_bridge

    held = sorted(set(xla_bridge.backends()) - {"cpu"}) if xla_bridge.backends_are_initialized() else []
    if held:
        raise RuntimeError(f"this process holds JAX {', '.join(held)} devices; an out-of-process engine needs them "
                           "free: run it from a process that computes with JAX on the CPU only (JAX_PLATFORMS=cpu)")


def visible_gpus() -> list[str] | None:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (None when it is unset)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return None if visible is None else [g.strip() for g in visible.split(",") if g.strip()]
