"""The pause-token baseline: the trace is the first abstract token repeated, as many times as the
random rule would draw tokens for this example (so it costs as many positions and says nothing)."""
from __future__ import annotations

from abscot_jax.stages.context import write_json_atomic


def pause_trace(builder, example) -> list[int]:
    return [builder.vocab.abstract_ids[0]] * len(builder.random_trace(example))


def make_traces(ctx, examples, *, t: int, phase: str, out) -> dict:
    builder = ctx.builder()
    traces = {e.id: pause_trace(builder, e) for e in examples}
    write_json_atomic(out, traces)
    return {"traces": len(traces), "rule": "pause"}
