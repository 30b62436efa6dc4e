"""Token-mean next-token cross-entropy over the loss mask, without [B, T, V] logits.

The final hidden states are cut into chunks of `chunk` tokens; each chunk's fp32 logits are made,
reduced to per-token losses and dropped; chunks without loss weight are skipped. `token_nll` keeps
only its inputs and recomputes the chunk's logits in the backward, so at most one chunk of logits
is alive at a time (V = 151,936 for Qwen3: 8k tokens of full fp32 logits would be 5 GB).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from abscot_jax.data.roles import Role
from abscot_jax.model.qwen3 import head_logits


def target_roles(roles: jax.Array) -> jax.Array:
    """Role of the token each position predicts (positions without a target have weight 0)."""
    return jnp.concatenate([roles[:, 1:], jnp.zeros_like(roles[:, :1])], axis=1)


def token_nll(model, hidden: jax.Array, targets: jax.Array) -> jax.Array:
    """fp32 negative log-likelihood [...] of `targets` [...] under `model.logits(hidden)`. In a
    low-precision compute dtype its backward runs the two [tokens, V] matmuls in that dtype with
    fp32 accumulation; the new tokens' fp32 rows (`model.new_token_kernel`) get exact fp32 gradients.
    In fp32 there is nothing to save: autodiff of the recomputed chunk is the backward (its rounding
    differs from the custom one's, and the toy warm-up's outcome hangs on such differences)."""
    if hidden.dtype == jnp.float32:
        return jax.checkpoint(lambda h, t: _nll(model.logits(h), t))(hidden, targets)
    return _head_nll(hidden, model.head_kernel(), model.new_token_kernel(), targets, model.new_token_start)


def _nll(logits, targets):
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _head_nll(hidden, kernel, new_kernel, targets, new_token_start):
    return _nll(head_logits(hidden, kernel, new_kernel, new_token_start), targets)


def _head_nll_fwd(hidden, kernel, new_kernel, targets, new_token_start):
    # Only the inputs are kept: the [tokens, V] logits are recomputed in the backward.
    return _head_nll(hidden, kernel, new_kernel, targets, new_token_start), (hidden, kernel, new_kernel, targets)


def _head_nll_bwd(new_token_start, residuals, g):
    hidden, kernel, new_kernel, targets = residuals
    logits = head_logits(hidden, kernel, new_kernel, new_token_start)
    # d nll / d logits = softmax - onehot, in fp32. Autodiff would multiply this fp32 [tokens, V]
    # array with the head in fp32 (an fp32 copy of the head, fp32/TF32 GEMMs); here both matmuls
    # take it in the compute dtype and accumulate in fp32 (in fp32 compute: the same products).
    d_logits = g[..., None] * jax.nn.softmax(logits, axis=-1)
    d_logits = d_logits - g[..., None] * jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    d_cast = d_logits.astype(hidden.dtype)
    d_hidden = jnp.einsum("...v,dv->...d", d_cast, kernel, preferred_element_type=jnp.float32)
    d_kernel = jnp.einsum("...d,...v->dv", hidden, d_cast, preferred_element_type=jnp.float32)
    d_new_kernel = None
    if new_kernel is not None:  # exact, as in the forward
        d_new = d_logits[..., new_token_start:new_token_start + new_kernel.shape[-1]]
        highest = jax.lax.Precision.HIGHEST
        d_hidden = d_hidden + jnp.einsum("...n,dn->...d", d_new, new_kernel, precision=highest)
        d_new_kernel = jnp.einsum("...d,...n->dn", hidden.astype(jnp.float32), d_new, precision=highest)
    return d_hidden.astype(hidden.dtype), d_kernel.astype(kernel.dtype), d_new_kernel, None


_head_nll.defvjp(_head_nll_fwd, _head_nll_bwd)


def loss_sums(model, batch: dict, *, chunk: int = 1024, dropout_key=None) -> dict[str, jax.Array]:
    """Weighted sums of the per-token negative log-likelihood, overall and split by target role.

    Returns sums (not means) so that micro-batches and devices combine exactly: the token-mean
    is `nll / weight` over everything that was summed.
    """
    hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"], batch["roles"],
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

    def body(_, xs):
        h, targets, w = xs
        nll = jax.lax.cond(jnp.any(w > 0), functools.partial(token_nll, model),
                           lambda _, t: jnp.zeros(t.shape, jnp.float32), h, targets)
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
