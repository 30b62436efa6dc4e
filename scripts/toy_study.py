"""Study arms on the toy task through the round driver: `python scripts/toy_study.py --arms A,B --out DIR`.

Arms: the trace variants (docs/variants.md; group `variants`, T rounds each, --rounds) and the
M-step arms (group `m_step`, one round on 6,000 problems a phase, after a warm-up twice the demo's):
Phase B on the CoT's own codes from the embedding layer (`control`: a bijection of the partial
sums, which must reach the verbal-CoT level), from the middle layer (its codes' rows first set from
the tokens they encode, `codes_middle_rows`, or not), on posterior samples z ~ p_A(z | x, c), the
stepwise-internalisation curriculum (codes, or steps removed) and pause tokens. `--arms m_step`
then prints `control own=… random=… shuffled=… verbal=…` and, last, `best_arm=<name> …` for
the arm whose own trace beats the random and shuffled ones by most.
The RL arms (group `rl`, docs/rl.md; on the M-step arms' shared start): GRPO with the toy reward
in verbal mode from the warm-up (`rl_verbal`, the paper's verbal SFT + RL baseline) and in abstract
mode after one round of the paper's method (`rl_paper`) and on codes_middle_rows' model (`rl_m_step`),
each evaluated on the held-out problems by its rl_eval stage. Each prints, after the lines above,
`arm=rl_verbal start=<shared verbal-CoT accuracy> end=<after RL>` or `arm=rl_paper start=<round 1
own-trace accuracy> end=<after RL> own=… random=… shuffled=…`; study.json holds their per-step
reward curves.

One shared start under OUT/shared: the demo's tiny model and toy data (abscot_jax.demo), its
verbal-CoT warm-up and the verbal-CoT and direct-answer baselines. Every arm's run directory
under OUT/<arm> points at it: base/, warmup/ and baseline/ are links to OUT/shared, its
splits.json has the same warm-up problems, and those stages are marked done in its state.json. So
the arms differ only in what the arm changes, and the warm-up runs once.

Writes OUT/study.md (the tables), OUT/study.png (per-round plots) and OUT/study.json (every
figure, Phase B's trace-loss curve included). Sizes are the demo's and the arm's, changed with
--rounds, --k and --set (applied to every run, after the arm's own settings), e.g.
`--set data.examples_per_phase=200 --set eval.limit=50`. Rerunning skips finished stages.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from abscot_jax import demo, report, rounds  # noqa: E402
from abscot_jax.data.toy import partial_sums  # noqa: E402
from abscot_jax.errors import USER_ERRORS, RunError, run_cli  # noqa: E402
from abscot_jax.files import replace_text  # noqa: E402
from abscot_jax.stages.context import RunContext  # noqa: E402
from abscot_jax.variants import mutual_information  # noqa: E402
from study_tables import TRACE_FILES, figures, plot, render, trace_cells  # noqa: E402

# name -> config overrides (`variants.k` comes from --k; --set applies after them)
VARIANTS = {
    "paper": [],
    "two_pass": ["variants.bottleneck=two_pass"],
    "two_pass+best_of_k": ["variants.bottleneck=two_pass", "variants.trace_selection=best_of_k"],
    # scored by the joint log p(z, y | x): the trace must also be likely from x alone (docs/variants.md)
    "two_pass+best_of_k+prior": ["variants.bottleneck=two_pass", "variants.trace_selection=best_of_k",
                                 "variants.trace_prior_weight=1"],
    "cot_codes": ["variants.round1_traces=cot_codes"],
    "cot_codes+two_pass": ["variants.round1_traces=cot_codes", "variants.bottleneck=two_pass"],
}
# The M-step arms: one round each, on more distinct problems per phase. Their shared start warms up
# twice as long as the demo (1,200 steps): at 600 the warm-up leaves its loss plateau on some data
# orders and not on others (docs/notes/2026-11-28-toy-warmup.md), and the control needs a model that
# has learned the sums.
M_STEP_SIZES = ["rounds=1", "data.examples_per_phase=6000", "train.epochs=2", "train.phase_b_epochs=8",
                "eval.limit=200"]
# Codes one token a step put step j at another distance from its digit than the warm-up's verbal CoT
# (a newline after each step): without the separator the control learned the first code only.
SEPARATED = ["variants.step_separator=true"]  # 12 steps: 24 trace tokens, the demo's m_max
CURRICULUM_EPOCHS = "train.phase_b_epochs=2"  # a sub-phase each; four sub-phases: 8 epochs, as the others
M_STEP_SHARED = ["data.warmup_examples=19200"]
M_STEP_TOY_ROWS = 32000  # 19,200 warm-up + 2 x 6,000 problems
M_STEP = {
    # codes from the embedding layer are a bijection of the partial sums: the pipeline's positive control
    "control": [*M_STEP_SIZES, *SEPARATED, "variants.round1_traces=cot_codes", "variants.phase_b_traces=cot_codes",
                "variants.code_layer=0"],
    "codes_middle": [*M_STEP_SIZES, *SEPARATED, "variants.round1_traces=cot_codes", "variants.phase_b_traces=cot_codes"],
    # the same, each code's rows first set to the mean rows of the CoT tokens it encodes
    "codes_middle_rows": [*M_STEP_SIZES, *SEPARATED, "variants.round1_traces=cot_codes",
                          "variants.phase_b_traces=cot_codes", "variants.code_rows=step_tokens"],
    "posterior": [*M_STEP_SIZES, *SEPARATED, "variants.round1_traces=cot_codes", "variants.phase_b_traces=posterior"],
    "stepwise_codes": [*M_STEP_SIZES, *SEPARATED, CURRICULUM_EPOCHS, "variants.curriculum=stepwise",
                       "variants.code_layer=0"],
    "stepwise_none": [*M_STEP_SIZES, CURRICULUM_EPOCHS, "variants.curriculum=stepwise", "variants.curriculum_fill=none",
                      "eval.m_min=0"],
    "pause": [*M_STEP_SIZES, "variants.trace_source=pause"],
}
# GRPO arms: 64 rollouts a step (8 prompts x 8) of at most 64 tokens, the toy reward.
RL_SIZES = ["rl.reward=toy", "rl.steps=400", "rl.prompts_per_step=8", "rl.rollouts_per_prompt=8",
            "rl.max_new_tokens=64", "rl.rollout_batch=64", "rl.learning_rate=1e-4", "rl.checkpoint_every=50"]
# An RL arm on an M-step arm's model: its run links that arm's round 1 (run first if it has not) and
# adds the rl stages. codes_middle_rows: the best M-step arm whose code the method finds itself (the
# embedding-layer codes of control and stepwise_codes are a bijection of the sums by construction).
RL_FROM = {"rl_m_step": "codes_middle_rows"}
RL = {
    "rl_verbal": [*RL_SIZES, "rl.mode=verbal"],  # no rounds: from the warm-up model
    "rl_paper": ["rounds=1", *RL_SIZES, "rl.mode=abstract"],  # from round 1's final model
    **{name: [*M_STEP[source], *RL_SIZES, "rl.mode=abstract"] for name, source in RL_FROM.items()},
}
ARMS = {**VARIANTS, **M_STEP, **RL}
GROUPS = {"variants": list(VARIANTS), "m_step": list(M_STEP), "rl": list(RL)}
CONTROL = "control"
TRACE_FITTED = 0.1  # nats per trace token: Phase B "has fitted its traces" below this
SHARED = "shared"
SHARED_PATHS = ("base", "warmup", "baseline")  # linked into every variant's run directory
def is_setup_stage(key: str) -> bool:
    return key in ("prepare_base", "warmup") or key.startswith("baseline_")


def share_start(shared: rounds.Ledger, run_dir: Path) -> None:
    """Point a new run directory at the shared start (links, setup stages done). Its own
    splits.json holds the same warm-up problems (same data, seed and warm-up size) and phase
    subsets of its own size."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in SHARED_PATHS:
        link = run_dir / name
        if (shared.dir / name).exists() and not link.is_symlink():
            link.symlink_to(Path("..") / shared.dir.name / name)  # relative: OUT stays movable
    state_path = run_dir / "state.json"
    if not state_path.exists():
        done = {k: v for k, v in shared.state["done"].items() if is_setup_stage(k)}
        rounds.write_json(state_path, {"done": done})


