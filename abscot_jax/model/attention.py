"""The Abstract-CoT attention mask and attention kernels.

The mask is defined once here (`reference_mask`); every kernel must agree with it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from abscot_jax.data.roles import Role


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
    out = jnp.einsum("bkgts,bskd->btkgd", _masked_probs(scores, mask, d, v.dtype), v)
    return out.reshape(b, t, h, d)


def _masked_probs(scores: jax.Array, mask: jax.Array, head_dim: int, dtype) -> jax.Array:
    """Softmax over keys of fp32 scores [B, KV, G, T, S], scaled, where mask [B, T, S] allows."""
    scores = jnp.where(mask[:, None, None], scores * (head_dim**-0.5), jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """`masked_attention` over one layer's KV cache, head-major (generation).

    q: [B, T, H, D]; k: [B, KV, D, S] (keys stored transposed); v: [B, KV, S, D]; mask:
    bool[B, T, S]. Returns [B, T, H, D]. Per (row, kv head) both products are then plain
    [G*T, D] @ [D, S] and [G*T, S] @ [S, D] matmuls on the cache as stored: no per-step transpose,
    and on CPU 30-40% less time than keys as [S, D] (measured in a decode step: 8.2 vs 11.5 ms
    for 8 layers at S=192, 26 vs 44 ms at S=768, batch 32, XLA single-threaded).
    """
    b, t, h, d = q.shape
    kv = k.shape[1]
    q = q.reshape(b, t, kv, h // kv, d)
    if k.dtype != jnp.float32 and jax.default_backend() == "cpu":
        # XLA's CPU dot has no bf16 x bf16 -> fp32 kernel for this form: fp32 operands there.
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    scores = jnp.einsum("btkgd,bkds->bkgts", q, k, preferred_element_type=jnp.float32)
    out = jnp.einsum("bkgts,bksd->btkgd", _masked_probs(scores, mask, d, v.dtype), v)
    return out.reshape(b, t, h, d)


# ---- blockwise attention (CPU) ------------------------------------------------------------------
#
# Flash-attention style: queries in blocks of `block_q` rows, keys in blocks of `block_k`
# (block_k divides block_q), online softmax with fp32 accumulators; nothing of size [T, T] exists.
# For each (batch row, query block) a loop runs over exactly the key blocks that can hold an
# allowed key: from the block holding the start of the earliest segment among the block's
# queries up to the causal diagonal. Everything before the segment start (other segments, and
# the causal upper half) is never computed: on packed Phase A rows that is more than half of even
# the causal lower half. Segments and the answer-not-CoT rule are applied inside each pair from a
# [block_q, block_k] mask built from that pair's own segment ids and roles.
#
# Why a loop of small matmuls rather than a static schedule of big batched ones: a static
# schedule can only skip what is empty in every row of the batch (on packed rows it computed ~83%
# of the causal pairs, this loop ~40%), and measured 2-3x slower on CPU: skipping finely beats
# bigger matmuls here (block sizes: docs/notes/2026-11-28-cpu-step-time.md). The loops are `fori_loop`s, so
# the graph (and the compile time) does not grow with the sequence length.
#
# Layout: head-major, with the G query heads of a kv head folded into the rows: q is
# [B, KV, nq, block_q * G, D] (rows ordered (t, g)), k and v are [B, KV, nk, block_k, D]. A key
# block is read once for all G heads that share it: K/V are never repeated in memory.
#
# The backward is a custom VJP of the same form (flash-attention 2): each pair's probabilities are
# recomputed from the saved per-row log-sum-exp, so only O(T) per head is stored, and the
# gradients of K/V accumulate block by block.

DEFAULT_BLOCK_Q = 64  # measured on the 2-core CPU, 4 x 1024 packed Phase A rows: 64 x 32 beat
DEFAULT_BLOCK_K = 32  # 32 x 32, 64 x 64 (+10%), 128 x 128 (+35%): fine blocks skip more
_NEG = float(jnp.finfo(jnp.float32).min)


def _block_sizes(t: int, block_q: int, block_k: int) -> tuple[int, int]:
    """(bq, bk) for t tokens: bk divides bq; a short sequence uses smaller blocks."""
    if block_q % block_k:
        raise ValueError(f"block_q ({block_q}) must be a multiple of block_k ({block_k})")
    bk = min(block_k, t)
    bq = bk * max(1, min(block_q, -(-t // bk) * bk) // bk)
    return bq, bk


def _first_occurrence(segment_ids):
    """int[B, T]: the position of the first occurrence, in its row, of each token's segment id
    (first occurrence, not run start, so a segment id that reappears later in a row is exact)."""
    b, t = segment_ids.shape
    order = jnp.argsort(segment_ids, axis=1, stable=True)  # positions grouped by segment, ascending
    sorted_ids = jnp.take_along_axis(segment_ids, order, axis=1)
    is_first = jnp.concatenate([jnp.ones((b, 1), bool), sorted_ids[:, 1:] != sorted_ids[:, :-1]], axis=1)
    group_start = jax.lax.cummax(jnp.where(is_first, jnp.arange(t), 0), axis=1)
    first_sorted = jnp.take_along_axis(order, group_start, axis=1)
    return jnp.zeros_like(segment_ids).at[jnp.arange(b)[:, None], order].set(first_sorted)


def _first_key_block(segment_ids, bq: int, bk: int):
    """int[B, nq]: the first key block any query of query block (b, i) may see, i.e. the block of
    the first occurrence of the earliest segment among its real rows (nk, past the end, for a
    block of padding only)."""
    b, t = segment_ids.shape
    first = jnp.where(segment_ids != 0, _first_occurrence(segment_ids), t)
    return first.reshape(b, -1, bq).min(axis=-1) // bk


class _Pairs:
    """Shared pieces of the forward and backward loops over (row, query block, key block)."""

    def __init__(self, q, k, segment_ids, answer, cot):
        self.b, self.kvh, self.nq, self.rows, d = q.shape
        self.nk, self.bk = k.shape[2:4]
        self.bq = segment_ids.shape[1] // self.nq
        self.g = self.rows // self.bq
        self.r = self.nk // self.nq
        self.scale = d**-0.5
        self.seg, self.answer, self.cot = segment_ids, answer, cot

    def mask(self, bi, i, j):
        """bool[bq, bk]: which keys of key block j each query of query block i (row bi) may see."""
        sl = jax.lax.dynamic_slice_in_dim
        qseg, qans = sl(self.seg[bi], i * self.bq, self.bq), sl(self.answer[bi], i * self.bq, self.bq)
        kseg, kcot = sl(self.seg[bi], j * self.bk, self.bk), sl(self.cot[bi], j * self.bk, self.bk)
        causal = j * self.bk + jnp.arange(self.bk)[None, :] <= i * self.bq + jnp.arange(self.bq)[:, None]
        same = (qseg[:, None] == kseg[None, :]) & (kseg != 0)[None, :]
        return causal & same & ~(qans[:, None] & kcot[None, :])

    def scores(self, qi, kj, mask):
        """fp32 scaled scores [KV, bq, G, bk]; masked entries -> most negative finite value."""
        s = jnp.einsum("krd,ksd->krs", qi, kj, preferred_element_type=jnp.float32)
        s = s.reshape(self.kvh, self.bq, self.g, self.bk) * self.scale
        return jnp.where(mask[None, :, None, :], s, _NEG)

    def probs(self, s, mask, row_max):
        """exp(s - row_max) on allowed entries, exactly 0 elsewhere; [KV, bq * G, bk]."""
        p = jnp.exp(s - row_max.reshape(self.kvh, self.bq, self.g, 1))
        return jnp.where(mask[None, :, None, :], p, 0.0).reshape(self.kvh, self.rows, self.bk)


def _flash_forward(q, k, v, segment_ids, answer, cot, first):
    pairs = _Pairs(q, k, segment_ids, answer, cot)
    kvh, rows, d = pairs.kvh, pairs.rows, q.shape[-1]

    def query_block(idx, carry):
        out, lse = carry
        bi, i = idx // pairs.nq, idx % pairs.nq
        qi = q[bi, :, i]

        def key_block(j, acc_m_l):
            acc, m, l = acc_m_l
            mask = pairs.mask(bi, i, j)
            s = pairs.scores(qi, k[bi, :, j], mask)
            m_new = jnp.maximum(m, s.max(axis=-1).reshape(kvh, rows))
            p = pairs.probs(s, mask, m_new)
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum("krs,ksd->krd", p.astype(v.dtype), v[bi, :, j], preferred_element_type=jnp.float32)
            return alpha[..., None] * acc + pv, m_new, alpha * l + p.sum(axis=-1)

        init = (jnp.zeros((kvh, rows, d), jnp.float32), jnp.full((kvh, rows), _NEG, jnp.float32),
                jnp.zeros((kvh, rows), jnp.float32))
        acc, m, l = jax.lax.fori_loop(first[bi, i], (i + 1) * pairs.r, key_block, init)
        seen = l > 0  # false only for rows that see nothing (padding): output 0
        l_safe = jnp.where(seen, l, 1.0)
        o = jnp.where(seen[..., None], acc / l_safe[..., None], 0.0).astype(out.dtype)
        # +inf log-sum-exp: every recomputed probability of an unseen row is exactly 0 in the backward.
        row_lse = jnp.where(seen, m + jnp.log(l_safe), jnp.inf)
        out = jax.lax.dynamic_update_slice(out, o[None, :, None], (bi, 0, i, 0, 0))
        lse = jax.lax.dynamic_update_slice(lse, row_lse[None, :, None], (bi, 0, i, 0))
        return out, lse

    init = (jnp.zeros(q.shape, q.dtype), jnp.zeros(q.shape[:-1], jnp.float32))
    return jax.lax.fori_loop(0, pairs.b * pairs.nq, query_block, init)


@jax.custom_vjp
def _flash(q, k, v, segment_ids, answer, cot, first):
    return _flash_forward(q, k, v, segment_ids, answer, cot, first)[0]


def _flash_fwd(q, k, v, segment_ids, answer, cot, first):
    out, lse = _flash_forward(q, k, v, segment_ids, answer, cot, first)
    return out, (q, k, v, segment_ids, answer, cot, first, out, lse)


def _flash_bwd(res, dout):
    q, k, v, segment_ids, answer, cot, first, out, lse = res
    pairs = _Pairs(q, k, segment_ids, answer, cot)
    kvh, rows, d = pairs.kvh, pairs.rows, q.shape[-1]
    # delta = rowsum(P * dP) = rowsum(dO * O) (flash-attention 2)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    def query_block(idx, carry):
        dq, dk, dv = carry
        bi, i = idx // pairs.nq, idx % pairs.nq
        qi, doi = q[bi, :, i], dout[bi, :, i]

        def key_block(j, c):
            dqi, dk, dv = c
            kj, vj = k[bi, :, j], v[bi, :, j]
            mask = pairs.mask(bi, i, j)
            p = pairs.probs(pairs.scores(qi, kj, mask), mask, lse[bi, :, i])
            dp = jnp.einsum("krd,ksd->krs", doi, vj, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta[bi, :, i][..., None]) * pairs.scale).astype(q.dtype)
            dqi = dqi + jnp.einsum("krs,ksd->krd", ds, kj, preferred_element_type=jnp.float32)
            dkj = jnp.einsum("krs,krd->ksd", ds, qi, preferred_element_type=jnp.float32)
            dvj = jnp.einsum("krs,krd->ksd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
            dk = jax.lax.dynamic_update_slice(dk, (dk[bi, :, j] + dkj)[None, :, None], (bi, 0, j, 0, 0))
            dv = jax.lax.dynamic_update_slice(dv, (dv[bi, :, j] + dvj)[None, :, None], (bi, 0, j, 0, 0))
            return dqi, dk, dv

        init = (jnp.zeros((kvh, rows, d), jnp.float32), dk, dv)
        dqi, dk, dv = jax.lax.fori_loop(first[bi, i], (i + 1) * pairs.r, key_block, init)
        return jax.lax.dynamic_update_slice(dq, dqi[None, :, None], (bi, 0, i, 0, 0)), dk, dv

    zeros = tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = jax.lax.fori_loop(0, pairs.b * pairs.nq, query_block, zeros)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q, k, v, segment_ids, roles, block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K):
    """Bottleneck self-attention without [T, T] arrays; same contract as `bottleneck_attention`.

    q: [B, T, H, D]; k, v: [B, T, KV, D]; returns [B, T, H, D]. A row that sees nothing (padding)
    gets output 0 (the XLA reference gives an arbitrary finite average there) and no gradient.
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    bq, bk = _block_sizes(t, block_q, block_k)
    nq = -(-t // bq)
    pad = nq * bq - t
    if pad:  # padded keys have segment 0: masked
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
        roles = jnp.pad(roles, ((0, 0), (0, pad)))
    qh = q.reshape(b, nq, bq, kvh, g, d).transpose(0, 3, 1, 2, 4, 5).reshape(b, kvh, nq, bq * g, d)
    kh, vh = (x.reshape(b, nq * bq // bk, bk, kvh, d).transpose(0, 3, 1, 2, 4) for x in (k, v))
    first = _first_key_block(segment_ids, bq, bk)
    out = _flash(qh, kh, vh, segment_ids, roles == Role.ANSWER, roles == Role.COT, first)
    out = out.reshape(b, kvh, nq, bq, g, d).transpose(0, 2, 3, 1, 4, 5).reshape(b, nq * bq, h, d)
    return out[:, :t]


# ---- cuDNN (GPU) ---------------------------------------------------------------------------------

def cudnn_mask(segment_ids: jax.Array, roles: jax.Array) -> jax.Array:
    """bool[B, 1, T, T] for cuDNN (broadcast over heads): `reference_mask`, plus each padding token
    seeing itself, so no row is fully masked (cuDNN's answer for such a row is not defined)."""
    t = segment_ids.shape[-1]
    pad_self = (segment_ids == 0)[:, :, None] & jnp.eye(t, dtype=bool)[None]
    return (reference_mask(segment_ids, roles) | pad_self)[:, None]


def cudnn_attention(q, k, v, segment_ids, roles):
    """`jax.nn.dot_product_attention` on cuDNN under `cudnn_mask` (bf16/fp16 only; cuDNN takes the
    mask as an additive bias and skips only the tiles above the diagonal). Padding rows: output 0."""
    out = jax.nn.dot_product_attention(q, k, v, mask=cudnn_mask(segment_ids, roles), is_causal=True,
                                       implementation="cudnn")
    return jnp.where((segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)


IMPLEMENTATIONS = ("xla", "blockwise", "pallas", "cudnn", "auto")


def _check_inputs(q, k, v, segment_ids, roles, impl: str) -> None:
    """One clear ValueError for inputs no implementation can take, before anything is traced."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; expected one of: {', '.join(IMPLEMENTATIONS)}")
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention expects q [B, T, H, D] and k, v [B, T, KV, D]; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    bt = {"q": q.shape[:2], "k": k.shape[:2], "v": v.shape[:2], "segment_ids": segment_ids.shape, "roles": roles.shape}
    if len(set(bt.values())) > 1:
        raise ValueError("attention inputs disagree on [B, T]: " + ", ".join(f"{n} {s}" for n, s in bt.items()))
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    if impl == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"impl='cudnn' needs bf16 or fp16 inputs, got {q.dtype}")


def bottleneck_attention(q, k, v, segment_ids, roles, impl: str = "xla"):
    """Self-attention over a packed training batch under the Abstract-CoT mask.

    q: [B, T, H, D]; k, v: [B, T, KV, D] (H a multiple of KV); segment_ids, roles: int [B, T].
    impl: "xla" (the dense reference: builds [B, T, T]), "blockwise" (above; the CPU kernel),
    "pallas" (fused kernels with tile skipping, `attention_pallas`; the Pallas interpreter on CPU),
    "cudnn" (`cudnn_attention`, bf16/fp16 on a GPU), or "auto": pallas on a GPU, blockwise on CPU,
    xla elsewhere. Padding rows: 0 from all but "xla" (an arbitrary finite average there).
    """
    _check_inputs(q, k, v, segment_ids, roles, impl)
    if impl == "auto":
        impl = {"cpu": "blockwise", "gpu": "pallas"}.get(jax.default_backend(), "xla")
    if impl == "xla":
        return masked_attention(q, k, v, reference_mask(segment_ids, roles))
    if impl == "blockwise":
        return _per_device(blockwise_attention, q, k, v, segment_ids, roles)
    if impl == "cudnn":
        return _per_device(cudnn_attention, q, k, v, segment_ids, roles)
    from abscot_jax.model import attention_pallas  # imports this module: loaded on first use

    return _per_device(attention_pallas.pallas_attention, q, k, v, segment_ids, roles)


def _per_device(kernel, q, k, v, segment_ids, roles):
    """`kernel` on each device's rows (and heads, under tensor parallelism) when a mesh is set.

    XLA cannot split a kernel it does not see into (a Pallas call, a loop over blocks): left to
    itself it would gather the whole batch onto every device and compute it there. Heads are split
    only when the kv heads divide over the tensor axis (so each device's query heads read its own
    kv heads); otherwise every device of a tensor group computes all heads of its rows."""
    from abscot_jax.sharding import spec_for

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v, segment_ids, roles)
    kv_spec = spec_for(("batch", None, "kv_heads", None), k.shape, mesh)
    q_spec = spec_for(("batch", None, "heads" if kv_spec[2] else None, None), q.shape, mesh)
    row_spec = spec_for(("batch", None), segment_ids.shape, mesh)
    return jax.shard_map(kernel, in_specs=(q_spec, kv_spec, kv_spec, row_spec, row_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, segment_ids, roles)
