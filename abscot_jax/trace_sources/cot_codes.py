"""Traces from k-means codes of the CoT steps' hidden states under the starting model
(abscot_jax.variants.cot_code_traces): round 1's Phase A, or Phase B's traces from its own split's
CoT (the M-step on the CoT's codes). One codebook per round: the first phase that needs it fits it
and saves it with its statistics in round_t/, a later phase of the round encodes with it."""
from __future__ import annotations

from abscot_jax import variants
from abscot_jax.checkpoint import load_hf
from abscot_jax.data.dolci import DataError
from abscot_jax.stages.context import write_json_atomic


def make_traces(ctx, examples, *, t: int, phase: str, out) -> dict:
    v, m = ctx.cfg.variants, ctx.cfg.model
    model = load_hf(ctx.start_model(), param_dtype=m.param_dtype, compute_dtype=m.compute_dtype)
    saved = variants.load_codebook(ctx.round_dir(t))
    if saved is not None and saved[1] != variants.resolve_layer(model, v.code_layer):
        raise DataError(f"{ctx.round_dir(t) / 'codebook.npz'} was fitted at layer {saved[1]}, not at "
                        f"variants.code_layer={v.code_layer}; remove it to fit a new one")
    traces, stats = variants.cot_code_traces(model, ctx.builder(), examples, code_layer=v.code_layer,
                                             codes_per_step=v.codes_per_step, rows=ctx.cfg.train.batch_size,
                                             seed=ctx.cfg.train.seed, out_dir=ctx.round_dir(t),
                                             codebooks=None if saved is None else saved[0],
                                             separator=v.step_separator)
    write_json_atomic(out, traces)
    return {"traces": len(traces), "rule": "cot_codes", "layer": stats["layer"], "steps": stats["steps"],
            "codebook": stats["codebook"], "mean_length": stats["mean_trace_length"],
            "code_perplexity": [level["perplexity"] for level in stats["levels"]]}