def link_source_round(out: Path, name: str) -> None:
    """Point RL arm `name`'s run at its source arm's round 1: a link, and that round's stages done."""
    source, run_dir = out / RL_FROM[name], out / name
    link = run_dir / "round_1"
    if not link.is_symlink():
        link.symlink_to(Path("..") / source.name / "round_1")
    state = json.loads((run_dir / "state.json").read_text())
    source_done = json.loads((source / "state.json").read_text())["done"]
    state["done"].update({k: v for k, v in source_done.items() if k.startswith("round_1/")})
    rounds.write_json(run_dir / "state.json", state)


def round_seconds(state: dict, t: int) -> dict:
    """Wall and CPU seconds of round t's stages (as recorded in state.json)."""
    stages = [v for k, v in state.get("seconds", {}).items() if k.startswith(f"round_{t}/")]
    return {"wall": sum(s["wall"] for s in stages), "cpu": sum(s["cpu"] for s in stages)} if stages else {}


# ---- does a trace encode the partial sums? ------------------------------------------------------

def trace_sum_pairs(traces: dict[str, list[int]], questions: dict[str, str], stride: int = 1
                    ) -> tuple[list[int], list[int]]:
    """(trace token j * stride, partial sum j) over every trace and step j the trace reaches: with one
    code per step (cot_codes), token j is step j's code; with a separator after each, token 2j."""
    tokens, sums = [], []
    for key, trace in traces.items():
        s = partial_sums(questions[key])
        codes = list(trace[::stride])
        n = min(len(codes), len(s))
        tokens += codes[:n]
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
        out[name] = trace_information(*trace_sum_pairs(traces, questions, 1 + run.cfg.variants.step_separator))
    return out


