"""scripts/gpu_check.py --dry-run: the GPU check's every section runs on CPU at tiny shapes (2 host
devices, fsdp 2), so that it is known to work before a GPU is lent."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Multi-process, kill/resume, driver and study runs: `pytest -m "not slow"` leaves them out.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_measures_every_section(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    last = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    match = re.fullmatch(r"gpu_check ok=true backend=cpu modes=(\d+)", last)
    assert match, last
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert int(match.group(1)) == sum(1 for r in results if r["section"] != "env")
    assert (tmp_path / "gpu_check.md").read_text().count("### ") == 4

    train = {r["mode"]: r for r in results if r["section"] == "train"}
    assert set(train) == {"lora", "full"} and all(r["overrides"] == "" for r in train.values())
    for r in train.values():
        assert r["processed_tokens"] > r["loss_tokens_per_s"] * r["step_s"] > 0
        assert r["step_s"] > 0 and r["compile_s"] > 0 and r["plan_gib"] > 0
        assert "all-gather" in r["collectives"]  # fsdp 2 gathers the weights
    hf = [r for r in results if r["section"] == "hf"]
    assert {(r["mode"], r["layout"]) for r in hf} == {(m, l) for m in ("lora", "full")
                                                      for l in ("mask_4d", "two_pass_causal")}
    attention = [r for r in results if r["section"] == "attention" and "ms" in r]
    for rows in ("phase_a", "phase_b"):
        impls = {r["impl"]: r for r in attention if r["rows"] == rows}
        assert {"xla", "blockwise", "causal_only"} <= set(impls)
        # fp32 on CPU: the fused kernels' gradients agree with the dense reference to rounding.
        for name, r in impls.items():
            if name not in ("xla", "causal_only"):
                assert r["max_grad_diff_vs_xla"] < 1e-4, (name, r)
