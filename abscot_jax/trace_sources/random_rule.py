"""The paper's round-1 rule: for each CoT step, random abstract tokens (SequenceBuilder.random_trace)."""
from __future__ import annotations

from abscot_jax.stages.context import write_json_atomic


def make_traces(ctx, examples, *, t: int, phase: str, out) -> dict:
    builder = ctx.builder()
    traces = {e.id: list(builder.random_trace(e)) for e in examples}
    write_json_atomic(out, traces)
    return {"traces": len(traces), "rule": "random"}
