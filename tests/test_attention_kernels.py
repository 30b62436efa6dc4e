"""The blockwise bottleneck attention against the dense XLA reference (`masked_attention` under
`reference_mask`): forward and gradients, GQA, padding, ragged lengths, bf16, the model's logits,
the bottleneck itself, and that neither [T, T] arrays nor skipped blocks are computed."""
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from abscot_jax.data.roles import Role
from abscot_jax.model.attention import (
    _first_key_block, blockwise_attention, bottleneck_attention, masked_attention, reference_mask,
)
from abscot_jax.model.attention_pallas import KernelConfig, pallas_attention
from abscot_jax.model.config import Qwen3Config
from abscot_jax.model.qwen3 import Qwen3

P, C, Z, A = Role.PROMPT, Role.COT, Role.ABSTRACT, Role.ANSWER


def packed_rows(rng, b, t):
    """Rows packed with Phase A examples [x c z y] of random lengths (all four roles, several
    segments), then padding; one row reuses a segment id after another segment (non-contiguous)."""
    seg = np.zeros((b, t), np.int32)
    roles = np.zeros((b, t), np.int32)
    for row in range(b):
        pos, sid = 0, 1
        while True:
            lengths = rng.integers(1, 9, size=4)
            if pos + lengths.sum() > t - 2:
                break
            for role, n in zip((P, C, Z, A), lengths):
                seg[row, pos:pos + n], roles[row, pos:pos + n] = sid, role
                pos += n
            sid += 1
        roles[row, pos:] = rng.integers(0, 4, t - pos)  # padding: any role, segment 0
    if b > 1:
        seg[1, : t // 4] = 7  # id 7 again at the end of the row: one segment in two pieces
        seg[1, t - 3:] = 7
    return jnp.asarray(seg), jnp.asarray(roles)


def qkv(rng, b, t, h, kv, d, dtype=jnp.float32):
    return tuple(jnp.asarray(rng.standard_normal(s), dtype) for s in [(b, t, h, d), (b, t, kv, d), (b, t, kv, d)])


def attention_and_grads(fn, q, k, v, cotangent):
    """Output and gradients of <fn(q, k, v), cotangent> w.r.t. q, k, v."""
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(cotangent.astype(out.dtype)))


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


@pytest.mark.parametrize("h, kv, t, blocks", [
    (4, 1, 45, (16, 8)),   # multi-query, T not a multiple of either block
    (4, 2, 64, (16, 16)),  # GQA, T a multiple of the block
    (4, 4, 37, (32, 32)),  # plain multi-head, one ragged query block
])
@pytest.mark.slow
def test_matches_reference_forward_and_backward(h, kv, t, blocks):
    rng = np.random.default_rng(t)
    b, d = 3, 16
    seg, roles = packed_rows(rng, b, t)
    q, k, v = qkv(rng, b, t, h, kv, d)
    mask = reference_mask(seg, roles)
    real = np.asarray(seg != 0)
    # Rows that see nothing (padding) are free to differ: no cotangent flows from them.
    cot = jnp.asarray(rng.standard_normal((b, t, h, d)) * real[:, :, None, None], jnp.float32)
    want = attention_and_grads(lambda q, k, v: masked_attention(q, k, v, mask), q, k, v, cot)
    ours = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, seg, roles, *blocks))
    got = attention_and_grads(ours, q, k, v, cot)
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want):
        g, w = np.asarray(g), np.asarray(w)
        if name == "out":
            g, w = g[real], w[real]
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
        assert rel_err(g, w) < 1e-6, name


