"""The report of a run directory: `report.md` and PNG plots, from the files the stages wrote.

Reads (every piece optional; what is missing shows as "—"):

    RUN/state.json                          {"config": {"name", "rounds", ...}, ...}
    RUN/baseline/verbal/summary.json        evaluation summaries (abscot_jax.eval.evaluate)
    RUN/baseline/direct/summary.json
    RUN/round_T/phase_a/metrics.jsonl       one JSON a step: step, loss, trace_loss, answer_loss, ...
    RUN/round_T/phase_b/metrics.jsonl
    RUN/round_T/eval/summary.json
    RUN/rl/metrics.jsonl, RUN/rl/eval/summary.json   the rl stage's steps and its model's evaluation

Writes RUN/report.md, RUN/loss_curves.png and RUN/accuracy_vs_tokens.png (and, for a run with an
rl stage, RUN/rl_curves.png), each under a temporary name, then renamed. Rounds are those with a round_T directory and 1..config.rounds. Accuracies
are percentages throughout; where the task defines a chance level (the toy task's one-digit
answers) the report states it and the accuracy plot draws it.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from abscot_jax.files import replace_text
from abscot_jax.rl.curves import read_steps

DASH = "—"
PHASES = ("a", "b")
BASELINES = (("verbal", "Baseline (verbal CoT)"), ("direct", "Direct answer (CoT closed empty)"))
LOSS_PLOT, ACCURACY_PLOT, RL_PLOT = "loss_curves.png", "accuracy_vs_tokens.png", "rl_curves.png"
MATH500_HUB_ID = "HuggingFaceH4/MATH-500"
# Chance accuracy of the tasks that define one, by the subject their evaluation problems carry:
# the toy task (abscot_jax/data/toy.py) answers with one digit, 0-9.
TASK_CHANCE = {"Running sums": (0.10, "the toy task's answer is one digit, 0-9")}


# ---- reading ----------------------------------------------------------------------------------

def _read_json(path: Path, problems: list[str]):
    """The JSON object at `path`, or None when missing; an unreadable file is noted in `problems`."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        problems.append(f"{path}: unreadable ({type(e).__name__}: {e})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: not a JSON object")
        return None
    return data


def _read_metrics(path: Path, problems: list[str]) -> list[tuple[float, float]]:
    """(step, loss) per well-formed line; malformed lines are skipped and counted."""
    if not path.is_file():
        return []
    points, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step, loss = float(row["step"]), float(row["loss"])
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        if math.isfinite(loss):
            points.append((step, loss))
        else:
            bad += 1
    if bad:
        problems.append(f"{path}: {bad} malformed or non-finite line(s) skipped")
    return sorted(points)


def _round_numbers(run_dir: Path, state: dict | None) -> list[int]:
    found = {int(m.group(1)) for p in run_dir.iterdir() if p.is_dir() and (m := re.fullmatch(r"round_(\d+)", p.name))}
    planned = (state or {}).get("config", {}).get("rounds") if isinstance((state or {}).get("config"), dict) else None
    if isinstance(planned, int) and not isinstance(planned, bool) and 0 < planned < 1000:
        found |= set(range(1, planned + 1))
    return sorted(found)


def load_run(run_dir: str | Path) -> dict:
    """Everything the report shows, as plain data (missing pieces are None / empty)."""
    run_dir = Path(run_dir)
    problems: list[str] = []
    state = _read_json(run_dir / "state.json", problems)
    baselines = {mode: _read_json(run_dir / "baseline" / mode / "summary.json", problems) for mode, _ in BASELINES}
    rounds = {}
    for t in _round_numbers(run_dir, state):
        rd = run_dir / f"round_{t}"
        rounds[t] = {"eval": _read_json(rd / "eval" / "summary.json", problems),
                     "losses": {ph: _read_metrics(rd / f"phase_{ph}" / "metrics.jsonl", problems) for ph in PHASES}}
    config = (state or {}).get("config")
    config = config if isinstance(config, dict) else {}
    rl = ((state or {}).get("done") or {}).get("rl")  # what the rl stage returned (abscot_jax/stages/rl.py)
    return {"name": config.get("name") or run_dir.name, "baselines": baselines, "rounds": rounds,
            "problems": problems, "eval_data": (config.get("data") or {}).get("eval"),
            "rl": rl if isinstance(rl, dict) else None,
            "rl_steps": read_steps(run_dir / "rl" / "metrics.jsonl", problems),
            "rl_eval": _read_json(run_dir / "rl" / "eval" / "summary.json", problems)}


