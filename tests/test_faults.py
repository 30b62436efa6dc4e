"""Faults and bad input: corrupted checkpoints, unusable data, impossible lengths."""
import json
import logging
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from abscot_jax.config import load_config
from abscot_jax.data.roles import Role
from abscot_jax.data.sequences import make_example
from abscot_jax.model.config import Qwen3Config
from abscot_jax.model.qwen3 import Qwen3
from abscot_jax.sharding import MeshConfig, make_mesh
from abscot_jax.train.runner import run_phase

# Multi-process, kill/resume, driver and study runs: `pytest -m "not slow"` leaves them out.
pytestmark = pytest.mark.slow

TINY = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=16)


def tiny_examples(n=8):
    rng = np.random.default_rng(0)
    return [make_example([(rng.integers(0, 64, 5), role) for role in (Role.PROMPT, Role.COT, Role.ABSTRACT, Role.ANSWER)],
                         example_id=str(i), phase="A") for i in range(n)]


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    cfg = load_config(None, ["train.mode=full", "train.seq_len=40", "train.batch_size=2", "train.epochs=2",
                             "train.checkpoint_every=1", "train.keep_checkpoints=3"])
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    examples = tiny_examples()
    reference, _ = run_phase(Qwen3(TINY, rngs=nnx.Rngs(0)), examples, cfg, tmp_path / "a", mesh, progress=False)

    run_dir = tmp_path / "b"
    run_phase(Qwen3(TINY, rngs=nnx.Rngs(0)), examples, cfg, run_dir, mesh, progress=False)
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    latest = run_dir / "checkpoints" / str(steps[-1])
    for f in (latest / "state").rglob("*"):  # garble every array file of the newest checkpoint
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0garbage" * 4)
    with caplog.at_level(logging.WARNING):
        resumed, summary = run_phase(Qwen3(TINY, rngs=nnx.Rngs(0)), examples, cfg, run_dir, mesh, progress=False)
    assert f"checkpoint at step {steps[-1]} is unreadable" in caplog.text
    assert summary["resumed_from"] == steps[-2]
    want, got = nnx.state(reference, nnx.Param), nnx.state(resumed, nnx.Param)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def run_train_cli(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "abscot_jax.train", "--config", "configs/tiny_cpu.yaml", "--round", "1",
           "--set", f"run_dir={tmp_path}", *[a for o in overrides for a in ("--set", o)]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          cwd=str(__import__("pathlib").Path(__file__).parent.parent))


def test_dataset_of_only_malformed_rows_is_a_clear_error(tmp_path, tiny_hf_dir):
    bad = tmp_path / "bad.jsonl"
    rows = [{"id": "1", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no think"}]},
            {"id": "2", "messages": "not a list"},
            {"id": "3", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think></think>a"}]}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_train_cli(tmp_path, f"model.hf_dir={tiny_hf_dir}", f"data.train={bad}", "data.warmup_examples=0",
                           "eval.baselines=[]")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "0 usable training examples" in last, last
    assert "Traceback" not in result.stderr


def test_seq_len_too_small_for_any_example_is_a_clear_error(tmp_path, tiny_hf_dir):
    from abscot_jax.data.toy import write_toy_data

    train, evaluation = write_toy_data(tmp_path / "data", train_size=8, eval_size=2)
    result = run_train_cli(tmp_path, f"model.hf_dir={tiny_hf_dir}", f"data.train={train}", f"data.eval={evaluation}",
                           "data.warmup_examples=0", "data.examples_per_phase=2", "eval.baselines=[]",
                           "train.seq_len=16")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "train.seq_len=16" in last, last
    assert "Traceback" not in result.stderr


def _mount_tmpfs(path, size):
    path.mkdir(exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                            text=True)
    return result.returncode == 0


def test_no_space_during_export_is_a_clear_error_and_the_rerun_completes(tmp_path, tiny_hf_dir):
    small = tmp_path / "small_disk"
    if not _mount_tmpfs(small, "200k"):
        pytest.skip("cannot mount a size-limited tmpfs here (needs root and mount permission)")
    repo = __import__("pathlib").Path(__file__).parent.parent
    try:
        ckpt = tmp_path / "ckpt"
        convert = [sys.executable, "convert/hf_to_flax.py", "--hf-dir", str(tiny_hf_dir), "--out", str(ckpt)]
        assert subprocess.run(convert, cwd=repo, capture_output=True, timeout=600).returncode == 0
        export = [sys.executable, "convert/flax_to_hf.py", "--ckpt", str(ckpt), "--out", str(small / "hf"),
                  "--dtype", "float32"]
        full = subprocess.run(export, cwd=repo, capture_output=True, text=True, timeout=600)
        assert full.returncode == 2, full.stderr[-2000:]
        lines = full.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: no space left"), full.stderr[-2000:]
        assert list(small.iterdir()) == []  # nothing half-written left behind
        assert (ckpt / "config.json").exists()  # the earlier artifact is intact
        subprocess.run(["umount", str(small)], check=True)
        assert _mount_tmpfs(small, "20m")  # space is back
        again = subprocess.run(export, cwd=repo, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-2000:]
        assert (small / "hf" / "model.safetensors.index.json").exists()
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)
