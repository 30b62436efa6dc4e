"""No stage fails silently: an engine that cannot start, crashes, or answers with errors stops the
run with one line, and the stage is not marked done; fixing the config and rerunning completes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from abscot_jax.config import load_config
from abscot_jax.data.toy import write_toy_data
from abscot_jax.errors import ConfigError, RunError
from abscot_jax.fixtures import make_checkpoint

# Multi-process, kill/resume, driver and study runs: `pytest -m "not slow"` leaves them out.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage_errors")
    make_checkpoint(root / "model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1)
    write_toy_data(root, train_size=40, eval_size=3, min_digits=3, max_digits=4)
    config = root / "tiny.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "name": "tiny", "run_dir": str(root / "runs"), "rounds": 1,
        "model": {"hf_dir": str(root / "model")},
        "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "examples_per_phase": 8, "m_max": 6},
        "train": {"mode": "lora", "seq_len": 128, "batch_size": 4, "epochs": 1},
        "lora": {"rank": 4, "alpha": 8},
        "eval": {"limit": 3, "m_min": 2, "max_new_tokens": 10},
    }))
    return root


def fake_python(path: Path, body: str) -> str:
    """An executable standing in for the vLLM environment's Python (called with `-m ... --requests F`)."""
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def train(root: Path, *overrides, extra=()):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-m", "abscot_jax.train", "--config", str(root / "tiny.yaml"), "--round", "1",
                           *[arg for o in overrides for arg in ("--set", o)], *extra],
                          env=env, capture_output=True, text=True, timeout=900)


def done_stages(root: Path) -> set:
    return set(json.loads((root / "runs" / "tiny" / "state.json").read_text())["done"])


def test_engine_that_cannot_start_or_crashes_stops_the_run_until_fixed(tiny, tmp_path):
    exits = fake_python(tmp_path / "exits", "echo 'ModuleNotFoundError: No module named vllm' >&2\nexit 1\n")
    crashes = fake_python(tmp_path / "crashes", (
        'while [ $# -gt 0 ]; do [ "$1" = --requests ] && head -n 1 "$2" > /dev/null; shift; done\n'
        "echo 'torch.OutOfMemoryError: CUDA out of memory' >&2\nexit 1\n"))
    for python, reason in ((exits, "No module named vllm"), (crashes, "CUDA out of memory")):
        failed = train(tiny, "sampler.engine=vllm", f"sampler.python={python}")
        lines = failed.stderr.strip().splitlines()
        assert failed.returncode == 2 and lines[-1].startswith("error: evaluation of "), failed.stderr[-2000:]
        assert "3 of 3 requests failed in the vllm engine" in lines[-1] and reason in lines[-1]
        assert done_stages(tiny) == {"prepare_base"}  # neither the baseline nor anything after it
    fixed = train(tiny)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert {"baseline_verbal", "round_1/traces_b", "round_1/eval"} <= done_stages(tiny)

    # A rerun never mixes configurations: changed settings stop it, a new name starts afresh.
    config_yaml = (tiny / "runs" / "tiny" / "config.yaml").read_text()
    for change, key in (("data.examples_per_phase=9", "data.examples_per_phase: 8 -> 9"),
                        ("optim.learning_rate=0.5", "optim.learning_rate: 0.0001 -> 0.5")):
        refused = train(tiny, change)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1 and key in lines[0] and "new name" in lines[0], refused.stderr
        assert (tiny / "runs" / "tiny" / "config.yaml").read_text() == config_yaml
    renamed = train(tiny, "data.examples_per_phase=9", "name=tiny_more")
    assert renamed.returncode == 0, renamed.stderr[-3000:]


def test_error_fraction_above_the_limit_fails_at_or_below_passes(tiny):
    from abscot_jax.stages.context import RunContext

    cfg = load_config(tiny / "tiny.yaml", [f"run_dir={tiny / 'fraction'}", "eval.max_error_fraction=0.25"])
    run = RunContext(cfg)
    run.check_engine_errors("evaluation", ["boom"], 4)  # 1 of 4 = 0.25: allowed
    with pytest.raises(RunError, match=r"evaluation: 2 of 4 requests failed in the jax engine \(boom\)"):
        run.check_engine_errors("evaluation", ["boom", "boom"], 4)


def test_bad_engine_settings_are_one_line_before_anything_runs(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"eval.max_error_fraction must be in \[0, 1\]"):
        load_config(tiny / "tiny.yaml", ["eval.max_error_fraction=1.5"])
    for overrides, message in (
            (["sampler.engine=vllm", "sampler.python=/no/such/python"], "sampler.python='/no/such/python' does not exist"),
            (["sampler.gpu_memory_utilization=1.5"], "sampler.gpu_memory_utilization must be in (0, 1]"),
            (["variants.bottleneck=three_pass"], "variants.bottleneck must be one of paper, two_pass"),
            (["variants.round1_traces=sampled"], "variants.round1_traces must be one of random, cot_codes"),
            (["--stage", "phase_c"], "unknown stage(s) ['phase_c']; stages: traces_a, phase_a")):
        stage = overrides if overrides[0] == "--stage" else []
        settings = [] if stage else overrides
        refused = train(tiny, f"run_dir={tmp_path}", *settings, extra=stage)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1 and message in lines[0], (overrides, refused.stderr)
        assert not any(tmp_path.iterdir())  # refused before anything ran
