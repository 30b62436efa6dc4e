"""SIGKILL the trainer at several points, one of them inside a checkpoint save; the resumed run
ends bit-identical to an uninterrupted one, with the same data order."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Multi-process, kill/resume, driver and study runs: `pytest -m "not slow"` leaves them out.
pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("train_worker.py")


def run_worker(out_dir, mode="lora", **faults):
    # The runs compile the same programs: share a persistent compilation cache between them.
    cache = Path(out_dir).parent / "jax_cache"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    env.update({f"ABSCOT_{k.upper()}": str(v) for k, v in faults.items()})
    return subprocess.run([sys.executable, str(WORKER), str(out_dir), mode], env=env, capture_output=True,
                          text=True, timeout=900)


def metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path):
    reference = run_worker(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    interrupted = tmp_path / "interrupted"

    killed = run_worker(interrupted, kill_at_step=1)  # before any checkpoint exists
    assert killed.returncode == -9
    killed = run_worker(interrupted, kill_in_save=4)  # inside the save of step 4 (step 2 is saved)
    assert killed.returncode == -9
    assert not (interrupted / "checkpoints" / "4").exists()
    resumed = run_worker(interrupted)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "'resumed_from': 2" in resumed.stdout

    want, got = np.load(tmp_path / "reference" / "final.npz"), np.load(interrupted / "final.npz")
    assert sorted(want.files) == sorted(got.files)
    for name in want.files:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # Same data order: every step saw the same tokens and had the same loss.
    ref_steps = [(m["step"], m["tokens"], m["loss"]) for m in metrics(tmp_path / "reference")]
    assert ref_steps == [(m["step"], m["tokens"], m["loss"]) for m in metrics(interrupted)]
    assert len(ref_steps) == 6