# ---- the study ----------------------------------------------------------------------------------

def variant_config(out: Path, name: str, args, shared: list[str]):
    """An arm's config (`shared`: the settings of the shared start, given to every run)."""
    return demo.demo_config([f"run_dir={out}", f"name={name}", f"rounds={args.rounds}", f"variants.k={args.k}",
                             *shared, *ARMS.get(name, []), *args.set])


def phase_b_curve(round_dir: Path) -> list[tuple[int, float]]:
    """(step, trace loss) of Phase B, its curriculum's sub-phases one after another."""
    phase = round_dir / "phase_b"
    logs = sorted(phase.glob("stage_*/metrics.jsonl"), key=lambda p: int(p.parent.name.split("_")[1])) \
        or [phase / "metrics.jsonl"]
    curve = []
    for log in logs:
        if log.exists():
            for line in filter(str.strip, log.read_text().splitlines()):
                record = json.loads(line)
                curve.append((len(curve) + 1, record.get("trace_loss")))
    return curve


def steps_to_fit(curve: list[tuple[int, float]]) -> int | None:
    """The first Phase B step whose trace loss is below TRACE_FITTED (None: never)."""
    return next((step for step, loss in curve if loss is not None and loss < TRACE_FITTED), None)


def arm_line(label: str, evaluation: dict | None, verbal: float | None) -> str:
    """`<label> own=… random=… shuffled=… verbal=…` from a round's evaluation."""
    return f"{label} {figures([*trace_cells(evaluation), ('verbal', verbal)])}"