def test_padding_rows_are_finite_zero_and_give_no_gradient():
    rng = np.random.default_rng(1)
    b, t, h, kv, d = 2, 40, 4, 2, 8
    seg, roles = packed_rows(rng, b, t)
    pad = np.asarray(seg == 0)
    assert pad.any()
    q, k, v = qkv(rng, b, t, h, kv, d)
    cot_all = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)  # cotangent on padding too
    cot_real = cot_all * jnp.asarray(~pad)[:, :, None, None]
    ours = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, seg, roles, 16, 8))
    out, dq, dk, dv = attention_and_grads(ours, q, k, v, cot_all)
    assert np.isfinite(np.asarray(out)).all()
    assert (np.asarray(out)[pad] == 0).all()
    assert (np.asarray(dq)[pad] == 0).all()
    _, _, dk_real, dv_real = attention_and_grads(ours, q, k, v, cot_real)
    np.testing.assert_array_equal(np.asarray(dk), np.asarray(dk_real))  # padding rows add nothing
    np.testing.assert_array_equal(np.asarray(dv), np.asarray(dv_real))


@pytest.mark.slow
def test_bf16_as_accurate_as_the_reference_in_bf16():
    """bf16 inputs: both kernels accumulate in fp32 but round probabilities to bf16 before P @ V
    (and dS in the backward), ~2^-9 relative each; the blockwise kernel rounds relative to a
    running max rather than the final one. Judge both against the fp32 truth on the same
    (bf16-rounded) inputs: ours may be at most 2x the reference's own bf16 error, plus 1e-3."""
    rng = np.random.default_rng(2)
    b, t, h, kv, d = 2, 48, 4, 2, 16
    seg, roles = packed_rows(rng, b, t)
    mask = reference_mask(seg, roles)
    real = np.asarray(seg != 0)
    q, k, v = qkv(rng, b, t, h, kv, d, jnp.bfloat16)
    cot = jnp.asarray(rng.standard_normal((b, t, h, d)) * real[:, :, None, None], jnp.float32)
    up = lambda *xs: tuple(x.astype(jnp.float32) for x in xs)
    truth = attention_and_grads(lambda q, k, v: masked_attention(q, k, v, mask), *up(q, k, v), cot)
    ref16 = attention_and_grads(lambda q, k, v: masked_attention(q, k, v, mask), q, k, v, cot)
    ours16 = attention_and_grads(jax.jit(lambda q, k, v: blockwise_attention(q, k, v, seg, roles, 16, 16)),
                                 q, k, v, cot)
    for name, t32, r16, o16 in zip(["out", "dq", "dk", "dv"], truth, ref16, ours16):
        assert o16.dtype == jnp.bfloat16, name
        sel = real if name == "out" else slice(None)
        t32, r16, o16 = (np.asarray(x, np.float32)[sel] for x in (t32, r16, o16))
        assert rel_err(o16, t32) <= 2 * rel_err(r16, t32) + 1e-3, name


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["blockwise", "pallas"])
def test_answers_never_see_the_cot_bit_exactly(impl):
    """Changing q/k/v at COT positions leaves every ANSWER output bit-identical, and gradients
    from ANSWER outputs never reach COT keys or values."""
    rng = np.random.default_rng(3)
    b, t, h, kv, d = 2, 64, 4, 2, 16
    seg, roles = packed_rows(rng, b, t)
    is_cot = np.asarray((roles == C) & (seg != 0))
    is_answer = np.asarray((roles == A) & (seg != 0))
    q, k, v = qkv(rng, b, t, h, kv, d)
    noise = qkv(np.random.default_rng(4), b, t, h, kv, d)
    q2, k2, v2 = (x + 10 * n * is_cot[:, :, None, None] for x, n in zip((q, k, v), noise))
    if impl == "blockwise":
        ours = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, seg, roles, 16, 16))
    else:
        ours = jax.jit(lambda q, k, v: pallas_attention(q, k, v, seg, roles, KernelConfig(16, 16, 16, 16)))
    out, out2 = np.asarray(ours(q, k, v)), np.asarray(ours(q2, k2, v2))
    np.testing.assert_array_equal(out[is_answer], out2[is_answer])
    assert not np.array_equal(out[is_cot], out2[is_cot])  # the change did reach the CoT rows
    cot_on_answers = jnp.asarray(rng.standard_normal((b, t, h, d)) * is_answer[:, :, None, None], jnp.float32)
    _, _, dk, dv = attention_and_grads(ours, q, k, v, cot_on_answers)
    assert (np.asarray(dk)[is_cot] == 0).all() and (np.asarray(dv)[is_cot] == 0).all()


