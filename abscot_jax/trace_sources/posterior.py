"""Phase B's traces from the posterior: z ~ p_A(z | x, c), this round's Phase A model sampling with
the CoT in context (as Phase A itself was trained), at variants.posterior_temperature. Phase B then
learns to produce from x alone the trace that the CoT would have led to: the EM M-step."""
from __future__ import annotations

from abscot_jax.trace_sources.sampled import sample_traces, source_model


def make_traces(ctx, examples, *, t: int, phase: str, out) -> dict:
    return sample_traces(ctx, examples, source_model(ctx, t, phase), out, with_cot=True,
                         temperature=ctx.cfg.variants.posterior_temperature)