def rl_arm(study: dict, loaded: dict, mode: str, seconds: dict) -> dict:
    """An RL arm's figures: accuracy before RL (the shared verbal-CoT baseline, or round 1's own-trace
    accuracy), after it (rl_eval), its evaluation, and its reward and rollout accuracy per step."""
    before = ((study["reference"]["verbal"] or {}).get("accuracy") if mode == "verbal"
              else dict(trace_cells(loaded["rounds"][1]["eval"]))["own"])
    return {"mode": mode, "start": before, "end": (loaded["rl_eval"] or {}).get("accuracy"),
            "eval": loaded["rl_eval"], "reward_curve": loaded["rl_steps"]["reward"],
            "accuracy_curve": loaded["rl_steps"]["accuracy"], "seconds": {k: seconds.get(k) for k in rounds.RL_STAGES}}


def rl_line(name: str, arm: dict) -> str:
    """`arm=<name> start=… end=…` (and the trace accuracies after RL in abstract mode)."""
    cells = [("start", arm["start"]), ("end", arm["end"])]
    return f"arm={name} {figures(cells + (trace_cells(arm['eval']) if arm['mode'] == 'abstract' else []))}"


def trace_gain(evaluation: dict | None) -> float:
    """Own-trace accuracy above the better of the random and shuffled traces: what the trace carries."""
    d = (evaluation or {}).get("diagnostics") or {}
    if d.get("own_accuracy") is None:
        return -math.inf
    return d["own_accuracy"] - max(d.get("random_accuracy") or 0.0, d.get("shuffled_accuracy") or 0.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/toy_study", help="study directory (default runs/toy_study)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per variant (default 2)")
    p.add_argument("--k", type=int, default=4, help="best_of_k: candidates per example (default 4)")
    p.add_argument("--arms", default="variants",
                   help=f"comma-separated arms or groups ({', '.join(GROUPS)}) of: {', '.join(ARMS)}")
    p.add_argument("--toy-rows", type=int, default=0,
                   help=f"toy training rows (default {demo.TOY_TASK['train_size']}, {M_STEP_TOY_ROWS} with an m_step arm)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting of every run")
    args = p.parse_args(argv)
    names = []
    for arm in (a for n in args.arms.split(",") if n for a in GROUPS.get(n, [n])):
        for a in ([RL_FROM[arm]] if arm in RL_FROM else []) + [arm]:  # an RL arm's source arm runs first
            if a not in names:
                names.append(a)
    unknown = sorted(set(names) - set(ARMS))
    if unknown:
        p.error(f"unknown arm(s) {unknown}; choose from {', '.join(GROUPS)}, {', '.join(ARMS)}")
    out = Path(args.out)
    has_m_step = any(n in M_STEP or n in RL for n in names)  # the RL arms share the M-step arms' start
    shared_settings = M_STEP_SHARED if has_m_step else []
    args.toy_rows = args.toy_rows or (M_STEP_TOY_ROWS if has_m_step else demo.TOY_TASK["train_size"])
    started = time.perf_counter()

    cfg = variant_config(out, SHARED, args, shared_settings)
    arm_cfgs = {name: variant_config(out, name, args, shared_settings) for name in names}  # all valid before any runs
    demo.prepare_inputs(cfg, out / SHARED, train_size=args.toy_rows)
    shared = rounds.Ledger(cfg)
    with shared.forwarding_signals():
        for stage in rounds.setup_stages(cfg):
            shared.run(stage)
    RunContext(cfg).split("warmup")  # writes splits.json (if the warm-up did not)
    eval_questions = {}
    for line in Path(cfg.data.eval).read_text().splitlines():
        row = json.loads(line)
        eval_questions[row["unique_id"]] = row["problem"]

    study = {"settings": {"rounds": args.rounds, "k": args.k, "set": args.set, "model": demo.TINY_MODEL,
                          "task": {**demo.TOY_TASK, "train_size": args.toy_rows}, "variants": {n: ARMS[n] for n in names}},
             "reference": report.load_run(shared.dir)["baselines"],
             "shared_seconds": shared.state.get("seconds", {}), "variants": {}}
    d, e = cfg.data, cfg.eval
    arm_sizes = "; ".join(
        f"{name}: {c.rounds} round(s), {c.data.examples_per_phase} examples a phase, Phase A {c.train.epochs} "
        f"epoch(s), Phase B {c.train.phase_b_epochs or c.train.epochs}, {c.eval.limit or 'all'} held-out problems"
        for name, c in arm_cfgs.items() if not (name in RL and c.rl.mode == "verbal"))
    study["settings_line"] = (
        f"Tiny Qwen3 ({demo.TINY_MODEL['num_hidden_layers']} layers, hidden {demo.TINY_MODEL['hidden_size']}), "
        f"running sums mod 10 of {demo.TOY_TASK['min_digits']}-{demo.TOY_TASK['max_digits']} digits; shared warm-up on "
        f"{d.warmup_examples} examples, baselines on {e.limit or 'all'} held-out problems; eval trace m_min {e.m_min}, "
        f"m_max {d.m_max}, temperature {e.trace_temperature}; best_of_k k={args.k}."
        + (f" Per arm: {arm_sizes}." if arm_sizes else ""))
    for name, vcfg in arm_cfgs.items():
        vcfg.model.hf_dir, vcfg.data.train, vcfg.data.eval = cfg.model.hf_dir, cfg.data.train, cfg.data.eval
        share_start(shared, out / name)
        if name in RL_FROM:
            link_source_round(out, name)
        if [e.id for e in RunContext(vcfg).split("warmup")] != [e.id for e in RunContext(cfg).split("warmup")]:
            print(f"error: arm {name} would warm up on other problems than the shared start; keep data.* and "
                  "train.seed the same for every arm", file=sys.stderr)
            return 2
        ran = [] if name in RL and vcfg.rl.mode == "verbal" else list(range(1, vcfg.rounds + 1))
        run = rounds.run(vcfg, ran, (*rounds.ROUND_STAGES, rounds.RL_STAGE) if name in RL else rounds.ROUND_STAGES)
        loaded = report.load_run(run.dir)
        study["variants"][name] = {"rounds": {}}
        for t in ran:
            curve = phase_b_curve(run.dir / f"round_{t}")
            study["variants"][name]["rounds"][t] = {
                "eval": loaded["rounds"][t]["eval"], "seconds": round_seconds(run.state, t),
                "information": trace_sums_of_round(RunContext(vcfg), t, eval_questions),
                "phase_b_trace_loss": curve, "phase_b_steps_to_fit": steps_to_fit(curve)}
        if name in RL:
            study["variants"][name]["rl"] = rl_arm(study, loaded, vcfg.rl.mode, run.state.get("seconds", {}))
        _write(out, study)
    study["wall_seconds_this_invocation"] = time.perf_counter() - started
    study["cpu_seconds_this_invocation"] = sum(  # this process and its stage processes
        u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
    _write(out, study)
    print((out / "study.md").read_text())
    m_step = [n for n in names if n in M_STEP]
    if m_step:
        verbal = (study["reference"]["verbal"] or {}).get("accuracy")
        last = {n: study["variants"][n]["rounds"][max(study["variants"][n]["rounds"])]["eval"] for n in m_step}
        if CONTROL in last:
            print(arm_line("control", last[CONTROL], verbal))
        others = [n for n in m_step if n != CONTROL]
        if others:
            best = max(others, key=lambda n: trace_gain(last[n]))  # first on ties
            print(arm_line(f"best_arm={best}", last[best], verbal))
    for name in (n for n in names if n in RL):
        print(rl_line(name, study["variants"][name]["rl"]))
    return 0


def _write(out: Path, study: dict) -> None:
    """study.json, study.md and study.png, each under a temporary name, then renamed."""
    rounds.write_json(out / "study.json", study)
    replace_text(out / "study.md", render(study))
    plot(study, out / "study.png")


if __name__ == "__main__":
    sys.exit(run_cli(main, None, (*USER_ERRORS, RunError), interrupt_line=True))
