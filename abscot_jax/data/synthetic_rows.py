"""Packed training rows of random tokens with realistic role lengths, for benchmarks and checks.

Each example is a segment of roles in order (e.g. Phase A: prompt, CoT, trace, answer), its
lengths drawn from the preset's ranges; examples are packed into rows as full as the project's
packer makes them (~98%): an example that does not fit is shrunk in the same proportions while
at least `min_room` slots remain; the rest is padding (segment 0). Loss on targets that are trace
or answer tokens of the same segment, as the real sequences have.
"""
from __future__ import annotations

import numpy as np

from abscot_jax.data.roles import Role

# role -> [low, high) token counts of one example
PHASE_A_SHORT = {Role.PROMPT: (40, 160), Role.COT: (150, 450), Role.ABSTRACT: (10, 66), Role.ANSWER: (20, 120)}
# Dolci-Think-like: long verbal reasoning, a trace of up to m_max = 128 tokens, a worked answer.
PHASE_A_DOLCI = {Role.PROMPT: (60, 400), Role.COT: (1500, 6000), Role.ABSTRACT: (16, 130), Role.ANSWER: (150, 900)}
PHASE_B_DOLCI = {Role.PROMPT: (60, 400), Role.ABSTRACT: (16, 130), Role.ANSWER: (150, 900)}
PRESETS = {"phase_a_short": PHASE_A_SHORT, "phase_a": PHASE_A_DOLCI, "phase_b": PHASE_B_DOLCI}


def packed_rows(rng: np.random.Generator, batch: int, seq: int, vocab: int,
                lengths: dict[Role, tuple[int, int]] = PHASE_A_SHORT, min_room: int = 64) -> dict[str, np.ndarray]:
    """One micro-batch of packed rows: int32 arrays [1, batch, seq] under the keys of a train batch
    (tokens, positions, segment_ids, roles, targets, loss_mask)."""
    tokens = rng.integers(0, vocab, (batch, seq))
    segs = np.zeros((batch, seq), np.int32)
    roles = np.zeros((batch, seq), np.int32)
    positions = np.zeros((batch, seq), np.int32)
    for row in range(batch):
        start, segment = 0, 1
        while True:
            sizes = {role: int(rng.integers(lo, hi)) for role, (lo, hi) in lengths.items()}
            total = sum(sizes.values())
            if start + total > seq:
                room = seq - start
                if room < min_room:
                    break
                sizes = {role: max(4, n * room // total) for role, n in sizes.items()}
                longest = max(sizes, key=sizes.get)  # takes back what the minimum of 4 added
                sizes[longest] -= max(0, sum(sizes.values()) - room)
                total = sum(sizes.values())
                if sizes[longest] < 4:
                    break
            segs[row, start:start + total] = segment
            positions[row, start:start + total] = np.arange(total)
            at = start
            for role, n in sizes.items():
                roles[row, at:at + n] = role
                at += n
            start, segment = start + total, segment + 1
    same_next = (segs[:, 1:] == segs[:, :-1]) & (segs[:, 1:] != 0)
    next_role = roles[:, 1:]
    loss_mask = np.zeros((batch, seq), np.int32)
    loss_mask[:, :-1] = same_next & ((next_role == Role.ABSTRACT) | (next_role == Role.ANSWER))
    targets = np.zeros((batch, seq), np.int32)
    targets[:, :-1] = tokens[:, 1:]
    out = dict(tokens=tokens.astype(np.int32), positions=positions, segment_ids=segs, roles=roles,
               targets=targets, loss_mask=loss_mask)
    return {k: v[None] for k, v in out.items()}
