"""The run report, from a synthetic run directory laid out as the round driver writes it."""
from __future__ import annotations

import json
import re

import pytest

from abscot_jax.eval.evaluate import summarize
from abscot_jax.report import load_run, write_report
from abscot_jax.report_plots import accuracy_figure
from abscot_jax.rl.curves import rl_figure

ABSTRACT_IDS = list(range(100, 164))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def metrics(losses, extra_line=None):
    lines = [json.dumps({"step": i + 1, "loss": loss, "trace_loss": loss / 2, "answer_loss": loss / 2,
                         "grad_norm": 1.0, "lr": 1e-4, "tokens": 100, "tokens_per_s": 10.0})
             for i, loss in enumerate(losses)]
    return "\n".join(lines + ([extra_line] if extra_line else [])) + "\n"


def round_summary(subject="Running sums"):
    """A real evaluation summary (summarize), so the report reads exactly what evaluation writes;
    the subject is the toy task's (abscot_jax/data/toy.py), as in the demo."""
    rows = [  # correct, trace, random, shuffled
        (True, [100, 101, 102], False, True), (True, [100, 101, 103, 104], False, False),
        (False, [105] * 6, False, False), (True, [100, 101, 102], True, True)]
    records = [{"id": f"p{i}", "sample": 0, "level": 1, "subject": subject, "correct": c, "trace_ids": z,
                "trace_length": len(z), "answer_length": 5, "generated_tokens": len(z) + 8, "finish_reason": "stop",
                "error": None, "random_trace_correct": r, "shuffled_trace_correct": s}
               for i, (c, z, r, s) in enumerate(rows)]
    return {"dataset": "eval.jsonl", "mode": "abstract", **summarize(records, 1, abstract_ids=ABSTRACT_IDS)}


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "demo_run"
    write(run / "state.json", json.dumps({"done": {}, "config": {"name": "demo", "rounds": 3}}))
    write(run / "baseline/verbal/summary.json", json.dumps(
        {"dataset": "eval.jsonl", "accuracy": 0.62, "accuracy_ci": [0.52, 0.71], "mean_generated_tokens": 41.3,
         "errors": 0, "diagnostics": None}))
    write(run / "baseline/direct/summary.json", json.dumps(
        {"dataset": "eval.jsonl", "accuracy": 0.1, "accuracy_ci": [0.05, 0.16], "mean_generated_tokens": 4.0,
         "errors": 2}))
    write(run / "round_1/phase_a/metrics.jsonl", metrics([2.5, 2.0, 1.25], extra_line="{truncated"))
    write(run / "round_1/phase_b/metrics.jsonl", metrics([1.8, 0.9]))
    write(run / "round_1/eval/summary.json", json.dumps(round_summary()))
    write(run / "round_2/phase_a/metrics.jsonl", metrics([1.1, 1.0]))  # round 2 still training
    return run