def has_rl(run: dict) -> bool:
    """Whether the run has an rl stage to show (finished, or with steps or an evaluation written)."""
    return bool(run["rl"] or run["rl_eval"] or any(run["rl_steps"].values()))


def rl_label(run: dict) -> str:
    """"RL (abstract)": the rl stage's model, in the mode its evaluation ran in."""
    return f"RL ({(run['rl_eval'] or run['rl'] or {}).get('mode', DASH)})"


def _summaries(run: dict) -> list[dict]:
    return ([s for s in run["baselines"].values() if s] + [r["eval"] for r in run["rounds"].values() if r["eval"]]
            + ([run["rl_eval"]] if run["rl_eval"] else []))


def dataset_label(run: dict) -> str:
    """The evaluation data's name: from the summaries, else from the config's data.eval (named as
    the evaluation names it: MATH-500 or the file's name), else none known."""
    named = [s["dataset"] for s in _summaries(run) if isinstance(s.get("dataset"), str)]
    if named:
        return named[0]
    source = run.get("eval_data")
    if isinstance(source, str) and source:
        return "MATH-500" if source in ("math500", MATH500_HUB_ID) else Path(source).name
    return "Eval"


def chance_level(run: dict) -> tuple[float, str] | None:
    """(chance accuracy, why) when every evaluated problem's subject is a task that defines one."""
    subjects = {name for s in _summaries(run) if isinstance(s.get("by_subject"), dict) for name in s["by_subject"]}
    levels = {TASK_CHANCE.get(name) for name in subjects}
    return levels.pop() if len(levels) == 1 and None not in levels else None


# ---- formatting -------------------------------------------------------------------------------

def as_number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def fmt_accuracy(summary: dict | None) -> str:
    """'62.0% [52.0%, 71.0%]' (the 95% CI), with pass@1 sd and errors when there are any."""
    acc = as_number((summary or {}).get("accuracy"))
    if acc is None:
        return DASH
    text = f"{100 * acc:.1f}%"
    ci = summary.get("accuracy_ci")
    if isinstance(ci, list) and len(ci) == 2 and all(as_number(c) is not None for c in ci):
        text += f" [{100 * ci[0]:.1f}%, {100 * ci[1]:.1f}%]"
    p1 = summary.get("pass_at_1")
    if isinstance(p1, dict) and as_number(p1.get("sd")) is not None:
        text += f" (k={summary.get('samples_per_problem')}, pass@1 sd {100 * p1['sd']:.1f}%)"
    if as_number(summary.get("errors")):
        text += f" ({summary['errors']} failed)"
    return text


def fmt_number(x, spec: str = ".1f") -> str:
    x = as_number(x)
    return DASH if x is None else format(x, spec)


def fmt_percent(x) -> str:
    """A fraction as a percentage: 0.125 -> '12.5%'."""
    x = as_number(x)
    return DASH if x is None else f"{100 * x:.1f}%"


DIAGNOSTICS_COLUMNS = ("Own trace", "Random trace", "Shuffled trace", "Entropy (nats)", "Distinct traces",
                       "Mean trace length")


def diagnostics_cells(d: dict | None) -> list[str]:
    """The cells of DIAGNOSTICS_COLUMNS for an evaluation's `diagnostics` (dashes when missing)."""
    if not isinstance(d, dict):
        return [DASH] * len(DIAGNOSTICS_COLUMNS)
    length = d.get("trace_length") or {}
    ci = d.get("own_accuracy_ci") or [None, None]
    return [f"{fmt_percent(d.get('own_accuracy'))} [{fmt_percent(ci[0])}, {fmt_percent(ci[1])}]",
            fmt_percent(d.get("random_accuracy")), fmt_percent(d.get("shuffled_accuracy")),
            f"{fmt_number(d.get('entropy_nats'), '.2f')} of {fmt_number(d.get('entropy_max_nats'), '.2f')}",
            f"{d.get('distinct_traces', DASH)} of {d.get('n_traces', DASH)}",
            f"{fmt_number(length.get('mean'))} (min {length.get('min', DASH)}, max {length.get('max', DASH)})"]


