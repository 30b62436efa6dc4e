"""Token roles, the Abstract-CoT attention mask, and attention kernels.

The mask is defined once here (`reference_mask`); every kernel must agree with it.
"""
from __future__ import annotations

import enum

import jax
import jax.numpy as jnp


class Role(enum.IntEnum):
    """Role of each token in a training sequence. Padding has segment id 0 (its role is ignored)."""

    PROMPT = 0
    COT = 1
    ABSTRACT = 2  # the trace and both delimiters
    ANSWER = 3


def reference_mask(segment_ids: jax.Array, roles: jax.Array) -> jax.Array:
    """bool[B, T, T]: query t may attend to key s.

    causal AND same (non-pad) segment AND NOT (query is ANSWER and key is COT).
    """
    t = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))[None]
    same_segment = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)
    answer_sees_cot = (roles[:, :, None] == Role.ANSWER) & (roles[:, None, :] == Role.COT)
    return causal & same_segment & ~answer_sees_cot


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """XLA reference attention with grouped-query heads.

    q: [B, T, H, D]; k, v: [B, S, KV, D]; mask: bool[B, T, S]. Returns [B, T, H, D].
    Scores and softmax run in fp32. A fully masked row (padding) gives a finite, ignored output:
    masked scores use the most negative finite value, never -inf, so no NaN reaches the gradients.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (d**-0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def bottleneck_attention(q, k, v, segment_ids, roles, impl: str = "xla"):
    """Self-attention over a packed training batch under the Abstract-CoT mask."""
    if impl == "xla":
        return masked_attention(q, k, v, reference_mask(segment_ids, roles))
    raise ValueError(f"unknown attention implementation {impl!r}; expected one of: xla")
