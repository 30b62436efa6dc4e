"""The trace stages: round t's Phase A or Phase B traces from the named source (abscot_jax.trace_sources)."""
from __future__ import annotations

from abscot_jax.stages.context import RunContext
from abscot_jax.trace_sources import make_traces


def phase_traces(ctx: RunContext, t: int, phase: str, source: str) -> dict:
    ctx.round_dir(t).mkdir(parents=True, exist_ok=True)
    return make_traces(source, ctx, ctx.split(f"round_{t}_{phase}"), t=t, phase=phase,
                       out=ctx.round_dir(t) / f"traces_{phase}.json")
