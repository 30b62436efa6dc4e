"""The abstract-trace constraint, defined once.

A row that generates a trace walks through three phases:

  BEFORE_TRACE  only `<beginabstract>` is allowed (it is forced as the first generated token);
  IN_TRACE      only V_abs and `<endabstract>`; `<endabstract>` is forbidden while the trace has
                fewer than m_min tokens and is the only choice once it has m_max;
  ANSWER        anything (the answer is decoded freely until a stop token or max tokens).

A row without a trace (verbal answer) starts in ANSWER. Both functions below are pure array code
on per-row state, so the JAX sampler calls them inside its jitted decode loop and the HF engine's
logits processor calls the very same jitted functions on the logits HF hands it.
"""
from __future__ import annotations

import jax.numpy as jnp

BEFORE_TRACE, IN_TRACE, ANSWER = 0, 1, 2


def allowed_tokens(phase, trace_len, m_min, m_max, abstract_ids, begin_id: int, end_id: int, vocab_size: int):
    """bool[B, V]: which tokens each row may produce next.

    phase, trace_len, m_min, m_max: int[B]; abstract_ids: int[64] (the trace tokens).
    """
    ids = jnp.arange(vocab_size)
    is_abstract = jnp.zeros(vocab_size, bool).at[abstract_ids].set(True)
    is_begin, is_end = ids == begin_id, ids == end_id
    phase, trace_len = phase[:, None], trace_len[:, None]
    end_ok = trace_len >= m_min[:, None]
    must_end = trace_len >= m_max[:, None]
    in_trace = jnp.where(must_end, is_end, is_abstract | (is_end & end_ok))
    return jnp.where(phase == ANSWER, True, jnp.where(phase == BEFORE_TRACE, is_begin, in_trace))


def constrain_logits(logits, phase, trace_len, m_min, m_max, abstract_ids, begin_id: int, end_id: int):
    """Logits [B, V] with every token the constraint forbids set to -inf (fp32)."""
    allowed = allowed_tokens(phase, trace_len, m_min, m_max, abstract_ids, begin_id, end_id, logits.shape[-1])
    return jnp.where(allowed, logits.astype(jnp.float32), -jnp.inf)


def advance(phase, trace_len, token, begin_id: int, end_id: int):
    """Phase and trace length after each row emitted `token`; also whether the trace just closed."""
    opened = (phase == BEFORE_TRACE) & (token == begin_id)
    closed = (phase == IN_TRACE) & (token == end_id)
    grew = (phase == IN_TRACE) & ~closed
    new_phase = jnp.where(opened, IN_TRACE, jnp.where(closed, ANSWER, phase))
    return new_phase.astype(jnp.int32), (trace_len + grew).astype(jnp.int32), closed


def initial_phase(has_trace):
    return jnp.where(has_trace, BEFORE_TRACE, ANSWER).astype(jnp.int32)