def _histogram_text(hist: dict | None, width: int = 30) -> list[str]:
    try:
        edges, counts = hist["edges"], hist["counts"]
    except (TypeError, KeyError):
        return []
    nonzero = [i for i, c in enumerate(counts) if c]
    if not nonzero:
        return []
    top = max(counts)
    lines = []
    for i in range(nonzero[0], nonzero[-1] + 1):
        bar = "#" * max(1 if counts[i] else 0, round(width * counts[i] / top))
        lines.append(f"  [{edges[i]:>5g}, {edges[i + 1]:>5g})  {bar} {counts[i]}")
    return lines


def verdict_headline(verdict) -> str:
    """The verdict's class ("TRACE CARRIES NO INFORMATION", ...) without its numbers, which the
    table's cells give as percentages; with the note on token order when it has one."""
    if not isinstance(verdict, str) or not verdict:
        return DASH
    head, _, rest = verdict.partition(":")
    return head + (" (its token order carries none)" if "its token order carries none" in rest else "")


def reading_guide(chance: tuple[float, str] | None) -> list[str]:
    """The "How to read this" section."""
    chance_text = f" Chance is {fmt_percent(chance[0])} ({chance[1]})." if chance else ""
    return [
        "## How to read this", "",
        f"- **Accuracy**: the share of held-out problems answered correctly (the last `\\boxed{{}}` against the "
        f"gold answer), with the 95% CI over problems.{chance_text} **Baseline (verbal CoT)**: the starting model "
        "writing its own chain of thought. **Direct answer (CoT closed empty)**: the same model with its CoT "
        "block closed before it writes, so no verbal CoT is asked for; a model may still write some reasoning "
        "in its answer, which its mean tokens show.",
        "- **Own / random / shuffled trace**: the round's model answering after its own sampled trace, after a "
        "uniformly random trace of the same length, and after its own trace's tokens in shuffled order. A trace "
        "that carries what the answer needs makes own beat random by more than own's CI; shuffled says whether "
        "the order of its tokens matters.",
        "- **Entropy**: of the abstract tokens, pooled over all traces, in nats. Its maximum is ln 64 = 4.16, "
        "reached when all 64 tokens occur equally often; an estimate from a sample of traces sits slightly "
        "below the true value, so \"4.03 of 4.16\" means traces that use all 64 tokens almost evenly. That is "
        "what random tokens look like; it does not show that a trace depends on its problem.",
        "- **Distinct traces**: how many traces differ as token sequences. Traces sampled at a temperature "
        "above 0 are nearly all distinct whether or not they carry information.",
        "- **A null trace** carries no information: own, random and shuffled accuracy agree within the CI "
        "(verdict TRACE CARRIES NO INFORMATION), entropy is near its maximum and every trace is distinct; the "
        "model answers as well without its trace" + (", here near chance." if chance else ".") + " The paper's "
        "method (the default `variants`) gives a null trace on the toy task (running sums mod 10): in Phase A "
        "the answer reads the CoT through the trace positions' hidden states, so nothing pushes information "
        "into the trace tokens (docs/method.md). docs/variants.md describes the variants that give the trace a "
        "reason to carry information.", "",
    ]


