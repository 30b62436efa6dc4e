"""Remat policies (`model.remat`): each gives the loss and gradients of no remat; unknown names are
one-line config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from abscot_jax.config import load_config
from abscot_jax.data.roles import Role
from abscot_jax.errors import ConfigError
from abscot_jax.model.config import REMAT_POLICIES, Qwen3Config
from abscot_jax.model.lora import LoRAConfig, apply_lora
from abscot_jax.model.qwen3 import Qwen3
from abscot_jax.train.loss import loss_sums

CFG = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def packed_batch(rows=2, length=40):
    """Two Phase A sequences per row (prompt, CoT, trace, answer), then padding."""
    roles = [Role.PROMPT] * 4 + [Role.COT] * 6 + [Role.ABSTRACT] * 3 + [Role.ANSWER] * 4  # 17 tokens
    segment = np.array([1] * 17 + [2] * 17 + [0] * (length - 34))
    positions = np.r_[np.arange(17), np.arange(17), np.zeros(length - 34)]
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (rows, length))
    return {
        "tokens": jnp.asarray(tokens, jnp.int32),
        "positions": jnp.asarray(np.tile(positions, (rows, 1)), jnp.int32),
        "segment_ids": jnp.asarray(np.tile(segment, (rows, 1)), jnp.int32),
        "roles": jnp.asarray(np.tile(np.r_[roles, roles, [0] * (length - 34)], (rows, 1)), jnp.int32),
        "targets": jnp.asarray(np.roll(tokens, -1, axis=1), jnp.int32),
        "loss_mask": jnp.asarray(np.tile((segment > 0) & (np.arange(length) % 17 >= 9), (rows, 1)), jnp.float32),
    }


def loss_and_grads(remat: str, mode: str, attention_impl: str):
    model = Qwen3(CFG.replace(remat=remat, attention_impl=attention_impl), rngs=nnx.Rngs(0))
    wrt = nnx.Param
    if mode == "lora":  # with dropout: the recomputed forward must draw the same masks
        apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.2), new_token_start=56, num_new_tokens=8)
        for var in jax.tree.leaves(nnx.state(model, nnx.LoRAParam), is_leaf=lambda x: isinstance(x, nnx.Variable)):
            var[...] = var[...] + 0.01  # non-zero B and deltas: every adapter gets a gradient
        wrt = nnx.LoRAParam
    graphdef, trainable, rest = nnx.split(model, wrt, ...)

    def loss(trainable):
        return loss_sums(nnx.merge(graphdef, trainable, rest), packed_batch(), chunk=32,
                         dropout_key=jax.random.key(1))["nll"]

    return jax.jit(jax.value_and_grad(loss))(trainable)


@pytest.mark.slow
@pytest.mark.parametrize("mode,attention_impl", [("full", "xla"), ("lora", "blockwise")])
def test_remat_policies_give_the_loss_and_gradients_of_none(mode, attention_impl):
    ref_loss, ref_grads = loss_and_grads("none", mode, attention_impl)
    for remat in REMAT_POLICIES:
        if remat == "none":
            continue
        loss, grads = loss_and_grads(remat, mode, attention_impl)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5, err_msg=remat)
        flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
        assert len(flat_ref) == len(jax.tree.leaves(grads)) > 0
        for (path, ref), got in zip(flat_ref, jax.tree.leaves(grads)):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=f"{remat} {jax.tree_util.keystr(path)}")


def test_unknown_remat_is_one_config_error_line():
    expected = ", ".join(REMAT_POLICIES)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.remat=selective"])
    assert str(err.value) == f"model.remat must be one of {expected}"
    with pytest.raises(ConfigError) as err:
        CFG.replace(remat="selective")
    assert str(err.value) == f"remat='selective'; expected one of {expected}"
