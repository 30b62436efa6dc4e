"""GRPO's arithmetic: group-normalised advantages, the rollout policy's per-token log-probs, and
the clipped policy-gradient loss with a KL penalty to the reference policy.

Advantages (numpy, on the host): per prompt group of K rollouts, (r - mean) / (std + eps) with the
*population* standard deviation (ddof=0) of the group's scored rollouts. A rollout without a
reward (NaN: its sampling or its judge call failed) is left out of its group's mean and std and
gets advantage 0; it is not trained on either.

Log-probs are those of the policy that sampled: the sampler draws from softmax(logits / T) with
the trace constraint applied (only abstract tokens, `<endabstract>` from m_min on), so the same
temperature and constraint are applied here. Forced tokens (`<beginabstract>`, `<endabstract>`
at m_max) have probability 1 under that policy: they carry no weight.

Loss, over trace and answer tokens only (prompt tokens have weight 0), as *sums* over tokens:

    ratio = exp(logp - logp_old)
    pg    = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)
    kl    = exp(ref - logp) - (ref - logp) - 1            (the k3 estimator, >= 0)
    loss  = pg + kl_weight * kl

The step divides the summed loss by the number of weighted tokens of the whole step: a token-mean
over the batch (every token of every rollout counts the same, long rollouts count more), the
project's convention for the SFT loss too.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# What the policy may emit at a position (the trace constraint of abscot_jax/sampling/constraints.py,
# per position of a finished rollout): anything | an abstract token | an abstract token or `<endabstract>`.
FREE, TRACE_ONLY, TRACE_OR_END = 0, 1, 2


def group_advantages(rewards: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """Advantages [P, K] of rewards [P, K] (NaN: no reward): (r - mean) / (population std + eps)
    within each row; 0 where the reward is NaN or the row has no scored rollout."""
    rewards = np.asarray(rewards, np.float64)
    scored = ~np.isnan(rewards)
    count = scored.sum(axis=1, keepdims=True)
    filled = np.where(scored, rewards, 0.0)
    mean = filled.sum(axis=1, keepdims=True) / np.maximum(count, 1)
    std = np.sqrt(np.where(scored, (filled - mean) ** 2, 0.0).sum(axis=1, keepdims=True) / np.maximum(count, 1))
    return np.where(scored, (filled - mean) / (std + eps), 0.0)


def uninformative_groups(rewards: np.ndarray) -> float:
    """Share of prompt groups whose scored rollouts all have the same reward (every advantage 0:
    no policy gradient from that prompt), groups without any scored rollout included."""
    rewards = np.asarray(rewards, np.float64)
    scored = ~np.isnan(rewards)
    highest = np.max(rewards, axis=1, initial=-np.inf, where=scored)
    lowest = np.min(rewards, axis=1, initial=np.inf, where=scored)
    return float(np.mean(~(highest > lowest)))


def length_penalised(rewards: np.ndarray, lengths: np.ndarray, penalty: float, max_new_tokens: int) -> np.ndarray:
    """rewards - penalty * generated tokens / max_new_tokens: a rollout that uses its whole budget
    loses `penalty`."""
    return np.asarray(rewards, np.float64) - penalty * np.asarray(lengths, np.float64) / max_new_tokens


def token_logprobs(model, batch: dict, *, temperature: float, abstract_ids, end_id: int, chunk: int = 1024):
    """log p(target) [B, T] under softmax(logits / temperature) restricted to what `batch["allowed"]`
    (FREE / TRACE_ONLY / TRACE_OR_END) permits, and the entropy [B, T] of that distribution (no
    gradient). Logits are made `chunk` tokens at a time and recomputed in the backward, so at most
    one chunk of [chunk, vocab] logits is alive; chunks without weight skip the head."""
    hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"], batch["roles"])
    b, t, d = hidden.shape
    n = b * t
    chunk = min(chunk, n)
    pad = (-n) % chunk

    def chunks(x):
        x = x.reshape(n, *x.shape[2:])
        return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(-1, chunk, *x.shape[1:])

    vocab = model.embed.shape[0]
    is_abstract = jnp.zeros(vocab, bool).at[jnp.asarray(abstract_ids, jnp.int32)].set(True)
    is_end = jnp.arange(vocab) == end_id

    @jax.checkpoint
    def one_chunk(h, targets, allowed_kind):
        logits = model.logits(h) / temperature
        kind = allowed_kind[:, None]
        allowed = (kind == FREE) | is_abstract | ((kind == TRACE_OR_END) & is_end)
        logits = jnp.where(allowed, logits, -jnp.inf)
        logz = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        logp_all = logits - logz
        logp = jnp.take_along_axis(logp_all, targets[:, None], axis=-1)[:, 0]
        entropy = -jnp.sum(jnp.where(allowed, jnp.exp(logp_all) * logp_all, 0.0), axis=-1)
        return logp, jax.lax.stop_gradient(entropy)

    def body(xs):
        h, targets, allowed_kind, w = xs
        return jax.lax.cond(jnp.any(w > 0), one_chunk, lambda *_: (jnp.zeros(chunk), jnp.zeros(chunk)),
                            h, targets, allowed_kind)

    logp, entropy = jax.lax.map(body, (chunks(hidden), chunks(batch["targets"]), chunks(batch["allowed"]),
                                       chunks(batch["weights"])))
    return logp.reshape(-1)[:n].reshape(b, t), entropy.reshape(-1)[:n].reshape(b, t)


def clipped_objective(logp, old_logp, ref_logp, advantages, weights, *, clip_eps: float, kl_weight: float
                      ) -> dict[str, jax.Array]:
    """Summed per-token figures of the clipped loss + KL (see the module docstring), arrays [B, T].
    `loss` is what the gradient is taken of; `weight` the token count to divide by."""
    on = weights > 0
    # Zero where there is no weight: exp of a difference at a padding position could overflow.
    log_ratio = jnp.where(on, logp - old_logp, 0.0)
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps)
    pg = -jnp.minimum(ratio * advantages, clipped * advantages)
    ref_diff = jnp.where(on, ref_logp - logp, 0.0)
    kl = jnp.exp(ref_diff) - ref_diff - 1
    return {
        "loss": jnp.sum(weights * (pg + kl_weight * kl)),
        "weight": jnp.sum(weights),
        "pg": jnp.sum(weights * pg),
        "kl": jnp.sum(weights * kl),
        "clipped": jnp.sum(weights * (ratio != clipped)),
    }