def render_markdown(run: dict) -> str:
    chance = chance_level(run)
    out = [f"# Abstract-CoT run: {run['name']}", "", f"| Run | {dataset_label(run)} accuracy | Mean tokens |",
           "|---|---|---|"]
    for mode, label in BASELINES:
        summary = run["baselines"][mode]
        if summary is not None or mode == "verbal":  # the direct answer only when it was evaluated
            out.append(f"| {label} | {fmt_accuracy(summary)} | {fmt_number((summary or {}).get('mean_generated_tokens'))} |")
    for t, r in run["rounds"].items():
        out.append(f"| Round {t} (abstract) | {fmt_accuracy(r['eval'])} | "
                   f"{fmt_number((r['eval'] or {}).get('mean_generated_tokens'))} |")
    if run["rl_eval"]:
        out.append(f"| {rl_label(run)} | {fmt_accuracy(run['rl_eval'])} | "
                   f"{fmt_number(run['rl_eval'].get('mean_generated_tokens'))} |")
    out += ["", "Accuracy: mean over problems (and samples) with the 95% bootstrap CI over problems. Mean tokens: "
            "everything generated (trace and its delimiters, answer, end of turn)."
            + (f" Chance: {fmt_percent(chance[0])} ({chance[1]})." if chance else ""), ""]

    out += ["## Trace diagnostics", "",
            "Accuracy with the model's own trace, a random trace of the same length and its own tokens shuffled; "
            "a trace carries information only if own beats random by more than the CI.", "",
            "| Round | " + " | ".join(DIAGNOSTICS_COLUMNS) + " | Verdict |", "|---" * (len(DIAGNOSTICS_COLUMNS) + 2) + "|"]
    for t, r in run["rounds"].items():
        d = (r["eval"] or {}).get("diagnostics")
        cells = diagnostics_cells(d) + [verdict_headline(d.get("verdict")) if isinstance(d, dict) else DASH]
        out.append(f"| {t} | " + " | ".join(cells) + " |")
    d = (run["rl_eval"] or {}).get("diagnostics")
    if isinstance(d, dict):
        out.append("| RL | " + " | ".join(diagnostics_cells(d) + [verdict_headline(d.get("verdict"))]) + " |")
    out += ["", *reading_guide(chance)]

    out += ["## Training loss (first and last step)", "",
            "| Round | Phase A start | Phase A end | Phase B start | Phase B end |", "|---|---|---|---|---|"]
    for t, r in run["rounds"].items():
        cells = []
        for ph in PHASES:
            points = r["losses"][ph]
            cells += [fmt_number(points[0][1], ".4f"), fmt_number(points[-1][1], ".4f")] if points else [DASH, DASH]
        out.append(f"| {t} | " + " | ".join(cells) + " |")

    if has_rl(run):
        rl = run["rl"] or {}
        out += ["", "## RL (GRPO, first and last step)", "",
                "| Mode | Reward | Steps | Mean reward | Accuracy of the rollouts | KL at the end |", "|---|---|---|---|---|---|",
                f"| {rl.get('mode', DASH)} | {rl.get('reward', DASH)} | {rl.get('steps', DASH)} | "
                f"{fmt_number(rl.get('first_reward'), '.4f')} -> {fmt_number(rl.get('final_reward'), '.4f')} | "
                f"{fmt_percent(rl.get('first_accuracy'))} -> {fmt_percent(rl.get('final_accuracy'))} | "
                f"{fmt_number(rl.get('final_kl'), '.4g')} |", "",
                f"Held-out evaluation of the RL model (rl_eval): {fmt_accuracy(run['rl_eval'])}, mean tokens "
                f"{fmt_number((run['rl_eval'] or {}).get('mean_generated_tokens'))}; its trace diagnostics are the "
                "RL row above. Per step: reward, accuracy of the rollouts, KL to the reference and trace length.", "",
                f"![RL per step]({RL_PLOT})"]

    out += ["", "## Trace lengths", ""]
    for t, r in run["rounds"].items():
        d = (r["eval"] or {}).get("diagnostics")
        lines = _histogram_text(((d or {}).get("trace_length") or {}).get("histogram")) if isinstance(d, dict) else []
        out += [f"Round {t}:", "```", *(lines or [f"  {DASH}"]), "```", ""]

    out += ["## Plots", "", f"![Loss curves]({LOSS_PLOT})", "", f"![Accuracy vs mean tokens]({ACCURACY_PLOT})", ""]
    if run["problems"]:
        out += ["## Problems reading the run", "", *(f"- {p}" for p in run["problems"]), ""]
    return "\n".join(out)


def write_report(run_dir: str | Path) -> Path:
    """Write RUN/report.md and the PNG plots; returns the report's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} not found")
    from abscot_jax.report_plots import plot_accuracy_vs_tokens, plot_losses, plot_rl  # matplotlib: only here

    run = load_run(run_dir)
    plot_losses(run, run_dir / LOSS_PLOT)
    plot_accuracy_vs_tokens(run, run_dir / ACCURACY_PLOT)
    if has_rl(run):
        plot_rl(run, run_dir / RL_PLOT)
    path = run_dir / "report.md"
    replace_text(path, render_markdown(run))
    return path
