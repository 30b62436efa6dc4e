"""The run report's PNG plots (matplotlib is imported only when a report is written)."""
from __future__ import annotations

from pathlib import Path

from abscot_jax.files import replaced
from abscot_jax.rl.curves import rl_figure
from abscot_jax.report import BASELINES, PHASES, as_number, chance_level, fmt_percent, rl_label


def save_figure(fig, path: Path) -> None:
    with replaced(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")


def plot_losses(run: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, ph in zip(axes, PHASES):
        drawn = False
        for t, r in run["rounds"].items():
            points = r["losses"][ph]
            if points:
                ax.plot(*zip(*points), label=f"round {t}")
                drawn = True
        ax.set(title=f"Phase {ph.upper()}", xlabel="step", ylabel="loss")
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
    save_figure(fig, path)
    plt.close(fig)


def accuracy_figure(run: dict):
    """Accuracy (with its CI) against mean generated tokens, one labelled point per evaluation, the
    chance line where the task has one; labels moved apart until none overlaps another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    def point(summary):
        acc, tokens = as_number((summary or {}).get("accuracy")), as_number((summary or {}).get("mean_generated_tokens"))
        return None if acc is None or tokens is None else (tokens, acc, (summary or {}).get("accuracy_ci"))

    fig, ax = plt.subplots(figsize=(6, 4.5))
    labelled = [(label, point(run["baselines"][mode])) for mode, label in BASELINES]
    labelled += [(f"round {t}", point(r["eval"])) for t, r in run["rounds"].items()]
    labelled.append((rl_label(run), point(run["rl_eval"])))
    drawn = [(label, p) for label, p in labelled if p is not None]
    labels = []
    for label, (tokens, acc, ci) in drawn:
        err = None
        if isinstance(ci, list) and len(ci) == 2 and all(as_number(c) is not None for c in ci):
            err = [[max(0.0, acc - ci[0])], [max(0.0, ci[1] - acc)]]
        ax.errorbar([tokens], [acc], yerr=err, fmt="o", capsize=3)
        labels.append(ax.annotate(label, (tokens, acc), textcoords="offset points", xytext=(5, 5)))
    rounds = [p for label, p in drawn if label.startswith("round")]
    if len(rounds) > 1:
        ax.plot([p[0] for p in rounds], [p[1] for p in rounds], "--", color="grey")
    chance = chance_level(run)
    fixed = []
    if chance:
        ax.axhline(chance[0], linestyle=":", color="black", linewidth=1)
        # Outside the plot area, right of its end: it covers no point.
        fixed.append(ax.annotate(f"chance {fmt_percent(chance[0])}", (1, chance[0]), xycoords=("axes fraction", "data"),
                                 textcoords="offset points", xytext=(3, 0), ha="left", va="center"))
    if not drawn:
        ax.text(0.5, 0.5, "no evaluations yet", ha="center", va="center", transform=ax.transAxes)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set(xlabel="mean generated tokens", ylabel="accuracy", title="Accuracy vs mean tokens")
    _separate_labels(fig, fixed, labels)
    return fig


def _separate_labels(fig, fixed, labels, gap: float = 2.0) -> None:
    """Move each label up (in points) until its box overlaps neither a fixed text nor a label
    placed before it; labels are placed from the lowest point up."""
    fig.canvas.draw()  # fixes the axis limits the labels' positions depend on
    renderer = fig.canvas.get_renderer()
    taken = [text.get_window_extent(renderer) for text in fixed]
    for label in sorted(labels, key=lambda a: (a.xy[1], a.xy[0])):
        for _ in range(100):
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in taken):
                break
            x, y = label.xyann
            label.xyann = (x, y + box.height * 72 / fig.dpi + gap)
        taken.append(label.get_window_extent(renderer))


def plot_accuracy_vs_tokens(run: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = accuracy_figure(run)
    save_figure(fig, path)
    plt.close(fig)


def plot_rl(run: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = rl_figure(run["rl_steps"], as_number((run["rl_eval"] or {}).get("accuracy")))
    save_figure(fig, path)
    plt.close(fig)