def test_key_ranges_skip_what_the_mask_rules_out():
    """The loop over key blocks of query block i starts at `_first_key_block` (the block of the
    earliest segment start among its queries) and stops at the diagonal: hand-computed ranges,
    and no allowed key outside them on random packed rows."""
    seg = jnp.asarray([[1] * 20 + [2] * 30 + [0] * 14, [5] * 10 + [0] * 40 + [5] * 14])
    np.testing.assert_array_equal(np.asarray(_first_key_block(seg, 16, 16)), [[0, 0, 1, 1], [0, 4, 4, 0]])
    np.testing.assert_array_equal(np.asarray(_first_key_block(seg, 16, 8)), [[0, 0, 2, 2], [0, 8, 8, 0]])
    rng = np.random.default_rng(5)
    seg, roles = packed_rows(rng, 4, 96)
    mask = np.asarray(reference_mask(seg, roles))
    bq, bk = 16, 8
    first = np.asarray(_first_key_block(seg, bq, bk))
    for row in range(4):
        for i in range(96 // bq):
            rows = mask[row, i * bq:(i + 1) * bq]
            outside = np.ones(96, bool)
            outside[first[row, i] * bk:(i + 1) * bq] = False
            assert not rows[:, outside].any()
    computed = sum(max(0, (i + 1) * bq // bk - first[r, i]) for r in range(4) for i in range(96 // bq))
    causal = 4 * sum((i + 1) * bq // bk for i in range(96 // bq))
    assert computed < 0.6 * causal  # packed short segments: most of the causal half is skipped


def test_never_builds_t_by_t():
    """Every intermediate of the forward and backward is O(T) per head: none is as large as one
    [T, T] score matrix per batch row, which the reference builds for every head."""
    b, t, h, kv, d = 1, 512, 2, 1, 8
    rng = np.random.default_rng(6)
    seg, roles = packed_rows(rng, b, t)
    q, k, v = qkv(rng, b, t, h, kv, d)
    loss = lambda q, k, v: jnp.sum(blockwise_attention(q, k, v, seg, roles, 64, 64) ** 2)

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (int(np.prod(var.aval.shape)) for var in eqn.outvars if hasattr(var.aval, "shape"))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from sizes(sub)

    def largest(f):
        return max(sizes(jax.make_jaxpr(f)(q, k, v).jaxpr))

    assert largest(jax.grad(loss, (0, 1, 2))) < t * t
    reference = lambda q, k, v: jnp.sum(masked_attention(q, k, v, reference_mask(seg, roles)) ** 2)
    assert largest(jax.grad(reference, (0, 1, 2))) >= t * t  # the check can fail


def test_implementation_choice():
    q = k = v = jnp.ones((1, 4, 1, 2))
    seg, roles = jnp.ones((1, 4), jnp.int32), jnp.zeros((1, 4), jnp.int32)
    np.testing.assert_allclose(bottleneck_attention(q, k, v, seg, roles, "auto"),
                               bottleneck_attention(q, k, v, seg, roles, "xla"), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        bottleneck_attention(q, k, v, seg, roles, "flash9")


@pytest.mark.slow
def test_model_logits_kernels_equal_xla():
    cfg = Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10_000.0)
    rng = np.random.default_rng(7)
    b, t = 2, 70  # 70: not a multiple of the default blocks
    seg, roles = packed_rows(rng, b, t)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    positions = jnp.asarray(np.tile(np.arange(t), (b, 1)), jnp.int32)
    logits = {}
    for impl in ("xla", "blockwise", "pallas"):
        model = Qwen3(cfg.replace(attention_impl=impl), rngs=nnx.Rngs(0))
        logits[impl] = np.asarray(nnx.jit(lambda m: m(tokens, positions, seg, roles))(model))
    real = np.asarray(seg != 0)
    for impl in ("blockwise", "pallas"):
        np.testing.assert_allclose(logits[impl][real], logits["xla"][real], rtol=1e-5, atol=1e-5, err_msg=impl)
