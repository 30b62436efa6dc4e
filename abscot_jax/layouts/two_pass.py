"""Two-pass Phase A (a discrete bottleneck): [x; c; z] with loss on z and [x; z; y] with loss on y,
packed as separate sequences, so the answer sees c only through z's tokens (docs/variants.md)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from abscot_jax.data.roles import Role
from abscot_jax.data.sequences import SequenceExample, make_example


def role_runs(tokens: np.ndarray, roles: np.ndarray) -> list[tuple[np.ndarray, Role]]:
    """The (ids, role) pieces of a sequence: its maximal runs of one role."""
    cuts = np.flatnonzero(roles[1:] != roles[:-1]) + 1
    return [(ids, Role(int(r[0]))) for ids, r in zip(np.split(tokens, cuts), np.split(roles, cuts))]


def phase_a(builder, example, trace: Sequence[int] | None = None) -> list[SequenceExample]:
    """The Phase A example split into its two passes, both derived from `builder.phase_a` (same cut,
    same checks, same report): the trace pass `[x; c; z]` (its answer removed; loss on z, always:
    training z is its only purpose) and the answer pass `[x; z; y]` (its CoT removed; loss on y
    only, token for token the Phase B / evaluation sequence). [] when Phase A drops the example."""
    a = builder.phase_a(example, trace)
    if a is None:
        return []
    trace_part, answer_part = a.roles != Role.ANSWER, a.roles != Role.COT
    return [
        make_example(role_runs(a.tokens[trace_part], a.roles[trace_part]), example_id=a.id, phase="A",
                     loss_on_trace=True, trace=a.trace, cot_tokens=a.cot_tokens, cot_tokens_total=a.cot_tokens_total),
        make_example(role_runs(a.tokens[answer_part], a.roles[answer_part]), example_id=a.id, phase="A",
                     loss_on_trace=False, trace=a.trace),
    ]
