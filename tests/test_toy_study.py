"""scripts/toy_study.py at minimal sizes: one shared warm-up, the variants run through the round
driver, and the study's tables say what the runs' own files say."""
import collections
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Multi-process, kill/resume, driver and study runs: `pytest -m "not slow"` leaves them out.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("paper", "cot_codes+two_pass")
TINY = ["train.batch_size=2", "train.epochs=1", "data.warmup_examples=6", "data.examples_per_phase=6",
        "eval.limit=3", "eval.max_new_tokens=40", "sampler.max_batch=8"]


def table(markdown: str, header_start: str) -> list[list[str]]:
    """The rows (cells) of the Markdown table whose header row starts with `header_start`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def plug_in_mi(pairs) -> float:
    """Mutual information (nats) of (a, b) pairs from their counts."""
    n = len(pairs)
    joint = collections.Counter(pairs)
    a, b = collections.Counter(x for x, _ in pairs), collections.Counter(y for _, y in pairs)
    return sum(c / n * math.log(c * n / (a[x] * b[y])) for (x, y), c in joint.items())


def test_toy_study_tables_match_the_runs(tmp_path):
    out = tmp_path / "study"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache")}
    cmd = [sys.executable, str(ROOT / "scripts" / "toy_study.py"), "--out", str(out), "--rounds", "1",
           "--variants", ",".join(VARIANTS), *[a for s in TINY for a in ("--set", s)]]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    markdown = (out / "study.md").read_text()
    assert (out / "study.png").stat().st_size > 0

    # One warm-up, shared: the variants' run directories link to it and never ran it themselves.
    assert (out / "shared" / "warmup" / "model").is_dir()
    for name in VARIANTS:
        run = out / name
        assert (run / "warmup").resolve() == (out / "shared" / "warmup").resolve()
        state = json.loads((run / "state.json").read_text())
        assert "warmup" in state["done"] and "warmup" not in state.get("seconds", {})
        assert all(f"round_1/{s}" in state["done"] for s in ("traces_a", "phase_a", "traces_b", "phase_b", "eval"))
        assert state["config"]["variants"]["bottleneck"] == ("two_pass" if "two_pass" in name else "paper")

    def read(path):
        return json.loads(Path(path).read_text())

    reference = {row[0]: row for row in table(markdown, "| Reference")}
    for label, mode in (("Baseline (verbal CoT)", "verbal"), ("Direct answer (CoT closed empty)", "direct")):
        s = read(out / "shared" / "baseline" / mode / "summary.json")
        assert reference[label][1].startswith(f"{100 * s['accuracy']:.1f}%")
        assert reference[label][2] == f"{s['mean_generated_tokens']:.1f}"

    rows = table(markdown, "| Variant | Round | Own trace")
    assert [(r[0], r[1]) for r in rows] == [(name, "1") for name in VARIANTS]
    verbal = read(out / "shared" / "baseline" / "verbal" / "summary.json")["accuracy"]
    for row in rows:
        s = read(out / row[0] / "round_1" / "eval" / "summary.json")
        d = s["diagnostics"]
        state = json.loads((out / row[0] / "state.json").read_text())
        seconds = [v for k, v in state["seconds"].items() if k.startswith("round_1/")]
        percent = [f"{100 * x:.1f}%" for x in (s["accuracy"], *s["accuracy_ci"])]
        assert row[2] == f"{percent[0]} [{percent[1]}, {percent[2]}]"
        assert row[3] == f"{100 * d['random_accuracy']:.1f}%"
        assert row[4] == f"{100 * d['shuffled_accuracy']:.1f}%"
        assert row[5] == f"{d['entropy_nats']:.2f} of {math.log(64):.2f}"
        assert row[6] == f"{d['distinct_traces']} of {d['n_traces']}"
        assert row[7].startswith(f"{s['mean_trace_tokens']:.1f} ")
        assert row[8] == ("—" if not verbal else f"{s['accuracy'] / verbal:.2f}")
        assert row[9] == f"{s['mean_generated_tokens']:.1f}"
        assert row[10] == f"{sum(x['wall'] for x in seconds):.0f}"
        assert row[11] == f"{sum(x['cpu'] for x in seconds):.0f}"

    # Mutual information between the round-1 codes and the partial sums, recomputed from the files.
    questions = {}
    for line in (out / "shared" / "data" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        cot = row["messages"][1]["content"].split("</think>")[0].removeprefix("<think>")
        questions[row["id"]] = [int(x) for x in cot.split()]  # the CoT's lines: the partial sums
    traces = read(out / "cot_codes+two_pass" / "round_1" / "traces_a.json")
    pairs = [(z, s) for key, trace in traces.items() for z, s in zip(trace, questions[key])]
    assert len(pairs) == sum(len(t) for t in traces.values())  # one code per step, 12 steps, m_max 24
    info = {(r[0], r[1]): r for r in table(markdown, "| Variant | Round | Phase A traces")}
    cell = info[("cot_codes+two_pass", "1")][2]
    assert cell.startswith(f"{plug_in_mi(pairs):.3f} (") and cell.endswith(f"; {len(pairs)} pairs)")
