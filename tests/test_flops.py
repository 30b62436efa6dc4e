"""Step accounting: processed vs loss tokens, allowed attention pairs, model FLOPs, peak lookup."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abscot_jax.data.roles import Role
from abscot_jax.data.synthetic_rows import PRESETS, packed_rows
from abscot_jax.model.attention import reference_mask
from abscot_jax.model.config import Qwen3Config
from abscot_jax.train.flops import allowed_pairs, peak_tflops, step_flops, throughput

P, C, A, Y = Role.PROMPT, Role.COT, Role.ABSTRACT, Role.ANSWER


def constructed_batch():
    """One row by hand: segment 1 = [x x c c c z y y], segment 2 = [x z y], 3 pads."""
    segs = np.array([[1] * 8 + [2] * 3 + [0] * 3])
    roles = np.array([[P, P, C, C, C, A, Y, Y, P, A, Y, 0, 0, 0]])
    loss_mask = np.array([[0, 0, 0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0]])  # targets z, y (and z in segment 2)
    return {"segment_ids": segs[None], "roles": roles[None], "loss_mask": loss_mask[None]}


def test_allowed_pairs_by_hand_and_against_the_reference_mask():
    batch = constructed_batch()
    # Segment 1: 8*9/2 = 36 causal pairs, less 2 answer queries x 3 CoT keys; segment 2: 3*4/2 = 6.
    assert allowed_pairs(batch["segment_ids"], batch["roles"]) == 36 - 6 + 6
    rng = np.random.default_rng(0)
    for preset in ("phase_a_short", "phase_b"):
        rows = packed_rows(rng, 3, 700, 50, PRESETS[preset])
        mask = reference_mask(jnp.asarray(rows["segment_ids"][0]), jnp.asarray(rows["roles"][0]))
        assert allowed_pairs(rows["segment_ids"], rows["roles"]) == int(mask.sum())


def test_processed_and_loss_tokens_and_flops():
    cfg = Qwen3Config(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    batch = constructed_batch()
    full = step_flops(cfg, batch)
    assert (full["processed_tokens"], full["loss_tokens"]) == (11, 5)
    # Projection weights per layer: q 8x8, k 8x4, v 8x4, o 8x8, gate/up/down 8x16 each = 576.
    matmuls = 11 * 2 * 6 * 576  # processed tokens x layers x (2 forward + 4 backward) x weights
    attention = 2 * 12 * 2 * 4 * 36  # layers x 12 x heads x head_dim x allowed pairs
    head = 5 * 6 * 8 * 100  # loss tokens x 6 x hidden x vocab
    assert full["flops"] == matmuls + attention + head
    lora = step_flops(cfg, batch, lora_rank=2, lora_targets=("q_proj",))
    # Frozen base: forward + activation gradients (4 per weight); the adapter (8x2 + 2x8) trains (6).
    assert lora["flops"] == 11 * 2 * (4 * 576 + 6 * 2 * (8 + 8)) + attention + 5 * 4 * 8 * 100


def test_throughput_and_mfu():
    cfg = Qwen3Config(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    batch = constructed_batch()
    out = throughput(cfg, batch, seconds=0.5, peak_tflops_per_device=1e-9)  # 1 kFLOP/s per device
    devices = jax.local_device_count()  # the batch's rows are spread over this process's devices
    assert out["tokens_per_s"] == 22 and out["loss_tokens_per_s"] == 10
    assert out["tokens_per_s_per_device"] == pytest.approx(22 / devices)
    assert out["mfu"] == pytest.approx(step_flops(cfg, batch)["flops"] / devices / 0.5 / 1e3)
    assert throughput(cfg, batch, 0.5, None)["mfu"] is None


def test_peak_by_device_kind():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("cpu") is None
    assert peak_tflops("NVIDIA H200", configured=500.0) == 500.0
