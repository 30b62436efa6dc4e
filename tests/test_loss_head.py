"""The loss head's custom backward (`token_nll`): bf16 matmuls with fp32 accumulation, checked
against an fp32 reference with a tolerance derived from bf16's unit roundoff, and identical to
autodiff of the plain formula in fp32."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from abscot_jax.model.config import Qwen3Config
from abscot_jax.model.lora import LoRAConfig, apply_lora
from abscot_jax.model.qwen3 import Qwen3
from abscot_jax.train.loss import _head_nll, token_nll

CFG = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
START, NEW = 500, 12  # the new tokens' rows: [500, 512)
U = 2.0**-8  # bf16 unit roundoff: 8 significant bits, round to nearest
U32 = 2.0**-24  # fp32 unit roundoff


def head_model(tied: bool, compute_dtype: str) -> Qwen3:
    """A model whose head (and new-token deltas) are non-trivial; head weights are bf16 values, so
    the bf16 and fp32 computations see the same head."""
    model = Qwen3(CFG.replace(tie_word_embeddings=tied, compute_dtype=compute_dtype), rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=2, alpha=2), new_token_start=START, num_new_tokens=NEW)
    head = model.embed if tied else model.lm_head
    head[...] = head[...].astype(jnp.bfloat16).astype(jnp.float32)
    delta = model.embed_delta if tied else model.head_delta
    delta[...] = 0.05 * jax.random.normal(jax.random.key(1), delta[...].shape)
    return model


def inputs(dtype):
    """Hidden states [rows, span, D] in `dtype` (bf16 values), targets (some of them new tokens) and
    per-token loss weights (some 0)."""
    keys = jax.random.split(jax.random.key(2), 3)
    hidden = jax.random.normal(keys[0], (3, 40, CFG.hidden_size)).astype(jnp.bfloat16).astype(dtype)
    targets = jax.random.randint(keys[1], (3, 40), 0, CFG.vocab_size).at[:, ::5].set(START + 3)
    weights = jax.random.uniform(keys[2], (3, 40)).at[:, ::7].set(0.0)
    return hidden, targets, weights


def grads(model, hidden, targets, weights, nll_fn):
    """Gradients of sum(weights * nll) wrt the hidden states and the model state."""
    graphdef, state = nnx.split(model)

    def objective(hidden, state):
        return jnp.sum(weights * nll_fn(nnx.merge(graphdef, state), hidden, targets))

    return jax.jit(jax.grad(objective, argnums=(0, 1)))(hidden, state)


def plain_nll(model, hidden, targets):
    """Reference: plain autodiff through full fp32 logits."""
    return optax.softmax_cross_entropy_with_integer_labels(model.logits(hidden), targets)


def head_names(tied):
    return ("embed", "embed_delta") if tied else ("lm_head", "head_delta")


def custom_nll(model, hidden, targets):
    """The custom backward itself (what `token_nll` runs below fp32), here on fp32 inputs."""
    return _head_nll(hidden, model.head_kernel(), model.new_token_kernel(), targets, model.new_token_start)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False])
def test_fp32_head_backward_equals_autodiff_of_the_plain_formula(tied):
    model = head_model(tied, "float32")
    hidden, targets, weights = inputs(jnp.float32)
    np.testing.assert_allclose(custom_nll(model, hidden, targets), plain_nll(model, hidden, targets), rtol=1e-6)
    (dh, ds), (ref_dh, ref_ds) = (grads(model, hidden, targets, weights, fn) for fn in (custom_nll, plain_nll))
    np.testing.assert_allclose(dh, ref_dh, rtol=1e-6, atol=1e-6)
    for name in head_names(tied):
        np.testing.assert_allclose(ds[name][...], ref_ds[name][...], rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False])
def test_bf16_head_backward_is_within_bf16_rounding_of_fp32(tied):
    """Tolerance, element by element. With fp32 d = d nll / d logits [tokens, V] (the same in both
    computations up to fp32 rounding), the bf16 backward casts d to bf16, d' = d (1 + e) with
    |e| <= U per element; the products of bf16 operands are exact in fp32 and summed in fp32, and
    the result is cast to the gradient's dtype. So
      d_hidden = d' @ W^T (+ the new tokens' exact fp32 term), cast to bf16:
          |error| <= U * (|d| @ |W|^T) + U * |d_hidden|
      d_W = hidden^T @ d', cast to the compute dtype (bf16) and back to the fp32 parameter:
          |error| <= U * (|hidden|^T @ |d|) + U * |d_W|
    plus fp32 summation error, <= K * U32 * (the same absolute products) for a sum of K terms
    (K = V resp. tokens). The new tokens' deltas, h^T @ d[:, new], are fp32 in both: they differ by
    fp32 rounding of that sum and of d (through the logits, sums of D terms), <= (tokens + D) * U32
    * (|h|^T @ |d[:, new]|)."""
    hidden, targets, weights = inputs(jnp.bfloat16)
    model = head_model(tied, "bfloat16")
    dh, ds = grads(model, hidden, targets, weights, token_nll)
    reference = head_model(tied, "float32")
    ref_dh, ref_ds = grads(reference, hidden.astype(jnp.float32), targets, weights, plain_nll)
    assert dh.dtype == jnp.bfloat16

    # d nll / d logits of the reference, and the head as [D, V].
    h = np.asarray(hidden, np.float64).reshape(-1, CFG.hidden_size)
    logits = np.asarray(reference.logits(hidden.astype(jnp.float32)), np.float64).reshape(h.shape[0], -1)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    d = np.asarray(weights, np.float64).reshape(-1, 1) * (p / p.sum(-1, keepdims=True)
                                                          - np.eye(CFG.vocab_size)[np.asarray(targets).reshape(-1)])
    w = np.asarray(reference.head_kernel(), np.float64)
    head, delta = head_names(tied)

    abs_dh = (np.abs(d) @ np.abs(w).T).reshape(dh.shape)
    err_dh = np.abs(np.asarray(dh, np.float64) - np.asarray(ref_dh, np.float64))
    assert np.all(err_dh <= U * abs_dh + U * np.abs(ref_dh) + CFG.vocab_size * U32 * abs_dh)

    abs_dw = np.abs(h).T @ np.abs(d)
    got_dw, ref_dw = (np.asarray(s[head][...], np.float64) for s in (ds, ref_ds))
    if tied:  # the embedding is the head, transposed
        got_dw, ref_dw = got_dw.T, ref_dw.T
    err_dw = np.abs(got_dw - ref_dw)
    assert np.all(err_dw <= U * abs_dw + U * np.abs(ref_dw) + h.shape[0] * U32 * abs_dw)

    new = slice(START, START + NEW)
    abs_dd = np.abs(h).T @ np.abs(d[:, new])
    err_dd = np.abs(np.asarray(ds[delta][...], np.float64) - np.asarray(ref_ds[delta][...], np.float64))
    if tied:
        err_dd = err_dd.T
    assert np.all(err_dd <= (h.shape[0] + CFG.hidden_size) * U32 * abs_dd)


def test_bf16_head_backward_matmuls_take_bf16_operands():
    """No fp32 [tokens, V] x [D, V] product in the backward: every matmul with the vocabulary as a
    dimension takes bf16 operands and accumulates in fp32 (the new tokens' [D, n] rows stay fp32)."""
    model = head_model(False, "bfloat16")
    hidden, targets, weights = inputs(jnp.bfloat16)
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(jax.grad(lambda h, s: jnp.sum(weights * token_nll(nnx.merge(graphdef, s), h, targets)),
                                    argnums=(0, 1)))(hidden, state)
    vocab_dots = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"
                  and any(CFG.vocab_size in v.aval.shape for v in e.invars)]
    assert len(vocab_dots) == 4  # the logits, their recomputation in the backward, d_hidden, d_W
    for eqn in vocab_dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2
        assert eqn.outvars[0].aval.dtype == jnp.float32


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _equations(sub)
