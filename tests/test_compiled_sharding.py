"""The train step as XLA compiles it on 8 host devices: FSDP and FSDP x TP, read off the HLO.

Shapes are picked so that a buffer's dimensions say what it is: the sequence length (T = 384) and
the loss chunk's positions per row (96) appear in no weight, so a collective over a buffer with
either dimension moves activations or logits; weights have only hidden/head/mlp/vocab dimensions.
"""
import jax
import numpy as np
import pytest
from flax import nnx

from abscot_jax.config import OptimSection, TrainSection
from abscot_jax.data.synthetic_rows import packed_rows
from abscot_jax.errors import ConfigError
from abscot_jax.hlo import collectives
from abscot_jax.model.config import Qwen3Config
from abscot_jax.model.lora import LoRAConfig, apply_lora
from abscot_jax.model.qwen3 import Qwen3
from abscot_jax.sharding import BATCH_AXES, MeshConfig, make_mesh
from abscot_jax.train.step import TrainStep

ROWS, T, SPAN, HIDDEN, VOCAB = 8, 384, 96, 256, 4096
CFG = Qwen3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=32, tie_word_embeddings=True,
                  param_dtype="float32", compute_dtype="float32", attention_impl="xla")
TRAIN = dict(seq_len=T, batch_size=ROWS, loss_chunk=ROWS * SPAN)


def trainer(mode: str, mesh_config: MeshConfig, devices) -> TrainStep:
    model = Qwen3(CFG, rngs=nnx.Rngs(0))
    if mode == "lora":
        apply_lora(model, LoRAConfig(rank=8, alpha=16), new_token_start=VOCAB - 66, num_new_tokens=66)
    return TrainStep.create(model, OptimSection(), TrainSection(mode=mode, **TRAIN), total_steps=10,
                            mesh=make_mesh(mesh_config, devices))


@pytest.fixture(scope="module")
def batch():
    return packed_rows(np.random.default_rng(0), ROWS, T, VOCAB)


def token_buffers(found):
    """(kind, dims) of every collective buffer that has a sequence or loss-chunk dimension."""
    return [(c.kind, dims) for c in found for _, dims in c.shapes if T in dims or SPAN in dims]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fsdp_moves_only_weights_and_gradients(mode, batch):
    found = collectives(trainer(mode, MeshConfig(fsdp=8), jax.devices()[:8]).compile(batch).as_text())
    assert token_buffers(found) == []
    # FSDP: each layer's weights gathered (one layer at a time: a leading layer dimension of 1),
    # gradients summed over the batch shards.
    assert any(c.kind == "all-gather" and dims[:2] == (1, HIDDEN) for c in found for _, dims in c.shapes)
    assert any(c.kind in ("all-reduce", "reduce-scatter") and len(dims) == 2 and HIDDEN in dims
               for c in found for _, dims in c.shapes)


@pytest.mark.slow
def test_fsdp_x_tensor_moves_only_tensor_parallel_partial_sums(batch):
    """fsdp 2 x tensor 4: activations cross devices only as Megatron-style partial sums of the
    row-parallel projections ([rows, T, hidden]) and the vocabulary-parallel loss ([rows, span, hidden]
    and the log-sum-exp's [rows, span] statistics); never gathered, never as logits."""
    rows = ROWS // 2
    found = collectives(trainer("full", MeshConfig(fsdp=2, tensor=4), jax.devices()[:8]).compile(batch).as_text())
    moved = token_buffers(found)
    assert moved, "tensor parallelism must sum partial results"
    allowed = {(rows, T, HIDDEN), (rows, SPAN, HIDDEN), (rows, SPAN), (rows, SPAN, 1)}
    assert {kind for kind, _ in moved} == {"all-reduce"}
    assert {dims for _, dims in moved} <= allowed, moved


@pytest.mark.slow
def test_sharded_step_losses_equal_one_device(batch):
    """The same two optimizer steps on 1 device and on fsdp 8 / fsdp 2 x tensor 4 (fp32)."""
    def losses(mesh_config, devices):
        step = trainer("full", mesh_config, devices)
        return [float(step(batch)["loss"]) for _ in range(2)]

    reference = losses(MeshConfig(), jax.devices()[:1])
    for mesh_config in (MeshConfig(fsdp=8), MeshConfig(fsdp=2, tensor=4)):
        # fp32 sums over ~1.5k loss tokens in another order: relative error ~ 1e-7 per term.
        np.testing.assert_allclose(losses(mesh_config, jax.devices()[:8]), reference, rtol=1e-5)


def test_tensor_axis_that_does_not_divide_the_heads_is_one_clear_line():
    with pytest.raises(ConfigError, match="mesh.tensor=8 must divide the model's 6 attention heads") as err:
        model = Qwen3(CFG.replace(num_attention_heads=6, num_key_value_heads=2), rngs=nnx.Rngs(0))
        TrainStep.create(model, OptimSection(), TrainSection(**TRAIN), 10, make_mesh(MeshConfig(fsdp=1, tensor=8)))
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["blockwise", "pallas"])
@pytest.mark.parametrize("mesh_config", [MeshConfig(fsdp=8), MeshConfig(fsdp=2, tensor=4)])
def test_fused_attention_runs_on_each_devices_rows(impl, mesh_config, batch):
    """A kernel XLA cannot split (a loop over blocks, a Pallas call) runs per device (shard_map): the
    same outputs and gradients as on one device, and no collective moves its inputs (left to XLA,
    each device gathers the whole batch and computes all of it)."""
    from abscot_jax.model.attention import bottleneck_attention

    rng = np.random.default_rng(1)
    t = 96
    q, k, v = (jax.numpy.asarray(rng.standard_normal((ROWS, t, h, 16)), jax.numpy.float32) for h in (8, 4, 4))
    seg, roles = (jax.numpy.asarray(batch[key][0][:, :t]) for key in ("segment_ids", "roles"))
    real = (seg != 0)[:, :, None, None]

    def loss(q, k, v):
        return jax.numpy.sum(jax.numpy.where(real, bottleneck_attention(q, k, v, seg, roles, impl), 0) ** 2)

    grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
    reference = grad(q, k, v)
    mesh = make_mesh(mesh_config, jax.devices()[:8])
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_AXES))
    q, k, v = jax.device_put((q, k, v), rows)  # each device holds its rows, as in the train step
    with jax.set_mesh(mesh):
        text = grad.lower(q, k, v).compile().as_text()
        sharded = grad(q, k, v)
    # Only the loss (a scalar) is summed across devices; nothing of the batch is gathered.
    assert {dims for c in collectives(text) for _, dims in c.shapes} <= {()}
    for ours, theirs in zip(jax.tree.leaves(sharded), jax.tree.leaves(reference)):
        # Per row the same arithmetic, though XLA may order a sum differently for 1 row than for 8:
        # fp32 rounding of sums of ~100 terms, relative to the largest entry.
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(theirs))))
