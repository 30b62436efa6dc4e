"""The round driver on a tiny model: every stage runs, and a run killed inside stages resumes to
the same final report."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from abscot_jax.data.toy import write_toy_data
from abscot_jax.fixtures import make_checkpoint

# Multi-process, kill/resume, driver and study runs: `pytest -m "not slow"` leaves them out.
pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("driver_worker.py")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("driver_data")
    make_checkpoint(root / "model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1)
    train, evaluation = write_toy_data(root, train_size=40, eval_size=3, min_digits=3, max_digits=4)
    return root


def run_driver(run_root, data, rounds=2, fault=""):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "ABSCOT_KILL_IN": fault,
           "JAX_COMPILATION_CACHE_DIR": str(Path(run_root).parent / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    return subprocess.run([sys.executable, str(WORKER), str(run_root), str(data), str(rounds)], env=env,
                          capture_output=True, text=True, timeout=1500)


def outcome(run_root):
    run = Path(run_root) / "tiny"
    state = json.loads((run / "state.json").read_text())
    summaries = {str(p.relative_to(run)): json.loads(p.read_text()) for p in sorted(run.glob("**/summary.json"))}
    return state["done"], summaries, (run / "report.md").read_text()


FAULT_POINTS = ("phase_a_step", "export", "phase_b_step", "traces_a_r2", "eval")


def test_driver_runs_every_stage_and_resumes_after_kills(tmp_path, tiny_data):
    """Every stage runs in its own process and the driver starts no JAX backend (driver_worker
    asserts it). SIGKILL of a stage process, then of the driver, at each fault point: each stops
    the run (the killed stage not marked done), and one rerun gives the uninterrupted run's records."""
    reference = run_driver(tmp_path / "reference", tiny_data)
    assert reference.returncode == 0, reference.stderr[-3000:]
    done, summaries, report = outcome(tmp_path / "reference")
    stages = [f"round_{t}/{s}" for t in (1, 2) for s in ("traces_a", "phase_a", "traces_b", "phase_b", "eval")]
    assert set(stages + ["prepare_base", "baseline_verbal"]) == set(done)
    assert done["round_2/traces_a"]["traces"] > 0  # sampled from round 1's model, not the random rule
    for t in (1, 2):
        for part in ("model_a", "model_b"):
            assert (tmp_path / "reference" / "tiny" / f"round_{t}" / part / "model.safetensors.index.json").exists()
    assert "Round 2" in report

    killed = tmp_path / "killed"
    for fault in FAULT_POINTS:
        stage_killed = run_driver(killed, tiny_data, fault=f"stage:{fault}")
        last = stage_killed.stderr.strip().splitlines()[-1]
        assert stage_killed.returncode == 2 and "was killed by signal 9" in last, (fault, stage_killed.stderr[-3000:])
        key = last.split("error: stage ")[1].split()[0]
        assert key not in json.loads((killed / "tiny" / "state.json").read_text())["done"]
        driver_killed = run_driver(killed, tiny_data, fault=f"driver:{fault}")
        assert driver_killed.returncode == -9, (fault, driver_killed.stderr[-3000:])
    final = run_driver(killed, tiny_data)
    assert final.returncode == 0, final.stderr[-3000:]
    k_done, k_summaries, k_report = outcome(killed)
    assert k_summaries == summaries
    assert k_report == report
    for stage in stages:  # the same training figures, whatever was interrupted
        for key in ("final_loss", "traces", "accuracy"):
            if key in done[stage]:
                assert k_done[stage][key] == done[stage][key], (stage, key)


def test_ctrl_c_in_a_training_phase_stops_with_one_line_and_the_rerun_resumes(tmp_path, tiny_data):
    """SIGINT to the driver mid-Phase A: it passes the signal to the stage process, which stops;
    exit 130 and one line naming the stage, its latest checkpoint and the command that resumes."""
    interrupted = run_driver(tmp_path, tiny_data, rounds=1, fault="interrupt:phase_a_step")
    lines = interrupted.stderr.strip().splitlines()
    assert interrupted.returncode == 130, interrupted.stderr[-3000:]
    assert lines[-1].startswith("interrupted: stage round_1/phase_a"), lines[-1]
    checkpoints = tmp_path / "tiny" / "round_1" / "phase_a" / "checkpoints"
    latest = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert f"latest checkpoint: {checkpoints / str(latest)}" in lines[-1] and str(WORKER) in lines[-1]
    assert not any("Traceback" in line for line in lines)
    state = json.loads((tmp_path / "tiny" / "state.json").read_text())
    assert "round_1/phase_a" not in state["done"]
    resumed = run_driver(tmp_path, tiny_data, rounds=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done = json.loads((tmp_path / "tiny" / "state.json").read_text())["done"]
    assert done["round_1/phase_a"]["resumed_from"] == latest
