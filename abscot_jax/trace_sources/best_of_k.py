"""Best of k: k constrained samples per example, as the `sampled` source draws them, each scored by
how well the sampling model predicts the gold answer given [x; z] (abscot_jax.variants.select_traces);
the best kept, every candidate written to traces_<phase>_candidates.json."""
from __future__ import annotations

from abscot_jax import variants
from abscot_jax.stages.context import write_json_atomic
from abscot_jax.trace_sources.sampled import source_model, trace_requests, write_traces


def make_traces(ctx, examples, *, t: int, phase: str, out) -> dict:
    cfg, m, v = ctx.cfg, ctx.cfg.model, ctx.cfg.variants
    model_dir, builder = source_model(ctx, t, phase), ctx.builder()
    requests = trace_requests(ctx, builder, examples, with_cot=phase == "a")
    engine = ctx.engine(model_dir)
    selection = variants.select_traces(
        engine, lambda: variants.scoring_model(engine, model_dir, param_dtype=m.param_dtype,
                                               compute_dtype=m.compute_dtype),
        builder, examples, requests, v.k, rows=cfg.train.batch_size, chunk=cfg.train.loss_chunk,
        trace_prior_weight=v.trace_prior_weight)
    ctx.check_engine_errors(f"trace sampling from {model_dir}", selection.errors, len(requests) * v.k)
    write_json_atomic(out.with_name(out.stem + "_candidates.json"), selection.candidates)
    return write_traces(ctx, selection.best, requests, model_dir, out, selection=f"best_of_{v.k}", **selection.cost)
