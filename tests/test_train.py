import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from abscot_jax.config import OptimSection, TrainSection
from abscot_jax.data.roles import Role
from abscot_jax.model.config import Qwen3Config
from abscot_jax.model.lora import LoRAConfig, apply_lora, merge_lora
from abscot_jax.model.qwen3 import Qwen3
from abscot_jax.sharding import MeshConfig, make_mesh, state_shardings
from abscot_jax.train.loss import loss_sums
from abscot_jax.train.step import TrainStep, accumulated_grads, trainable_filter

CFG = Qwen3Config(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def random_batch(seed=0, accum=1, b=8, t=24, vocab=160):
    rng = np.random.default_rng(seed)
    shape = (accum, b, t)
    seg = np.ones(shape, np.int32)
    seg[..., t // 2:] = 2  # two packed segments per row
    seg[..., -3:] = 0  # and padding
    positions = np.where(np.arange(t) < t // 2, np.arange(t), np.arange(t) - t // 2)
    return dict(
        tokens=rng.integers(0, vocab, shape).astype(np.int32),
        positions=np.broadcast_to(positions, shape).astype(np.int32),
        segment_ids=seg,
        roles=rng.integers(0, 4, shape).astype(np.int32),
        targets=rng.integers(0, vocab, shape).astype(np.int32),
        loss_mask=((rng.random(shape) < 0.6) & (seg > 0)).astype(np.float32),
    )


def grads_on_mesh(mesh_config, devices, mode="full"):
    model = Qwen3(CFG, rngs=nnx.Rngs(0))
    if mode == "lora":
        apply_lora(model, LoRAConfig(rank=4, alpha=8), new_token_start=150, num_new_tokens=10)
        # Non-zero B so that every adapter receives a gradient.
        for var in jax.tree.leaves(nnx.state(model, nnx.LoRAParam), is_leaf=lambda x: isinstance(x, nnx.Variable)):
            var[...] = var[...] + 0.01
    mesh = make_mesh(mesh_config, devices)
    wrt = trainable_filter(mode)
    state = nnx.state(model)
    graphdef = nnx.graphdef(model)
    state = jax.device_put(state, state_shardings(state, mesh))

    @jax.jit
    def run(state, batch):
        return accumulated_grads(nnx.merge(graphdef, state), wrt, batch, jax.random.key(0), chunk=50)

    with jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, "use_mesh") else jax.set_mesh(mesh):
        grads, sums = run(state, random_batch())
    return jax.tree.map(np.asarray, grads), {k: float(v) for k, v in sums.items()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("mesh_config", [MeshConfig(fsdp=2, tensor=4), MeshConfig(data=8, fsdp=1)])
def test_sharded_loss_and_grads_equal_single_device(mesh_config, mode):
    ref_grads, ref_sums = grads_on_mesh(MeshConfig(), jax.devices()[:1], mode)
    grads, sums = grads_on_mesh(mesh_config, jax.devices()[:8], mode)
    for k in ref_sums:
        assert sums[k] == pytest.approx(ref_sums[k], rel=1e-5)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
    flat = dict(jax.tree_util.tree_leaves_with_path(grads))
    assert len(flat_ref) == len(flat) > 0
    for path, ref in flat_ref:
        got = flat[path]
        assert np.linalg.norm(got - ref) <= 1e-5 * np.linalg.norm(ref) + 1e-12, jax.tree_util.keystr(path)


def plain_loss_sums(model, batch):
    """Reference: full [B, T, V] logits, optax cross-entropy, split by the role of the target."""
    logits = model(batch["tokens"], batch["positions"], batch["segment_ids"], batch["roles"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    w = batch["loss_mask"]
    target_role = jnp.concatenate([batch["roles"][:, 1:], jnp.zeros_like(batch["roles"][:, :1])], axis=1)
    return {"nll": jnp.sum(nll * w), "weight": jnp.sum(w),
            "trace_nll": jnp.sum(nll * w * (target_role == Role.ABSTRACT)),
            "answer_nll": jnp.sum(nll * w * (target_role == Role.ANSWER))}


@pytest.mark.slow
@pytest.mark.parametrize("sparse", [False, True])
def test_chunked_loss_and_grads_equal_plain_loss(sparse):
    model = Qwen3(CFG, rngs=nnx.Rngs(1))
    batch = {k: jnp.asarray(v[0]) for k, v in random_batch(seed=3).items()}
    if sparse:  # weight only in the last few positions of half the rows: most chunks are skipped
        batch["loss_mask"] = batch["loss_mask"].at[:, :16].set(0).at[::2].set(0)
    graphdef, state = nnx.split(model)

    def loss_of(fn):
        return jax.value_and_grad(lambda s: fn(nnx.merge(graphdef, s)))(state)

    plain, plain_grads = loss_of(lambda m: plain_loss_sums(m, batch)["nll"])
    ref = plain_loss_sums(model, batch)
    for chunk in (7, 64, 10_000):  # chunks that do and do not divide B*T
        sums = loss_sums(model, batch, chunk=chunk)
        for key in ref:
            assert float(sums[key]) == pytest.approx(float(ref[key]), rel=1e-5, abs=1e-5), key
        chunked, grads = loss_of(lambda m: loss_sums(m, batch, chunk=chunk)["nll"])
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
            assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b) + 1e-7


@pytest.mark.slow
def test_lora_delta_gradients_equal_autodiff_of_the_formula():
    from abscot_jax.model.qwen3 import lora_delta

    keys = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(keys[0], (3, 5, 12))
    a = jax.random.normal(keys[1], (12, 4))
    b = jax.random.normal(keys[2], (4, 7))
    g = jax.random.normal(keys[3], (3, 5, 7))

    def objective(delta):
        return lambda h, a, b: jnp.sum(g * delta(h, a, b))

    ours = jax.grad(objective(lambda h, a, b: lora_delta(h, a, b, 2.5)), argnums=(0, 1, 2))(h, a, b)
    ref = jax.grad(objective(lambda h, a, b: (h @ a) @ b * 2.5), argnums=(0, 1, 2))(h, a, b)
    for x, y in zip(ours, ref):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_grad_accumulation_equals_one_big_batch():
    one = random_batch(seed=5, accum=1, b=8)
    two = {k: v.reshape(2, 4, *v.shape[2:]) for k, v in one.items()}
    model = Qwen3(CFG, rngs=nnx.Rngs(2))
    g1, s1 = accumulated_grads(model, nnx.Param, one, jax.random.key(0), 64)
    g2, s2 = accumulated_grads(model, nnx.Param, two, jax.random.key(0), 64)
    assert float(s1["weight"]) == float(s2["weight"])
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)


@pytest.mark.slow
def test_lora_zero_b_is_base_and_step_touches_only_adapters_and_new_rows(tmp_path):
    model = Qwen3(CFG.replace(tie_word_embeddings=False), rngs=nnx.Rngs(3))
    batch = random_batch(seed=6)
    inputs = [jnp.asarray(batch[k][0]) for k in ("tokens", "positions", "segment_ids", "roles")]
    base_logits = np.asarray(model(*inputs))
    base_state = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.LoRAParam)))
    apply_lora(model, LoRAConfig(rank=4, alpha=8), new_token_start=150, num_new_tokens=10)
    np.testing.assert_array_equal(np.asarray(model(*inputs)), base_logits)

    lora_before = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
    trainer = TrainStep.create(model, OptimSection(learning_rate=1e-2, warmup_ratio=0.0),
                               TrainSection(mode="lora"), total_steps=4, mesh=make_mesh(MeshConfig(), jax.devices()[:1]))
    for _ in range(2):
        trainer(batch)
    trained = trainer.model()
    after = jax.tree.map(np.asarray, nnx.state(trained, nnx.Not(nnx.LoRAParam)))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(base_state), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    lora_after = nnx.state(trained, nnx.LoRAParam)
    for name in ("q_proj", "down_proj"):
        b_after, b_before = lora_after["lora"][name]["b"], lora_before["lora"][name]["b"]
        assert not np.array_equal(np.asarray(b_after.value), b_before.value), name
    for name in ("embed_delta", "head_delta"):
        assert not np.array_equal(np.asarray(lora_after[name].value), lora_before[name].value), name

    # Merging folds the adapters in: same logits, and only the new rows of embed / head moved.
    adapted_logits = np.asarray(trained(*inputs))
    row = jnp.asarray(batch["tokens"][0][:1, :12])  # one unpacked sequence: plain causal here and in transformers
    single = (row, jnp.arange(12)[None], jnp.ones_like(row), jnp.zeros_like(row))
    adapted_single = np.asarray(trained(*single))
    merged = merge_lora(trained)
    np.testing.assert_allclose(np.asarray(merged(*inputs)), adapted_logits, atol=2e-5)
    embed_changed = np.any(np.asarray(merged.embed.value) != base_state["embed"].value, axis=1)
    # (a new row moves only if its token occurs in the batch; the head's columns always get a gradient)
    assert embed_changed[150:].any() and not embed_changed[:150].any()
    head_changed = np.any(np.asarray(merged.lm_head.value) != base_state["lm_head"].value, axis=0)
    assert head_changed[150:].all() and not head_changed[:150].any()

    # The merged export, loaded by transformers, gives the adapted (unmerged) model's logits.
    import torch
    from transformers import AutoModelForCausalLM

    from abscot_jax.checkpoint import save_hf

    save_hf(merged, tmp_path / "merged", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        theirs = hf(torch.as_tensor(np.asarray(row), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, adapted_single, atol=1e-4)
