"""Fused bottleneck attention in Pallas: flash-attention-2 forward and backward kernels (Triton on
a GPU, the Pallas interpreter on CPU) that apply the exact Abstract-CoT mask tile by tile and skip
the tiles it leaves empty.

Tiles. Queries are cut into blocks of `block_q` rows, keys into blocks of `block_k`. `tile_map`
classifies each (query block, key block) tile of a batch row from O(T) summaries of the blocks; a
tile is computed iff all of:
  - causal: its first key is not after its last query;
  - segments: the key block does not end before the first occurrence of the earliest segment among
    the query block's real tokens, and the query block does not start after the last occurrence
    of the latest segment among the key block's real tokens (so a block of padding sees nothing);
  - roles: not (every real query is ANSWER and every real key is COT).
Each is necessary for any allowed pair in the tile, so every skipped tile is empty. The forward
and dq kernels walk, per query block, the list of its computed key blocks; the dk/dv kernel walks,
per key block, the list of its computed query blocks (the same map, transposed). XLA builds the
lists (an argsort of a [B, nq, nk] bool map) and the kernels load them as scalars: they compute
exactly the tiles `tile_map` says, which `tile_counts` counts. Inside a tile the mask is rebuilt
from that tile's segment ids and roles; nothing of size [T, T] exists.

GQA: forward and dq programs are per (query block, row, query head) and read kv head h // G; dk/dv
programs are per (key block, row, kv head) and loop over the G query heads that share it, summing
their contributions in one fp32 accumulator. K and V are never repeated in memory.

Numerics: scores, softmax statistics and accumulators in fp32, matmul operands in the input dtype
(bf16 on a GPU). Scores are kept in base 2 (scaled by log2 e) so exponentials are exp2. A row
that sees nothing (padding) gets output 0 and log-sum-exp +inf, so its recomputed probabilities in
the backward are exactly 0: no NaN and no gradient from it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from abscot_jax.data.roles import Role
from abscot_jax.model.attention import _first_key_block, _first_occurrence

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)  # powers of 2 (Triton tiles), >= 16 (its smallest matmul)
_MIN_BLOCK = 16
_NEG = float(jnp.finfo(jnp.float32).min)
_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes (powers of 2, >= 16) and Triton launch parameters. The backward (dq and dk/dv
    kernels) has its own tiles: it holds more fp32 state per tile than the forward."""

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int = 4
    num_warps_bwd: int = 4
    num_stages: int = 2

    def fit(self, t: int) -> KernelConfig:
        """The same config with no block longer than a `t`-token sequence needs."""
        fit = lambda n: max(_MIN_BLOCK, min(n, 1 << (t - 1).bit_length()))  # t's next power of 2
        return dataclasses.replace(self, block_q=fit(self.block_q), block_k=fit(self.block_k),
                                   block_q_bwd=fit(self.block_q_bwd), block_k_bwd=fit(self.block_k_bwd))

    def padded_length(self, t: int) -> int:
        """`t` rounded up to whole blocks of every pass."""
        step = max(self.block_q, self.block_k, self.block_q_bwd, self.block_k_bwd)
        return -(-t // step) * step


def default_config(head_dim: int) -> KernelConfig:
    """GPU defaults: 64 x 64 tiles and 4 warps up to head_dim 128 (the H200 sweep,
    docs/notes/2026-12-04-pallas-tile-sweep.md); at head_dim 256, 64 x 32 tiles and 8 warps to bound registers."""
    if head_dim <= 128:
        return KernelConfig(block_q=64)
    return KernelConfig(block_q=64, block_k=32, block_q_bwd=32, block_k_bwd=32, num_warps=8, num_warps_bwd=8)


def _compiler_params(num_warps: int, num_stages: int):
    """Triton compiler parameters: `CompilerParams` in current jax, `TritonCompilerParams` before."""
    cls = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


# ---- tile classification (XLA, O(T) per row plus one bool per tile) ---------------------------------

def _last_query_block(segment_ids, bq: int, bk: int):
    """int[B, nk]: the last query block any key of key block (b, j) may be seen from, i.e. the
    block of the last occurrence of the latest segment among its real keys (-1 for padding only)."""
    b, t = segment_ids.shape
    last = t - 1 - _first_occurrence(segment_ids[:, ::-1])[:, ::-1]
    last = jnp.where(segment_ids != 0, last, -1)
    return last.reshape(b, -1, bk).max(axis=-1) // bq


def _causal_tiles(nq: int, nk: int, bq: int, bk: int):
    """bool[nq, nk]: tiles whose first key is not after their last query."""
    return jnp.arange(nk)[None, :] * bk < (jnp.arange(nq)[:, None] + 1) * bq


def tile_map(segment_ids, roles, block_q: int, block_k: int):
    """bool[B, T / block_q, T / block_k]: the tiles the kernels compute (T a multiple of both
    blocks); see the module docstring for the rule."""
    b, t = segment_ids.shape
    nq, nk = t // block_q, t // block_k
    pad = segment_ids == 0
    first = _first_key_block(segment_ids, block_q, block_k)[:, :, None]
    last = _last_query_block(segment_ids, block_q, block_k)[:, None, :]
    segments = (jnp.arange(nk)[None, None, :] >= first) & (jnp.arange(nq)[None, :, None] <= last)
    answer_only = ((roles == Role.ANSWER) | pad).reshape(b, nq, block_q).all(axis=-1)
    cot_only = ((roles == Role.COT) | pad).reshape(b, nk, block_k).all(axis=-1)
    return _causal_tiles(nq, nk, block_q, block_k)[None] & segments & ~(answer_only[:, :, None] & cot_only[:, None, :])


class TileCounts(NamedTuple):
    """Tiles of a batch over the sequence padded to whole blocks: computed by the kernel, on or
    below the causal diagonal, and all."""

    computed: jax.Array
    causal: jax.Array
    total: jax.Array


def tile_counts(segment_ids, roles, block_q: int, block_k: int) -> TileCounts:
    """The tiles one pass of `pallas_attention` with these blocks computes on these rows (pass
    `KernelConfig.fit(t)`'s sizes to count what a call actually uses)."""
    b, t = segment_ids.shape
    tp = -(-t // max(block_q, block_k)) * max(block_q, block_k)
    segment_ids, roles = (jnp.pad(x, ((0, 0), (0, tp - t))) for x in (segment_ids, roles))
    nq, nk = tp // block_q, tp // block_k
    computed = tile_map(segment_ids, roles, block_q, block_k).sum()
    return TileCounts(computed, b * _causal_tiles(nq, nk, block_q, block_k).sum(), jnp.asarray(b * nq * nk))


def _schedule(tiles):
    """For each [B, n] row of `tiles` [B, n, m]: the indices of its computed tiles, ascending, then
    filler (int32 [B, n, m]), and how many there are (int32 [B, n])."""
    return jnp.argsort(~tiles, axis=-1, stable=True).astype(jnp.int32), tiles.sum(axis=-1, dtype=jnp.int32)


# ---- kernels --------------------------------------------------------------------------------------

def _mask(q_start, q_seg, q_role, k_start, k_seg, k_role):
    """bool[bq, bk]: `reference_mask` on one tile, from its own positions, segment ids and roles."""
    q_pos = q_start + jnp.arange(q_seg.shape[0])
    k_pos = k_start + jnp.arange(k_seg.shape[0])
    causal = k_pos[None, :] <= q_pos[:, None]
    same = (q_seg[:, None] == k_seg[None, :]) & (k_seg[None, :] != 0)
    answer_sees_cot = (q_role[:, None] == Role.ANSWER) & (k_role[None, :] == Role.COT)
    return causal & same & ~answer_sees_cot


def _dot(a, b, contract=(1, 1)):
    """a @ b contracting dimension contract[0] of a with contract[1] of b, fp32 accumulation."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32)


def _probs(q, k, mask, lse, scale2):
    """Softmax probabilities of one tile, recomputed from the row log-sum-exp (base 2)."""
    return jnp.where(mask, jnp.exp2(_dot(q, k) * scale2 - lse[:, None]), 0.0)


def _forward_kernel(kidx_ref, kcount_ref, seg_ref, role_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, bk, scale2):
    bq, d = q_ref.shape
    i = pl.program_id(0)
    rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
    q, q_seg, q_role = q_ref[...], seg_ref[rows], role_ref[rows]

    def step(n, carry):
        acc, m, l = carry
        j = kidx_ref[n]
        keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
        mask = _mask(i * bq, q_seg, q_role, j * bk, seg_ref[keys], role_ref[keys])
        s = jnp.where(mask, _dot(q, k_ref[keys, :]) * scale2, _NEG)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(mask, jnp.exp2(s - m_new[:, None]), 0.0)
        alpha = jnp.exp2(m - m_new)
        acc = alpha[:, None] * acc + _dot(p.astype(v_ref.dtype), v_ref[keys, :], (1, 0))
        return acc, m_new, alpha * l + p.sum(axis=1)

    init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), _NEG, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, kcount_ref[...], step, init)
    seen = l > 0  # false only for rows that see nothing (padding)
    l = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / l[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(l), jnp.inf)


def _dq_kernel(kidx_ref, kcount_ref, seg_ref, role_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
               *, bk, scale2, scale):
    bq, d = q_ref.shape
    i = pl.program_id(0)
    rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_seg, q_role = seg_ref[rows], role_ref[rows]

    def step(n, dq):
        j = kidx_ref[n]
        keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k = k_ref[keys, :]
        p = _probs(q, k, _mask(i * bq, q_seg, q_role, j * bk, seg_ref[keys], role_ref[keys]), lse, scale2)
        ds = p * (_dot(do, v_ref[keys, :]) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, (1, 0))

    dq = jax.lax.fori_loop(0, kcount_ref[...], step, jnp.zeros((bq, d), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(qidx_ref, qcount_ref, seg_ref, role_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, bq, scale2, scale):
    bk, d = k_ref.shape
    groups = q_ref.shape[1]
    j = pl.program_id(0)
    keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
    k, v, k_seg, k_role = k_ref[...], v_ref[...], seg_ref[keys], role_ref[keys]

    def step(n, carry):  # step n: query block number n // groups of the list, query head n % groups
        dk, dv = carry
        i, g = qidx_ref[jax.lax.div(n, groups)], jax.lax.rem(n, groups)  # jnp's // and % fail to lower to Triton
        rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
        q, do = q_ref[rows, g, :], do_ref[rows, g, :]
        p = _probs(q, k, _mask(i * bq, seg_ref[rows], role_ref[rows], j * bk, k_seg, k_role), lse_ref[g, rows], scale2)
        dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
        ds = p * (_dot(do, v) - delta_ref[g, rows][:, None])
        return dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv

    zeros = jnp.zeros((bk, d), jnp.float32)
    dk, dv = jax.lax.fori_loop(0, qcount_ref[...] * groups, step, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ---- pallas calls and the custom VJP --------------------------------------------------------------

def _forward(q, k, v, seg, roles, cfg: KernelConfig, interpret: bool):
    b, t, h, d = q.shape
    g = h // k.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    kidx, kcount = _schedule(tile_map(seg, roles, bq, bk))
    row = pl.BlockSpec((None, t), lambda i, bi, hi: (bi, 0))
    kv = pl.BlockSpec((None, t, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0))
    q_block = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0))
    return pl.pallas_call(
        functools.partial(_forward_kernel, bk=bk, scale2=d**-0.5 * _LOG2E),
        grid=(t // bq, b, h),
        in_specs=[pl.BlockSpec((None, None, t // bk), lambda i, bi, hi: (bi, i, 0)),
                  pl.BlockSpec((None, None), lambda i, bi, hi: (bi, i)), row, row, q_block, kv, kv],
        out_specs=[q_block, pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
        compiler_params=_compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=interpret,
        name="bottleneck_attention_fwd",
    )(kidx, kcount, seg, roles, q, k, v)


def _backward(q, k, v, seg, roles, out, lse, dout, cfg: KernelConfig, interpret: bool):
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    scales = dict(scale2=d**-0.5 * _LOG2E, scale=d**-0.5)
    params = _compiler_params(cfg.num_warps_bwd, cfg.num_stages)
    # delta = rowsum(P * dP) = rowsum(dO * O) (flash-attention 2), [B, H, T] like the log-sum-exp
    delta = jnp.einsum("bthd,bthd->bht", dout.astype(jnp.float32), out.astype(jnp.float32))
    tiles = tile_map(seg, roles, bq, bk)
    kidx, kcount = _schedule(tiles)
    qidx, qcount = _schedule(tiles.transpose(0, 2, 1))

    row = pl.BlockSpec((None, t), lambda i, bi, hi: (bi, 0))
    q_block = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0))
    stat_block = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
    kv = pl.BlockSpec((None, t, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, bk=bk, **scales),
        grid=(t // bq, b, h),
        in_specs=[pl.BlockSpec((None, None, t // bk), lambda i, bi, hi: (bi, i, 0)),
                  pl.BlockSpec((None, None), lambda i, bi, hi: (bi, i)), row, row,
                  q_block, kv, kv, q_block, stat_block, stat_block],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params, interpret=interpret, name="bottleneck_attention_dq",
    )(kidx, kcount, seg, roles, q, k, v, dout, lse, delta)

    q_heads = pl.BlockSpec((None, t, g, d), lambda j, bi, hi: (bi, 0, hi, 0))  # the G heads of kv head hi
    stat_heads = pl.BlockSpec((None, g, t), lambda j, bi, hi: (bi, hi, 0))
    kv_block = pl.BlockSpec((None, bk, None, d), lambda j, bi, hi: (bi, j, hi, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, bq=bq, **scales),
        grid=(t // bk, b, kvh),
        in_specs=[pl.BlockSpec((None, None, t // bq), lambda j, bi, hi: (bi, j, 0)),
                  pl.BlockSpec((None, None), lambda j, bi, hi: (bi, j)), row, row,
                  q_heads, kv_block, kv_block, q_heads, stat_heads, stat_heads],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params, interpret=interpret, name="bottleneck_attention_dkv",
    )(qidx, qcount, seg, roles, q, k, v, dout, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, seg, roles, cfg, interpret):
    return _forward(q, k, v, seg, roles, cfg, interpret)[0]


def _attention_fwd(q, k, v, seg, roles, cfg, interpret):
    out, lse = _forward(q, k, v, seg, roles, cfg, interpret)
    return out, (q, k, v, seg, roles, out, lse)


def _attention_bwd(cfg, interpret, res, dout):
    q, k, v, seg, roles, out, lse = res
    return (*_backward(q, k, v, seg, roles, out, lse, dout, cfg, interpret), None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _check_head_dim(head_dim: int) -> None:
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"pallas attention supports head_dim {', '.join(map(str, SUPPORTED_HEAD_DIMS))}, "
                         f"not {head_dim}; use impl='blockwise' or 'xla' for this model")


def pallas_attention(q, k, v, segment_ids, roles, config: KernelConfig | None = None, interpret: bool | None = None):
    """Bottleneck self-attention as fused Pallas kernels; same contract as `bottleneck_attention`.

    q: [B, T, H, D]; k, v: [B, T, KV, D]; returns [B, T, H, D]. A row that sees nothing (padding)
    gets output 0 and no gradient. `config` defaults to `default_config(D)`; blocks are shrunk to
    what T needs and T is padded (with segment 0) to whole blocks. `interpret` defaults to True
    exactly when the default backend is the CPU (the Pallas interpreter; Triton elsewhere).
    """
    b, t, h, d = q.shape
    _check_head_dim(d)
    cfg = (config or default_config(d)).fit(t)
    for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
        n = getattr(cfg, name)
        if n & (n - 1):
            raise ValueError(f"{name} must be a power of 2, got {n}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    pad = cfg.padded_length(t) - t
    seg, roles = (jnp.pad(x.astype(jnp.int32), ((0, 0), (0, pad))) for x in (segment_ids, roles))
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    return _attention(q, k, v, seg, roles, cfg, interpret)[:, :t]
