"""The training stages: the verbal-CoT warm-up and each round's Phase A and Phase B, each ending
with its merged HF export (a phase whose export was interrupted resumes from its final
checkpoint and exports again)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax

from abscot_jax.checkpoint import load_hf, save_hf
from abscot_jax.code_rows import set_code_rows, step_token_weights
from abscot_jax.data.roles import Role
from abscot_jax.data.sequences import make_example
from abscot_jax.errors import RunError
from abscot_jax.layouts import build_phase_examples
from abscot_jax.model.lora import apply_lora, merge_lora
from abscot_jax.rounds import phase_start
from abscot_jax.sharding import gather_params, make_mesh, sync_processes
from abscot_jax.stages.context import RunContext
from abscot_jax.train.runner import run_phase
from abscot_jax.vocab import abstract_vocab


def load_for_training(ctx: RunContext, hf_dir: Path, code_rows: dict | None = None):
    """The model to train from `hf_dir`, its code rows set from `code_rows` (code_rows.py) and its
    LoRA adapters added when train.mode is lora."""
    m, t = ctx.cfg.model, ctx.cfg.train
    model = load_hf(hf_dir, param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, remat=m.remat,
                    attention_impl=m.attention_impl)
    if code_rows:
        set_code_rows(model, code_rows)
    if t.mode == "lora":
        new_ids = abstract_vocab(ctx.tokenizer).all_new_ids
        apply_lora(model, ctx.cfg.lora, new_token_start=min(new_ids), num_new_tokens=len(new_ids), seed=t.seed)
    return model


def phase_config(cfg, phase: str):
    """The run's config as phase `phase` ("a", "b", "warmup") trains: Phase B's own epochs when set."""
    if phase == "b" and cfg.train.phase_b_epochs:
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=cfg.train.phase_b_epochs))
    return cfg


def train_and_export(ctx: RunContext, init_dir: Path, examples, phase_dir: Path, out_dir: Path, phase: str,
                     code_rows: dict | None = None) -> dict:
    model, summary = run_phase(load_for_training(ctx, init_dir, code_rows), examples, phase_config(ctx.cfg, phase),
                               phase_dir, make_mesh(ctx.cfg.mesh), base_dir=init_dir)
    export(ctx, model, out_dir)
    return summary


def export(ctx: RunContext, model, out_dir: Path) -> None:
    """The trained model, adapters merged, as an HF directory in the training dtype: what the next
    phase trains from (fp32 master weights in full fine-tuning)."""
    gather_params(model)
    if jax.process_index() == 0:
        save_hf(merge_lora(model), out_dir, tokenizer=ctx.tokenizer, dtype=ctx.cfg.model.param_dtype, overwrite=True)
    sync_processes(f"export {out_dir}")


def warmup(ctx: RunContext) -> dict:
    """Teach the starting model the verbal-CoT format: [x; c y], loss on c and y."""
    builder = ctx.builder()
    examples = [v for v in (verbal_example(builder, e) for e in ctx.split("warmup")) if v is not None]
    return train_and_export(ctx, ctx.dir / "base", examples, ctx.dir / "warmup" / "phase", ctx.dir / "warmup" / "model",
                            "warmup")


def verbal_example(builder, example):
    """[x; c y] with c and y trained (role ANSWER, plain causal): the verbal-CoT format.
    None when it does not fit seq_len."""
    x, y = builder.prompt_ids(example), builder.answer_ids(example)
    c = builder.cot_pieces(example)
    cot = c.open + c.cot + c.close
    if len(x) + len(cot) + len(y) > builder.config.seq_len:
        return None
    return make_example([(x, Role.PROMPT), (cot + y, Role.ANSWER)], example_id=example.id, phase="verbal")


def train_phase(ctx: RunContext, t: int, phase: str) -> dict:
    """Phase A (from the previous round's final model) or Phase B (from this round's Phase A
    model) on this phase's traces, laid out as variants.bottleneck says; then the merged export."""
    rd = ctx.round_dir(t)
    traces = json.loads((rd / f"traces_{phase}.json").read_text())
    builder, v = ctx.builder(), ctx.cfg.variants
    if v.curriculum == "stepwise":
        return train_curriculum(ctx, t, traces)
    candidates = rd / f"traces_{phase}_candidates.json"
    examples = build_phase_examples(builder, [e for e in ctx.split(f"round_{t}_{phase}") if e.id in traces],
                                    phase.upper(), traces, v, candidates)
    print(f"  phase {phase.upper()} data: {builder.report}", flush=True)
    if not examples:
        raise RunError(f"no Phase {phase.upper()} example fits train.seq_len={ctx.cfg.train.seq_len} "
                       f"({builder.report}); raise train.seq_len")
    init = ctx.dir / phase_start(ctx.cfg, t, phase)
    extra = {}  # what a variant changed in this phase's data, and its size
    code_rows = None
    if v.code_rows == "step_tokens" and t == 1 and phase == "a":  # the first phase on CoT codes
        split = [e for e in ctx.split("round_1_a") if e.id in traces]
        code_rows = step_token_weights(builder, split, traces, v.codes_per_step + v.step_separator,
                                       v.codes_per_step, len(ctx.tokenizer))
        extra["code_rows_set"] = len(code_rows)
    summary = train_and_export(ctx, init, examples, rd / f"phase_{phase}", rd / f"model_{phase}", phase, code_rows)
    if phase == "a" and v.bottleneck == "two_pass":
        extra["bottleneck"] = "two_pass"
    if v.weight_by_score and candidates.exists():
        extra["weighted_candidates"] = True
    if extra:
        extra["sequence_tokens"] = sum(len(e) for e in examples)
    return {**summary, "examples": len(examples), "build": str(builder.report), **extra}


