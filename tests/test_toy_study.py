"""scripts/toy_study.py at minimal sizes: one shared warm-up, the variants run through the round
driver, and the study's tables say what the runs' own files say."""
import collections
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# Multi-process, kill/resume, driver and study runs: `pytest -m "not slow"` leaves them out.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("paper", "cot_codes+two_pass")
TINY = ["train.batch_size=2", "train.epochs=1", "train.phase_b_epochs=0", "data.warmup_examples=6", "data.examples_per_phase=6",
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
           "--arms", ",".join(VARIANTS), *[a for s in TINY for a in ("--set", s)]]
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


def test_m_step_arms_print_the_control_and_the_best_arm(tmp_path):
    out = tmp_path / "study"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache")}
    arms = ("control", "stepwise_none", "pause")
    cmd = [sys.executable, str(ROOT / "scripts" / "toy_study.py"), "--out", str(out), "--arms", ",".join(arms),
           *[a for s in TINY for a in ("--set", s)]]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    study = json.loads((out / "study.json").read_text())
    verbal = study["reference"]["verbal"]["accuracy"]

    def line(label, name):
        d = study["variants"][name]["rounds"]["1"]["eval"]["diagnostics"]
        return (f"{label} own={d['own_accuracy']:.3f} random={d['random_accuracy']:.3f} "
                f"shuffled={d['shuffled_accuracy']:.3f} verbal={verbal:.3f}")

    def gain(name):
        d = study["variants"][name]["rounds"]["1"]["eval"]["diagnostics"]
        return d["own_accuracy"] - max(d["random_accuracy"], d["shuffled_accuracy"])

    lines = result.stdout.strip().splitlines()
    best = max(arms[1:], key=gain)
    assert lines[-2:] == [line("control", "control"), line(f"best_arm={best}", best)]
    for name in arms:  # Phase B's trace-loss curve is its metrics, curriculum sub-phases one after another
        logs = sorted((out / name / "round_1" / "phase_b").glob("**/metrics.jsonl"))
        losses = [json.loads(r)["trace_loss"] for log in logs for r in log.read_text().splitlines() if r.strip()]
        curve = study["variants"][name]["rounds"]["1"]["phase_b_trace_loss"]
        assert [loss for _, loss in curve] == losses and [s for s, _ in curve] == list(range(1, len(losses) + 1))
    assert len(list((out / "stepwise_none" / "round_1" / "phase_b").glob("stage_*/metrics.jsonl"))) == 4
    assert "round_1/phase_a" not in json.loads((out / "stepwise_none" / "state.json").read_text())["done"]
    # The pause arm trains one repeated token; its evaluation samples its own traces from that model.
    pause = json.loads((out / "pause" / "round_1" / "traces_b.json").read_text())
    assert all(len(set(t)) == 1 for t in pause.values())


def test_rl_arms_end_with_their_lines(tmp_path):
    """rl_verbal (GRPO from the warm-up, no rounds), rl_paper (after round 1, abstract) and rl_m_step
    (on codes_middle_rows' round-1 model): each last line's figures are those of the runs' own files, and
    study.json holds each step's reward."""
    out = tmp_path / "study"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache")}
    rl = ["rl.steps=2", "rl.prompts_per_step=2", "rl.rollouts_per_prompt=2", "rl.max_new_tokens=40",
          "rl.rollout_batch=4", "rl.checkpoint_every=1"]
    cmd = [sys.executable, str(ROOT / "scripts" / "toy_study.py"), "--out", str(out), "--arms", "rl_verbal,rl_paper,rl_m_step",
           "--toy-rows", "100", *[a for s in [*TINY, *rl] for a in ("--set", s)]]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]

    def read(path):
        return json.loads((out / path).read_text())

    verbal_before = read("shared/baseline/verbal/summary.json")["accuracy"]
    verbal_after = read("rl_verbal/rl/eval/summary.json")
    paper_before = read("rl_paper/round_1/eval/summary.json")["diagnostics"]["own_accuracy"]
    paper_after = read("rl_paper/rl/eval/summary.json")
    m_step_before = read("codes_middle_rows/round_1/eval/summary.json")["diagnostics"]["own_accuracy"]
    m_step_after = read("rl_m_step/rl/eval/summary.json")
    assert verbal_after["mode"] == "verbal" and paper_after["mode"] == "abstract"

    def abstract_line(name, before, after):
        d = after["diagnostics"]
        return (f"arm={name} start={before:.3f} end={after['accuracy']:.3f} own={d['own_accuracy']:.3f} "
                f"random={d['random_accuracy']:.3f} shuffled={d['shuffled_accuracy']:.3f}")

    assert result.stdout.strip().splitlines()[-3:] == [
        f"arm=rl_verbal start={verbal_before:.3f} end={verbal_after['accuracy']:.3f}",
        abstract_line("rl_paper", paper_before, paper_after), abstract_line("rl_m_step", m_step_before, m_step_after)]

    # rl_verbal ran no round and trained the warm-up model; rl_paper trained round 1's final model.
    assert not (out / "rl_verbal" / "round_1").exists()
    assert read("rl_verbal/rl/phase.json")["base_dir"] == str(out / "rl_verbal" / "warmup" / "model")
    assert read("rl_paper/rl/phase.json")["base_dir"] == str(out / "rl_paper" / "round_1" / "model_b")
    # rl_m_step trained codes_middle_rows' round-1 model, through a link, and left that run as it was.
    assert read("rl_m_step/rl/phase.json")["base_dir"] == str(out / "rl_m_step" / "round_1" / "model_b")
    source = out / "codes_middle_rows"
    assert (out / "rl_m_step" / "round_1").resolve() == (source / "round_1").resolve()
    assert not (source / "rl").exists() and "rl" not in read("codes_middle_rows/state.json")["done"]
    study = read("study.json")
    for name in ("rl_verbal", "rl_paper", "rl_m_step"):
        steps = [json.loads(line) for line in (out / name / "rl" / "metrics.jsonl").read_text().splitlines()]
        assert [list(p) for p in study["variants"][name]["rl"]["reward_curve"]] == [[s["step"], s["reward"]] for s in steps]
        assert len(steps) == 2


@pytest.mark.parametrize("bad", [["--set", "train.no_such_setting=1"], ["--set", "variants.curriculum=sideways"]])
def test_a_bad_setting_stops_the_study_with_one_line_before_anything_runs(tmp_path, bad):
    out = tmp_path / "study"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "toy_study.py"), "--out", str(out),
                             "--arms", "control", *bad], capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                            timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert not out.exists()


def test_ctrl_c_stops_the_study_with_one_line_that_says_how_to_resume(tmp_path):
    """SIGINT once the shared warm-up has started: the ledger stops its stage process; exit 130 and
    a last line naming where the study stopped and the command that resumes it, no traceback."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "toy_study.py"), "--out", str(tmp_path / "study"),
                             "--arms", "paper"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    for line in proc.stdout:
        if line.startswith("[shared] warmup"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    lines = err.strip().splitlines()
    assert proc.returncode == 130, err[-3000:]
    assert lines[-1].startswith("interrupted: ") and "resume with: " in lines[-1], err[-3000:]
    assert "Traceback" not in err
