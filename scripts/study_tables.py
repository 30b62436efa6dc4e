"""The toy study's tables (study.md) and plots (study.png), from the figures in study.json."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from abscot_jax import report
from abscot_jax.report_plots import save_figure

CHANCE = 0.1  # ten possible answers
COLUMNS = ("Variant", "Round", *report.DIAGNOSTICS_COLUMNS, "Own / verbal", "Mean generated tokens",
           "Wall (s)", "CPU (s)")
TRACE_FILES = (("traces_a", "Phase A traces"), ("traces_b", "Phase B traces (on x)"), ("eval", "Eval traces (on x)"))




def figures(cells) -> str:
    """`key=0.123 …` of (key, value) pairs; nan for a missing value."""
    return " ".join(f"{k}={'nan' if v is None else f'{v:.3f}'}" for k, v in cells)


def trace_cells(evaluation: dict | None) -> list[tuple[str, float | None]]:
    """Own, random and shuffled trace accuracy of an evaluation."""
    d = (evaluation or {}).get("diagnostics") or {}
    return [("own", d.get("own_accuracy")), ("random", d.get("random_accuracy")), ("shuffled", d.get("shuffled_accuracy"))]


def fmt_information(info: dict | None) -> str:
    if not info:
        return report.DASH
    return f"{info['mi']:.3f} (shuffled {info['mi_shuffled']:.3f}; {info['pairs']} pairs)"


def render(study: dict) -> str:
    ref = study["reference"]
    verbal_acc = report.as_number((ref["verbal"] or {}).get("accuracy"))
    lines = ["# Toy study", "", study["settings_line"], "",
             "| Reference (shared start) | accuracy [95% CI] | Mean generated tokens |", "|---|---|---|"]
    for mode, label in report.BASELINES:
        s = ref[mode]
        lines.append(f"| {label} | {report.fmt_accuracy(s)} | {report.fmt_number((s or {}).get('mean_generated_tokens'))} |")
    lines += ["", f"Chance: {report.fmt_percent(CHANCE)}. Prompt -> trace -> answer accuracy is the own-trace column.", "",
              "| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    for name, v in study["variants"].items():
        for t, r in v["rounds"].items():
            d = (r["eval"] or {}).get("diagnostics")
            own = report.as_number((d or {}).get("own_accuracy"))
            ratio = own / verbal_acc if own is not None and verbal_acc else None
            cells = [name, str(t), *report.diagnostics_cells(d), report.fmt_number(ratio, ".2f"),
                     report.fmt_number((r["eval"] or {}).get("mean_generated_tokens")),
                     report.fmt_number(r["seconds"].get("wall"), ".0f"), report.fmt_number(r["seconds"].get("cpu"), ".0f")]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Do the traces encode the partial sums?", "",
              "Mutual information (nats) between trace token j and partial sum j (j < trace length, 12 steps); "
              f"H(partial sum) = ln 10 = {math.log(10):.3f}. In parentheses: the same with the sums shuffled "
              "across pairs (the estimator's bias).", "",
              "| Variant | Round | " + " | ".join(label for _, label in TRACE_FILES) + " |",
              "|---" * (2 + len(TRACE_FILES)) + "|"]
    for name, v in study["variants"].items():
        for t, r in v["rounds"].items():
            lines.append(f"| {name} | {t} | " + " | ".join(fmt_information(r["information"].get(k))
                                                         for k, _ in TRACE_FILES) + " |")
    rl_arms = {name: v["rl"] for name, v in study["variants"].items() if "rl" in v}
    if rl_arms:
        lines += ["", "## RL arms (GRPO, toy reward)", "",
                  "Before: the verbal-CoT baseline (verbal) or round 1's own-trace accuracy (abstract); after: the "
                  "RL model on the held-out problems (rl_eval).", "",
                  "| Arm | Mode | Before | After | Random trace | Shuffled trace | Reward, first -> last step | "
                  "Wall (s) |", "|---" * 8 + "|"]
        for name, arm in rl_arms.items():
            cells = dict(trace_cells(arm["eval"]))
            curve = arm["reward_curve"]
            reward = f"{curve[0][1]:.3f} -> {curve[-1][1]:.3f}" if curve else report.DASH
            wall = sum((s or {}).get("wall", 0.0) for s in arm["seconds"].values())
            lines.append(f"| {name} | {arm['mode']} | {report.fmt_percent(arm['start'])} | "
                         f"{report.fmt_percent(arm['end'])} | {report.fmt_percent(cells['random'])} | "
                         f"{report.fmt_percent(cells['shuffled'])} | {reward} | {wall:.0f} |")
    lines += ["", "![Per round](study.png)", ""]
    return "\n".join(lines)


def plot(study: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = study["reference"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [(axes[0, 0], "accuracy (solid: own trace, dotted: random trace)", "own_accuracy"),
              (axes[0, 1], "trace entropy (nats)", "entropy_nats"),
              (axes[1, 0], "distinct traces", "distinct_traces"),
              (axes[1, 1], "mean generated tokens", None)]
    for ax, title, key in panels:
        for i, (name, v) in enumerate(study["variants"].items()):
            ts = list(v["rounds"])
            diag = [(v["rounds"][t]["eval"] or {}).get("diagnostics") or {} for t in ts]
            if key is None:
                ys = [(v["rounds"][t]["eval"] or {}).get("mean_generated_tokens") for t in ts]
            else:
                ys = [d.get(key) for d in diag]
            color = f"C{i}"
            ax.plot(ts, [np.nan if y is None else y for y in ys], "o-", color=color, label=name)
            if key == "own_accuracy":
                ax.plot(ts, [d.get("random_accuracy", np.nan) for d in diag], "o:", color=color)
        if key in ("own_accuracy", None):
            field = "accuracy" if key else "mean_generated_tokens"
            for mode, style in (("verbal", "--"), ("direct", "-.")):
                y = (ref[mode] or {}).get(field)
                if y is not None:
                    ax.axhline(y, color="grey", linestyle=style, label=f"{mode} (shared start)")
        if key == "own_accuracy":
            ax.axhline(CHANCE, color="black", linewidth=0.5, label="chance")
        ax.set(title=title, xlabel="round")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
