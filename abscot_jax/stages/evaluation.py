"""The evaluation stages: the starting model's baselines, each round's final model and the rl
stage's model on MATH-500 (or the configured set); records and summary under the stage's directory."""
from __future__ import annotations

from pathlib import Path

import jax
from transformers import AutoTokenizer

from abscot_jax.data.math500 import load_math500
from abscot_jax.eval import evaluate as evaluation
from abscot_jax.stages.context import RunContext


def evaluate(ctx: RunContext, model_dir: Path, mode: str, out_dir: Path) -> dict:
    cfg, e = ctx.cfg, ctx.cfg.eval
    problems, _ = load_math500(cfg.data.eval, limit=e.limit or None)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    records, summary = evaluation.evaluate(ctx.engine(model_dir), tokenizer, problems, mode=mode,
                                           samples_per_problem=e.samples, m_min=e.m_min, m_max=cfg.data.m_max,
                                           trace_temperature=e.trace_temperature, max_new_tokens=e.max_new_tokens,
                                           seed=cfg.train.seed, dataset=evaluation.dataset_name(cfg.data.eval))
    if jax.process_index() == 0:
        evaluation.write_results(out_dir, records, summary)  # also when it fails below: the records say why
    ctx.check_engine_errors(f"evaluation of {model_dir} ({mode})",
                            [r["error"] for r in records if r["finish_reason"] == "error"], len(records))
    return {"accuracy": summary.get("accuracy"), "mean_tokens": summary.get("mean_generated_tokens")}


def baseline(ctx: RunContext, mode: str) -> dict:
    """The starting model in `mode` (verbal CoT or direct answer)."""
    return evaluate(ctx, ctx.start_model(), mode, ctx.dir / "baseline" / mode)


def round_eval(ctx: RunContext, t: int) -> dict:
    """Round t's final model with its abstract trace."""
    return evaluate(ctx, ctx.final_model(t), "abstract", ctx.round_dir(t) / "eval")


def rl_eval(ctx: RunContext) -> dict:
    """The rl stage's model in its rl.mode: with its abstract trace (and the random and shuffled
    trace diagnostics), as a round's model is evaluated, or writing its verbal CoT, as the verbal
    baseline is."""
    return evaluate(ctx, ctx.dir / "rl" / "model", ctx.cfg.rl.mode, ctx.dir / "rl" / "eval")
