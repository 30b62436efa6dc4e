"""Round-1 traces from k-means codes of the CoT steps' hidden states under the starting model; the
codebook and its statistics go to round_1/ (abscot_jax.variants.cot_code_traces)."""
from __future__ import annotations

from abscot_jax import variants
from abscot_jax.checkpoint import load_hf
from abscot_jax.stages.context import write_json_atomic


def make_traces(ctx, examples, *, t: int, phase: str, out) -> dict:
    v, m = ctx.cfg.variants, ctx.cfg.model
    model = load_hf(ctx.start_model(), param_dtype=m.param_dtype, compute_dtype=m.compute_dtype)
    traces, stats = variants.cot_code_traces(model, ctx.builder(), examples, code_layer=v.code_layer,
                                             codes_per_step=v.codes_per_step, rows=ctx.cfg.train.batch_size,
                                             seed=ctx.cfg.train.seed, out_dir=ctx.round_dir(t))
    write_json_atomic(out, traces)
    return {"traces": len(traces), "rule": "cot_codes", "layer": stats["layer"], "steps": stats["steps"],
            "mean_length": stats["mean_trace_length"],
            "code_perplexity": [level["perplexity"] for level in stats["levels"]]}
