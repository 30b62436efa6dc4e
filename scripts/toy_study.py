"""The trace variants (docs/variants.md) on the toy task, round by round: `python scripts/toy_study.py`.

One shared start under OUT/shared: the demo's tiny model and toy data (abscot_jax.demo), its
verbal-CoT warm-up and the verbal-CoT and direct-answer baselines. Then every variant runs T
rounds under OUT/<variant> through the round driver (abscot_jax.rounds.run), its run directory
pointing at the shared start: base/, warmup/ and baseline/ are links to OUT/shared, splits.json is
the same file, and those stages are marked done in its state.json. So the variants differ only in
what the variant changes, and the warm-up runs once.

Writes OUT/study.md (the tables), OUT/study.png (per-round plots) and OUT/study.json (every
figure). Sizes are the demo's, changed with --rounds, --k and --set (applied to every run), e.g.
`--set data.examples_per_phase=200 --set eval.limit=50`. Rerunning skips finished stages.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from abscot_jax import demo, report, rounds  # noqa: E402
from abscot_jax.data.toy import partial_sums  # noqa: E402
from abscot_jax.stages.context import RunContext  # noqa: E402
from abscot_jax.variants import mutual_information  # noqa: E402

# name -> config overrides (`variants.k` comes from --k)
VARIANTS = {
    "paper": [],
    "two_pass": ["variants.bottleneck=two_pass"],
    "two_pass+best_of_k": ["variants.bottleneck=two_pass", "variants.trace_selection=best_of_k"],
    # scored by the joint log p(z, y | x): the trace must also be likely from x alone (design notes)
    "two_pass+best_of_k+prior": ["variants.bottleneck=two_pass", "variants.trace_selection=best_of_k",
                                 "variants.trace_prior_weight=1"],
    "cot_codes": ["variants.round1_traces=cot_codes"],
    "cot_codes+two_pass": ["variants.round1_traces=cot_codes", "variants.bottleneck=two_pass"],
}
SHARED = "shared"
SHARED_PATHS = ("base", "warmup", "baseline")  # linked into every variant's run directory
CHANCE = 0.1  # ten possible answers
COLUMNS = ("Variant", "Round", *report.DIAGNOSTICS_COLUMNS, "Own / verbal", "Mean generated tokens",
           "Wall (s)", "CPU (s)")
TRACE_FILES = (("traces_a", "Phase A traces"), ("traces_b", "Phase B traces (on x)"), ("eval", "Eval traces (on x)"))


def is_setup_stage(key: str) -> bool:
    return key in ("prepare_base", "warmup") or key.startswith("baseline_")


def share_start(shared: rounds.Ledger, run_dir: Path) -> None:
    """Point a new run directory at the shared start (links, splits.json, setup stages done)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in SHARED_PATHS:
        link = run_dir / name
        if (shared.dir / name).exists() and not link.is_symlink():
            link.symlink_to(Path("..") / shared.dir.name / name)  # relative: OUT stays movable
    if not (run_dir / "splits.json").exists():
        shutil.copyfile(shared.dir / "splits.json", run_dir / "splits.json")
    state_path = run_dir / "state.json"
    if not state_path.exists():
        done = {k: v for k, v in shared.state["done"].items() if is_setup_stage(k)}
        rounds.write_json(state_path, {"done": done})


def round_seconds(state: dict, t: int) -> dict:
    """Wall and CPU seconds of round t's stages (as recorded in state.json)."""
    stages = [v for k, v in state.get("seconds", {}).items() if k.startswith(f"round_{t}/")]
    return {"wall": sum(s["wall"] for s in stages), "cpu": sum(s["cpu"] for s in stages)} if stages else {}


# ---- does a trace encode the partial sums? ------------------------------------------------------

def trace_sum_pairs(traces: dict[str, list[int]], questions: dict[str, str]) -> tuple[list[int], list[int]]:
    """(trace token j, partial sum j) over every trace and j < min(trace length, steps): with one
    code per step (cot_codes), token j is step j's code."""
    tokens, sums = [], []
    for key, trace in traces.items():
        s = partial_sums(questions[key])
        n = min(len(trace), len(s))
        tokens += list(trace[:n])
        sums += s[:n]
    return tokens, sums


def trace_information(tokens: list[int], sums: list[int], seed: int = 0) -> dict | None:
    """MI (nats) between trace token and partial sum, and the same with the sums shuffled across
    pairs (the plug-in estimator's bias at this sample size)."""
    if not tokens:
        return None
    shuffled = np.random.default_rng(seed).permutation(sums)
    return {"mi": mutual_information(tokens, sums), "mi_shuffled": mutual_information(tokens, shuffled),
            "pairs": len(tokens)}