def curriculum_steps(stage: int, stages: int, steps: int) -> int:
    """How many of a CoT's first `steps` steps sub-phase `stage` (1..stages) internalises."""
    return math.ceil(stage * steps / stages)


def train_curriculum(ctx: RunContext, t: int, codes: dict) -> dict:
    """Stepwise internalisation: Phase B in variants.curriculum_stages sub-phases from the previous
    round's model, each a phase of its own (own checkpoints and optimizer, so a rerun resumes the
    sub-phase it stopped in), sub-phase s with the first curriculum_steps(s, S, n) steps replaced
    by their codes (or removed); then the merged export."""
    rd, v = ctx.round_dir(t), ctx.cfg.variants
    examples = [e for e in ctx.split(f"round_{t}_b") if e.id in codes]
    per_step = v.codes_per_step + v.step_separator  # a step's trace tokens
    init = ctx.dir / phase_start(ctx.cfg, t, "b")
    steps = {e.id: len(ctx.builder().cot_pieces(e).step_spans) for e in examples}  # tokenised once, not per sub-phase
    model, mesh, summaries = load_for_training(ctx, init), make_mesh(ctx.cfg.mesh), []
    for stage in range(1, v.curriculum_stages + 1):
        builder, built = ctx.builder(), []
        for example in examples:
            n = steps[example.id]
            z = codes[example.id] if v.curriculum_fill == "codes" else []
            step_codes = [z[i * per_step:(i + 1) * per_step] for i in range(n)]
            sequence = builder.curriculum(example, step_codes, curriculum_steps(stage, v.curriculum_stages, n))
            if sequence is not None:
                built.append(sequence)
        print(f"  curriculum stage {stage}/{v.curriculum_stages} data: {builder.report}", flush=True)
        if not built:
            raise RunError(f"no curriculum example was built ({builder.report}): the CoTs have no steps, or none "
                           f"fits train.seq_len={ctx.cfg.train.seq_len}")
        model, summary = run_phase(model, built, phase_config(ctx.cfg, "b"), rd / "phase_b" / f"stage_{stage}", mesh,
                                   base_dir=init)
        summaries.append({**summary, "examples": len(built)})
    export(ctx, model, rd / "model_b")
    return {**summaries[-1], "curriculum": summaries}
