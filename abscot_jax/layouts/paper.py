"""The paper's layout: one sequence [x; c; z; y] under the bottleneck mask (SequenceBuilder.phase_a)."""
from __future__ import annotations


def phase_a(builder, example, trace) -> list:
    built = builder.phase_a(example, trace)
    return [] if built is None else [built]
