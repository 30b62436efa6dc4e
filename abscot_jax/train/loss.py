"""Token-mean next-token cross-entropy over the loss mask, without [B, T, V] logits.

The final hidden states are cut into chunks of `chunk` tokens; each chunk's fp32 logits are made,
reduced to per-token losses and dropped; chunks without loss weight are skipped. `jax.checkpoint` on the chunk makes the backward pass
recompute them too, so at most one chunk of logits is alive at a time (V = 151,936 for Qwen3:
8k tokens of full fp32 logits would be 5 GB).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from abscot_jax.model.attention import Role


def target_roles(roles: jax.Array) -> jax.Array:
    """Role of the token each position predicts (positions without a target have weight 0)."""
    return jnp.concatenate([roles[:, 1:], jnp.zeros_like(roles[:, :1])], axis=1)


def loss_sums(model, batch: dict, *, chunk: int = 1024, dropout_key=None) -> dict[str, jax.Array]:
    """Weighted sums of the per-token negative log-likelihood, overall and split by target role.

    Returns sums (not means) so that micro-batches and devices combine exactly: the token-mean
    is `nll / weight` over everything that was summed.
    """
    hidden, _ = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"], batch["roles"],
                                    dropout_key=dropout_key)
    weights = batch["loss_mask"].astype(jnp.float32)
    rows, length = weights.shape
    # Only positions with loss weight need logits (a quarter of a packed Phase A row). Each row's
    # weighted positions are moved to its front by a stable per-row sort (rows stay on their
    # devices), and chunks without any weight skip the head matmul. The sums do not depend on order.
    order = jnp.argsort(weights == 0, axis=1, stable=True)

    def front_first(x):
        return jnp.take_along_axis(x, order.reshape(rows, length, *[1] * (x.ndim - 2)), axis=1)

    hidden, targets, weights = front_first(hidden), front_first(batch["targets"]), front_first(weights)
    roles = front_first(target_roles(batch["roles"]))
    span = max(1, min(chunk // rows, length))  # positions per row in a chunk: `chunk` tokens in all
    pad = (-length) % span

    def chunks(x):  # [rows, length, ...] -> [chunks, rows, span, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(rows, -1, span, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_nll(h, targets):
        logits = model.logits(h)
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked

    def body(_, xs):
        h, targets, w = xs
        nll = jax.lax.cond(jnp.any(w > 0), chunk_nll, lambda _, t: jnp.zeros(t.shape, jnp.float32), h, targets)
        return None, nll

    _, nll = jax.lax.scan(body, None, (chunks(hidden), chunks(targets), chunks(weights)))
    nll = jnp.moveaxis(nll, 0, 1).reshape(rows, -1)[:, :length]
    trace_w = weights * (roles == Role.ABSTRACT)
    answer_w = weights * (roles == Role.ANSWER)
    return {
        "nll": jnp.sum(weights * nll),
        "weight": jnp.sum(weights),
        "trace_nll": jnp.sum(trace_w * nll),
        "trace_weight": jnp.sum(trace_w),
        "answer_nll": jnp.sum(answer_w * nll),
        "answer_weight": jnp.sum(answer_w),
    }


def mean_losses(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Token means from summed figures (0 where nothing was counted)."""
    def ratio(a, b):
        return jnp.where(b > 0, a / jnp.maximum(b, 1e-9), 0.0)

    return {
        "loss": ratio(sums["nll"], sums["weight"]),
        "trace_loss": ratio(sums["trace_nll"], sums["trace_weight"]),
        "answer_loss": ratio(sums["answer_nll"], sums["answer_weight"]),
        "tokens": sums["weight"],
    }
