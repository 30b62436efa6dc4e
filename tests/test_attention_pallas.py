"""The fused Pallas bottleneck attention (interpret mode on CPU) against the dense XLA reference:
forward and gradients (fp32 and bf16, GQA, padding, ragged lengths), tile classification against
a brute-force count from `reference_mask`, the cuDNN mask, input errors, and that the kernels
lower for a CUDA GPU."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abscot_jax.data.roles import Role
from abscot_jax.model.attention import (
    bottleneck_attention, cudnn_mask, masked_attention, reference_mask,
)
from abscot_jax.model.attention_pallas import KernelConfig, pallas_attention, tile_counts, tile_map
from test_attention_kernels import attention_and_grads, rel_err

P, C, Z, A = Role.PROMPT, Role.COT, Role.ABSTRACT, Role.ANSWER


def random_rows(rng, b, t):
    """Rows of 1-6 segments of random lengths, then (in even rows) padding. A segment's roles are
    either Phase A runs [x c z y] of random lengths (some empty) or random per token. Row 0 ends
    with a one-token ANSWER segment; row 1 with three more tokens of its segment 1."""
    seg = np.zeros((b, t), np.int32)
    roles = rng.integers(0, 4, (b, t)).astype(np.int32)  # padding keeps these: any role
    for row in range(b):
        used = t - (int(rng.integers(1, t // 3)) if row % 2 == 0 else 0)
        n = int(rng.integers(1, 7))
        bounds = [0, *np.sort(rng.choice(np.arange(1, used), n - 1, replace=False)), used]
        for sid, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            seg[row, start:end] = sid
            if rng.random() < 0.5:
                cuts = [start, *np.sort(rng.integers(start, end + 1, 3)), end]
                for role, a, e in zip((P, C, Z, A), cuts[:-1], cuts[1:]):
                    roles[row, a:e] = role
        if row == 0:
            seg[row, used - 1], roles[row, used - 1] = n + 1, A
        if row == 1:
            seg[row, used - 3:used] = 1  # segment 1 again at the end: one segment in two pieces
    return jnp.asarray(seg), jnp.asarray(roles)


def qkv(rng, b, t, h, kv, d, dtype=jnp.float32):
    return tuple(jnp.asarray(rng.standard_normal(s), dtype) for s in [(b, t, h, d), (b, t, kv, d), (b, t, kv, d)])


@functools.partial(jax.jit, static_argnums=(0, 1))
def out_and_grads(impl, cfg, q, k, v, seg, roles, cotangent):
    """Output and gradients of <attention(q, k, v), cotangent> w.r.t. q, k, v."""
    if impl == "pallas":
        fn = lambda q, k, v: pallas_attention(q, k, v, seg, roles, cfg)
    else:
        fn = lambda q, k, v: masked_attention(q, k, v, reference_mask(seg, roles))
    return attention_and_grads(fn, q, k, v, cotangent)


@pytest.mark.parametrize("b, t, h, kv, d, cfg", [
    (2, 40, 2, 2, 128, KernelConfig(16, 16, 16, 16)),  # G = 1
    (3, 75, 4, 1, 64, KernelConfig(32, 16, 16, 32)),   # G = 4; forward and backward tiles differ
    (2, 100, 8, 1, 128, KernelConfig(16, 32, 32, 16)),  # G = 8; block_k > block_q
])
@pytest.mark.slow
def test_matches_reference_fp32(b, t, h, kv, d, cfg):
    rng = np.random.default_rng(t)
    seg, roles = random_rows(rng, b, t)
    q, k, v = qkv(rng, b, t, h, kv, d)
    pad = np.asarray(seg == 0)
    assert pad.any() and (~pad).any()
    # The reference gives padding rows an arbitrary average: compare real rows, weight only them.
    noise = rng.standard_normal((b, t, h, d))
    cot = jnp.asarray(noise * ~pad[:, :, None, None], jnp.float32)
    want = out_and_grads("xla", None, q, k, v, seg, roles, cot)
    got = out_and_grads("pallas", cfg, q, k, v, seg, roles, cot)
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want):
        g, w = np.asarray(g), np.asarray(w)
        assert np.isfinite(g).all(), name
        if name == "out":
            assert (g[pad] == 0).all()
            g, w = g[~pad], w[~pad]
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
    # A cotangent on padding rows too changes nothing: they see nothing, so they pass no gradient.
    _, dq, dk, dv = out_and_grads("pallas", cfg, q, k, v, seg, roles, jnp.asarray(noise, jnp.float32))
    assert (np.asarray(dq)[pad] == 0).all()
    np.testing.assert_array_equal(np.asarray(dk), np.asarray(got[2]))
    np.testing.assert_array_equal(np.asarray(dv), np.asarray(got[3]))


@pytest.mark.slow
def test_bf16_error_within_the_rounding_bound():
    """bf16 inputs, judged against the fp32 result on the same (bf16) inputs. Each bf16 rounding
    is off by at most u = 2^-9 relative. Two roundings lie on the output's path (P before P @ V,
    then O), four on each gradient's (the cotangent, O inside delta, P or dS before its matmul, the
    gradient). Bound: their sum, 2u and 4u, on the relative Frobenius error (single entries can
    cancel). Measured here: ~0.85u and <= 1.7u; the XLA reference in bf16 (~1.05u, ~1.45u) meets it too."""
    u = 2.0**-9
    rng = np.random.default_rng(2)
    b, t, h, kv, d = 2, 70, 4, 1, 128
    seg, roles = random_rows(rng, b, t)
    real = np.asarray(seg != 0)
    q, k, v = qkv(rng, b, t, h, kv, d, jnp.bfloat16)
    cot = jnp.asarray(rng.standard_normal((b, t, h, d)) * real[:, :, None, None], jnp.float32)
    up = lambda x: x.astype(jnp.float32)
    truth = out_and_grads("xla", None, up(q), up(k), up(v), seg, roles, cot)
    ref16 = out_and_grads("xla", None, q, k, v, seg, roles, cot)
    ours16 = out_and_grads("pallas", KernelConfig(32, 16, 16, 16), q, k, v, seg, roles, cot)
    for name, t32, r16, o16 in zip(["out", "dq", "dk", "dv"], truth, ref16, ours16):
        assert o16.dtype == jnp.bfloat16, name
        sel = real if name == "out" else slice(None)
        t32, r16, o16 = (np.asarray(x, np.float32)[sel] for x in (t32, r16, o16))
        bound = (2 if name == "out" else 4) * u
        assert rel_err(r16, t32) <= bound, name  # the bound holds for the reference too
        assert rel_err(o16, t32) <= bound, name


def needed_tiles(seg, roles, bq, bk):
    """Brute force: a tile is needed iff any entry of `reference_mask` in it is true."""
    mask = np.asarray(reference_mask(seg, roles))
    b, t, _ = mask.shape
    tp = -(-t // max(bq, bk)) * max(bq, bk)
    mask = np.pad(mask, ((0, 0), (0, tp - t), (0, tp - t)))
    return mask.reshape(b, tp // bq, bq, tp // bk, bk).any(axis=(2, 4))


def computed_tiles(seg, roles, bq, bk):
    tp = -(-seg.shape[1] // max(bq, bk)) * max(bq, bk)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - x.shape[1])))
    return np.asarray(tile_map(pad(seg), pad(roles), bq, bk))


@pytest.mark.slow
@pytest.mark.parametrize("bq, bk", [(16, 16), (32, 16), (16, 32), (64, 64)])
def test_computed_tiles_cover_the_mask(bq, bk):
    rng = np.random.default_rng(bq + bk)
    seg, roles = random_rows(rng, 6, 190)
    need, comp = needed_tiles(seg, roles, bq, bk), computed_tiles(seg, roles, bq, bk)
    assert not (need & ~comp).any()
    counts = tile_counts(seg, roles, bq, bk)
    assert int(counts.computed) == comp.sum() and int(counts.total) == comp.size
    assert int(counts.computed) < int(counts.causal) < int(counts.total)


def rows_from(segments, t):
    """One row from [(segment id, [(role, length), ...]), ...], padded to t."""
    seg, roles = np.zeros(t, np.int32), np.zeros(t, np.int32)
    pos = 0
    for sid, runs in segments:
        for role, n in runs:
            seg[pos:pos + n], roles[pos:pos + n] = sid, role
            pos += n
    return jnp.asarray(seg[None]), jnp.asarray(roles[None])


def test_tile_counts_exact_on_phase_b_rows():
    """Many short segments without CoT (Phase B) and square tiles: the segment bounds are exact."""
    rng = np.random.default_rng(9)
    runs = [(sid, [(P, int(rng.integers(1, 12))), (Z, int(rng.integers(1, 9))), (A, int(rng.integers(1, 12)))])
            for sid in range(1, 17)]
    seg, roles = rows_from(runs, 512)
    need, comp = needed_tiles(seg, roles, 16, 16), computed_tiles(seg, roles, 16, 16)
    np.testing.assert_array_equal(comp, need)
    counts = tile_counts(seg, roles, 16, 16)
    assert int(counts.computed) == need.sum() and int(counts.causal) == 32 * 33 // 2
    assert int(counts.computed) < 0.25 * int(counts.causal)


def test_tile_counts_exact_on_phase_a_rows():
    """Block-aligned Phase A segments [x c z y]: every all-ANSWER query block skips every all-COT
    key block of its segment, and the count is exactly the brute-force one."""
    seg, roles = rows_from([(1, [(P, 16), (C, 48), (Z, 16), (A, 32)]), (2, [(P, 32), (C, 32), (Z, 16), (A, 16)])], 240)
    need, comp = needed_tiles(seg, roles, 16, 16), computed_tiles(seg, roles, 16, 16)
    np.testing.assert_array_equal(comp, need)
    assert not comp[0, 5:7, 1:4].any() and not comp[0, 12, 9:11].any()  # answers x CoT: 6 + 2 tiles skipped
    no_roles = computed_tiles(seg, jnp.zeros_like(roles), 16, 16)
    assert no_roles.sum() - comp.sum() == 8


def test_cudnn_mask_is_the_reference_on_real_rows():
    seg, roles = random_rows(np.random.default_rng(4), 3, 50)
    got, want = np.asarray(cudnn_mask(seg, roles)), np.asarray(reference_mask(seg, roles))
    assert got.shape == (3, 1, 50, 50)
    real = np.asarray(seg != 0)
    np.testing.assert_array_equal(got[:, 0][real], want[real])
    np.testing.assert_array_equal(got[:, 0][~real], np.eye(50, dtype=bool)[np.nonzero(~real)[1]])  # pad: itself


def spec(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("q, k, seg, roles, impl, message", [
    (spec(1, 8, 3, 64), spec(1, 8, 2, 64), spec(1, 8, dtype=jnp.int32), spec(1, 8, dtype=jnp.int32), "pallas",
     r"query heads \(3\) must be a multiple of kv heads \(2\)"),
    (spec(1, 8, 4, 64), spec(1, 9, 2, 64), spec(1, 8, dtype=jnp.int32), spec(1, 8, dtype=jnp.int32), "xla",
     r"disagree on \[B, T\]"),
    (spec(1, 8, 4, 64), spec(1, 8, 2, 64), spec(1, 7, dtype=jnp.int32), spec(1, 8, dtype=jnp.int32), "blockwise",
     r"disagree on \[B, T\]"),
    (spec(1, 8, 4, 64), spec(1, 8, 2, 64), spec(1, 8, dtype=jnp.int32), spec(1, 9, dtype=jnp.int32), "pallas",
     r"disagree on \[B, T\]"),
    (spec(1, 8, 4, 24), spec(1, 8, 2, 24), spec(1, 8, dtype=jnp.int32), spec(1, 8, dtype=jnp.int32), "pallas",
     r"supports head_dim 16, 32, 64, 128, 256, not 24"),
    (spec(1, 8, 4, 64), spec(1, 8, 2, 64), spec(1, 8, dtype=jnp.int32), spec(1, 8, dtype=jnp.int32), "cudnn",
     r"needs bf16 or fp16"),
    (spec(1, 8, 4, 64), spec(1, 8, 2, 64), spec(1, 8, dtype=jnp.int32), spec(1, 8, dtype=jnp.int32), "flash9",
     r"unknown attention implementation 'flash9'"),
])
def test_bad_input_is_one_clear_error_before_tracing(q, k, seg, roles, impl, message):
    # Shape specs, not arrays: anything traced before the check would fail with another error.
    with pytest.raises(ValueError, match=message):
        bottleneck_attention(q, k, k, seg, roles, impl)


@pytest.mark.parametrize("d", [64, 128])
def test_lowers_for_cuda(d):
    """The forward and both backward kernels pass Pallas' Triton lowering for a CUDA GPU in bf16
    (compiling the Triton IR to GPU code needs the GPU)."""
    b, t, h, kv = 2, 300, 8, 2
    loss = lambda q, k, v, seg, roles: jnp.sum(
        pallas_attention(q, k, v, seg, roles, interpret=False).astype(jnp.float32))
    args = (spec(b, t, h, d, dtype=jnp.bfloat16), spec(b, t, kv, d, dtype=jnp.bfloat16),
            spec(b, t, kv, d, dtype=jnp.bfloat16), spec(b, t, dtype=jnp.int32), spec(b, t, dtype=jnp.int32))
    text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    for kernel in ("fwd", "dq", "dkv"):
        assert text.count(f'name = "bottleneck_attention_{kernel}"') == 1, kernel
