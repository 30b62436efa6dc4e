"""The rl stage's per-step figures, read from RUN/rl/metrics.jsonl (abscot_jax/rl/loop.py writes
one JSON object a step), and their plot: the run report's RL section draws it, the toy study
records the reward curve. Imports matplotlib only to draw."""
from __future__ import annotations

import json
import math
from pathlib import Path

# metrics.jsonl key -> the panel's title
STEP_FIGURES = {"reward": "mean reward", "accuracy": "accuracy of the rollouts", "kl": "KL to the reference",
                "trace_length": "mean trace length (tokens)"}


def read_steps(path: Path, problems: list[str]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per STEP_FIGURES key, for each line that has a finite number there (verbal mode
    has no trace length: its values are null). Lines that are not a JSON object with an integer
    step are skipped and counted in `problems`."""
    steps = {key: [] for key in STEP_FIGURES}
    if not path.is_file():
        return steps
    bad = 0
    for line in filter(str.strip, path.read_text().splitlines()):
        try:
            row = json.loads(line)
            step = row["step"]
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        if not isinstance(step, int) or isinstance(step, bool):
            bad += 1
            continue
        for key, points in steps.items():
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                points.append((step, float(value)))
    if bad:
        problems.append(f"{path}: {bad} malformed line(s) skipped")
    return {key: sorted(points) for key, points in steps.items()}


def rl_figure(steps: dict[str, list[tuple[int, float]]], held_out_accuracy: float | None):
    """One panel per STEP_FIGURES key against the step; the accuracy panel also draws the rl_eval
    accuracy on the held-out problems (dashed), when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title) in zip(axes.flat, STEP_FIGURES.items()):
        if steps[key]:
            ax.plot(*zip(*steps[key]), "o-", markersize=3)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        if key == "accuracy" and held_out_accuracy is not None:
            ax.axhline(held_out_accuracy, linestyle="--", color="grey", label="held-out (rl_eval)")
            ax.legend()
        ax.set(title=title, xlabel="rl step")
    fig.tight_layout()
    return fig