def eval_traces(eval_dir: Path) -> dict[str, list[int]]:
    path = eval_dir / "results.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {f"{r['id']}#{r['sample']}": r["trace_ids"] for r in records if r["trace_ids"]}


def trace_sums_of_round(run: RunContext, t: int, eval_questions: dict[str, str]) -> dict:
    rd = run.round_dir(t)
    train_questions = {e.id: e.prompt_messages[-1]["content"] for e in run.examples().values()}
    out = {}
    for name, _ in TRACE_FILES:
        if name == "eval":
            traces = eval_traces(rd / "eval")
            questions = {key: eval_questions[key.rsplit("#", 1)[0]] for key in traces}
        else:
            path = rd / f"{name}.json"
            traces = json.loads(path.read_text()) if path.exists() else {}
            questions = train_questions
        out[name] = trace_information(*trace_sum_pairs(traces, questions))
    return out


# ---- tables and plots ---------------------------------------------------------------------------

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
    report.save_figure(fig, path)
    plt.close(fig)


# ---- the study ----------------------------------------------------------------------------------

def variant_config(out: Path, name: str, args):
    return demo.demo_config([f"run_dir={out}", f"name={name}", f"rounds={args.rounds}", f"variants.k={args.k}",
                             *args.set, *VARIANTS.get(name, [])])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/toy_study", help="study directory (default runs/toy_study)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per variant (default 2)")
    p.add_argument("--k", type=int, default=4, help="best_of_k: candidates per example (default 4)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting of every run")
    args = p.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    out = Path(args.out)
    started = time.perf_counter()

    from abscot_jax.checkpoint import USER_ERRORS

    try:
        cfg = variant_config(out, SHARED, args)
        for name in names:
            variant_config(out, name, args)  # every run's settings are valid before anything runs
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    demo.prepare_inputs(cfg, out / SHARED)
    shared = rounds.Ledger(cfg)
    for stage in rounds.setup_stages(cfg):
        shared.run(stage)
    RunContext(cfg).split("warmup")  # writes splits.json (if the warm-up did not)
    eval_questions = {}
    for line in Path(cfg.data.eval).read_text().splitlines():
        row = json.loads(line)
        eval_questions[row["unique_id"]] = row["problem"]

    study = {"settings": {"rounds": args.rounds, "k": args.k, "set": args.set, "model": demo.TINY_MODEL,
                          "task": demo.TOY_TASK, "variants": {n: VARIANTS[n] for n in names}},
             "reference": report.load_run(shared.dir)["baselines"],
             "shared_seconds": shared.state.get("seconds", {}), "variants": {}}
    d, e = cfg.data, cfg.eval
    study["settings_line"] = (
        f"Tiny Qwen3 ({demo.TINY_MODEL['num_hidden_layers']} layers, hidden {demo.TINY_MODEL['hidden_size']}), "
        f"running sums mod 10 of {demo.TOY_TASK['min_digits']}-{demo.TOY_TASK['max_digits']} digits; shared warm-up on "
        f"{d.warmup_examples} examples; {args.rounds} round(s) per variant, {d.examples_per_phase} examples per phase; "
        f"best_of_k k={args.k}; {e.limit or 'all'} held-out problems; eval trace m_min {e.m_min}, m_max {d.m_max}, "
        f"temperature {e.trace_temperature}.")
    for name in names:
        vcfg = variant_config(out, name, args)
        vcfg.model.hf_dir, vcfg.data.train, vcfg.data.eval = cfg.model.hf_dir, cfg.data.train, cfg.data.eval
        share_start(shared, out / name)
        run = rounds.run(vcfg, list(range(1, args.rounds + 1)))
        loaded = report.load_run(run.dir)
        study["variants"][name] = {"rounds": {
            t: {"eval": loaded["rounds"][t]["eval"], "seconds": round_seconds(run.state, t),
                "information": trace_sums_of_round(RunContext(vcfg), t, eval_questions)}
            for t in range(1, args.rounds + 1)}}
        _write(out, study)
    study["wall_seconds_this_invocation"] = time.perf_counter() - started
    study["cpu_seconds_this_invocation"] = sum(  # this process and its stage processes
        u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
    _write(out, study)
    print((out / "study.md").read_text())
    return 0


def _write(out: Path, study: dict) -> None:
    """study.json, study.md and study.png, each under a temporary name, then renamed."""
    rounds.write_json(out / "study.json", study)
    tmp = out / ".study.md.tmp"
    tmp.write_text(render(study))
    os.replace(tmp, out / "study.md")
    plot(study, out / "study.png")


if __name__ == "__main__":
    sys.exit(main())