def test_report_table_and_plots(run_dir):
    path = write_report(run_dir)
    assert path == run_dir / "report.md"
    text = path.read_text()
    s = round_summary()
    lo, hi = s["accuracy_ci"]
    assert s["accuracy"] == 0.75 and s["mean_generated_tokens"] == pytest.approx(12.0)
    table = [
        "| Run | eval.jsonl accuracy | Mean tokens |",
        "|---|---|---|",
        "| Baseline (verbal CoT) | 62.0% [52.0%, 71.0%] | 41.3 |",
        "| Direct answer (CoT closed empty) | 10.0% [5.0%, 16.0%] (2 failed) | 4.0 |",
        f"| Round 1 (abstract) | 75.0% [{100 * lo:.1f}%, {100 * hi:.1f}%] | 12.0 |",
        "| Round 2 (abstract) | — | — |",
        "| Round 3 (abstract) | — | — |",  # planned in the config, not started
    ]
    assert "\n".join(table) in text
    losses = ["| 1 | 2.5000 | 1.2500 | 1.8000 | 0.9000 |", "| 2 | 1.1000 | 1.0000 | — | — |", "| 3 | — | — | — | — |"]
    assert "\n".join(losses) in text
    d = s["diagnostics"]
    assert d["random_accuracy"] == 0.25 and d["shuffled_accuracy"] == 0.5 and d["distinct_traces"] == 3
    row = next(line for line in text.splitlines() if line.startswith(f"| 1 | 75.0% [{100 * lo:.1f}%, {100 * hi:.1f}%]"))
    assert d["verdict"].startswith("TRACE CARRIES NO INFORMATION: ")
    for cell in ["| 25.0% |", "| 50.0% |", f"{d['entropy_nats']:.2f} of 4.16", "| 3 of 4 |", "4.0 (min 3, max 6)",
                 "| TRACE CARRIES NO INFORMATION |"]:
        assert cell in row
    assert "| 2 | — | — | — | — | — | — | — |" in text
    assert "[    3,     4)  ############################## 2" in text  # two traces of length 3
    assert "round_1/phase_a/metrics.jsonl: 1 malformed or non-finite line(s) skipped" in text
    for name in ("loss_curves.png", "accuracy_vs_tokens.png"):
        data = (run_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_report_of_an_empty_or_damaged_run(tmp_path, run_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    text = write_report(empty).read_text()
    assert "| Run | Eval accuracy | Mean tokens |\n|---|---|---|\n| Baseline (verbal CoT) | — | — |\n\n" in text
    assert "| Direct answer" not in text and "Chance:" not in text
    write_report(run_dir)
    assert (empty / "loss_curves.png").read_bytes() != (run_dir / "loss_curves.png").read_bytes()
    assert (empty / "accuracy_vs_tokens.png").read_bytes() != (run_dir / "accuracy_vs_tokens.png").read_bytes()

    write(run_dir / "round_1/eval/summary.json", "{not json")  # e.g. written by hand and broken
    write(run_dir / "state.json", "[]")
    text = write_report(run_dir).read_text()
    assert "| Round 1 (abstract) | — | — |" in text and "Round 3" not in text  # rounds from directories only
    assert "round_1/eval/summary.json: unreadable" in text and "state.json: not a JSON object" in text


def test_report_needs_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory"):
        write_report(tmp_path / "missing")


def test_demo_report_states_chance_and_how_to_read_it(run_dir):
    text = write_report(run_dir).read_text()
    assert "Chance: 10.0% (the toy task's answer is one digit, 0-9)." in text
    guide = text.split("## How to read this\n\n")[1].split("\n\n")[0]
    for phrase in ["**Own / random / shuffled trace**", "ln 64 = 4.16", '"4.03 of 4.16"', "**Distinct traces**",
                   "**A null trace**", "TRACE CARRIES NO INFORMATION", "here near chance", "docs/variants.md"]:
        assert phrase in guide
    # Every accuracy in the tables is a percentage: no fraction such as 0.250 is left.
    tables = [line for line in text.splitlines() if line.startswith("| ") and "%" in line]
    assert tables and not any(re.search(r"\b0\.\d{3}\b", line) for line in tables)


def test_no_chance_level_for_a_task_without_one(tmp_path):
    run = tmp_path / "math_run"
    write(run / "round_1/eval/summary.json", json.dumps({**round_summary("Algebra"), "dataset": "MATH-500"}))
    text = write_report(run).read_text()
    assert "| Run | MATH-500 accuracy |" in text and "Chance" not in text and "chance" not in text.split(
        "## How to read this")[1].split("The paper's")[0]
    ax = accuracy_figure(load_run(run)).axes[0]
    assert not [t for t in ax.texts if t.get_text().startswith("chance")]


@pytest.mark.parametrize("source, header", [("runs/demo/data/eval.jsonl", "eval.jsonl"),
                                            ("HuggingFaceH4/MATH-500", "MATH-500")])
def test_partial_run_names_the_configured_data(tmp_path, source, header):
    """No evaluation yet: the header names the config's data.eval, not MATH-500 for every file."""
    run = tmp_path / "partial"
    write(run / "state.json", json.dumps({"done": {}, "config": {"name": "p", "rounds": 1, "data": {"eval": source}}}))
    assert f"| Run | {header} accuracy | Mean tokens |" in write_report(run).read_text()


def test_accuracy_plot_labels_do_not_overlap_and_chance_is_drawn(run_dir):
    """The demo's figures (docs/BENCHMARKS.md): the two rounds sit so close that labels at the
    same offset would overlap; the drawn label boxes (matplotlib's extents) do not."""
    points = {"baseline/verbal": (0.61, 34.0), "baseline/direct": (0.08, 32.8), "round_1/eval": (0.11, 15.2),
              "round_2/eval": (0.10, 16.0)}
    for where, (acc, tokens) in points.items():
        summary = {**round_summary(), "accuracy": acc, "accuracy_ci": [acc - 0.05, acc + 0.05],
                   "mean_generated_tokens": tokens}
        write(run_dir / where / "summary.json", json.dumps(summary))
    fig = accuracy_figure(load_run(run_dir))
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    texts = [t for t in ax.texts if t.get_text()]
    assert sorted(t.get_text() for t in texts) == sorted(
        ["Baseline (verbal CoT)", "Direct answer (CoT closed empty)", "round 1", "round 2", "chance 10.0%"])
    boxes = [t.get_window_extent(renderer) for t in texts]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
    # Without moving them, "round 1" and "round 2" would overlap: their points are closer than a box.
    r1, r2 = (ax.transData.transform((tokens, acc)) for acc, tokens in (points["round_1/eval"], points["round_2/eval"]))
    box = next(t for t in texts if t.get_text() == "round 1").get_window_extent(renderer)
    assert abs(r1[0] - r2[0]) < box.width and abs(r1[1] - r2[1]) < box.height
    chance_lines = [line for line in ax.lines if list(line.get_ydata()) == [0.1, 0.1]]
    assert len(chance_lines) == 1


def test_rl_section_table_and_plot(run_dir):
    """A run with an rl stage: its evaluation in the accuracy and diagnostics tables, and one panel a
    figure per step (reward, rollout accuracy, KL, trace length) with the held-out accuracy drawn."""
    steps = [{"step": 1, "reward": 0.25, "accuracy": 0.125, "kl": 0.0, "trace_length": 10.5, "loss": 0.1},
             {"step": 2, "reward": 0.5, "accuracy": 0.375, "kl": 0.002, "trace_length": 8.0, "loss": 0.2},
             {"step": 3, "reward": 0.75, "accuracy": 0.5, "kl": 0.004, "trace_length": None, "loss": 0.3}]
    write(run_dir / "rl/metrics.jsonl", "".join(json.dumps(s) + "\n" for s in steps) + '{"reward": 1.0}\n')
    write(run_dir / "rl/eval/summary.json", json.dumps(round_summary()))
    state = json.loads((run_dir / "state.json").read_text())
    state["done"]["rl"] = {"mode": "abstract", "reward": "toy", "steps": 3, "first_reward": 0.25, "final_reward": 0.75,
                           "first_accuracy": 0.125, "final_accuracy": 0.5, "final_kl": 0.004}
    write(run_dir / "state.json", json.dumps(state))

    text = write_report(run_dir).read_text()
    s = round_summary()
    lo, hi = s["accuracy_ci"]
    accuracy = f"75.0% [{100 * lo:.1f}%, {100 * hi:.1f}%]"
    assert f"| RL (abstract) | {accuracy} | 12.0 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| RL | "))
    assert row.startswith(f"| RL | {accuracy} | 25.0% | 50.0% | ") and row.endswith("| TRACE CARRIES NO INFORMATION |")
    assert "| abstract | toy | 3 | 0.2500 -> 0.7500 | 12.5% -> 50.0% | 0.004 |" in text
    assert f"Held-out evaluation of the RL model (rl_eval): {accuracy}, mean tokens 12.0" in text
    assert "![RL per step](rl_curves.png)" in text
    assert "rl/metrics.jsonl: 1 malformed line(s) skipped" in text  # the line without a step
    data = (run_dir / "rl_curves.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000

    fig = rl_figure(load_run(run_dir)["rl_steps"], s["accuracy"])
    panels = {ax.get_title(): ax for ax in fig.axes}
    expected = {"mean reward": [0.25, 0.5, 0.75], "accuracy of the rollouts": [0.125, 0.375, 0.5],
                "KL to the reference": [0.0, 0.002, 0.004], "mean trace length (tokens)": [10.5, 8.0]}
    for title, values in expected.items():
        line = panels[title].lines[0]
        assert list(line.get_ydata()) == values and list(line.get_xdata()) == [1, 2, 3][:len(values)]
    held_out = panels["accuracy of the rollouts"].lines[1]
    assert list(held_out.get_ydata()) == [0.75, 0.75] and held_out.get_linestyle() == "--"


def test_no_rl_section_without_an_rl_stage(run_dir):
    text = write_report(run_dir).read_text()
    assert "## RL" not in text and "| RL" not in text and not (run_dir / "rl_curves.png").exists()
