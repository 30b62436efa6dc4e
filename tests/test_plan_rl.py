"""The rl stage's memory plan (abscot_jax/plan/rl.py): its terms against hand computations and the
sampler's real cache, the largest rollout batch, and the command line's verdict."""
from pathlib import Path

import jax
import jax.numpy as jnp

from abscot_jax.config import load_config
from abscot_jax.model.config import Qwen3Config
from abscot_jax.model.qwen3 import KVCache
from abscot_jax.plan import PRESETS, memory_plan
from abscot_jax.plan.__main__ import main
from abscot_jax.plan.rl import kv_cache_bytes, largest_rollout_batch, rl_plan

QWEN3_4B = Qwen3Config.from_hf_dict(PRESETS["qwen3-4b"])
# configs/qwen3_4b_lora.yaml (bf16 base and compute, rows of 8192 tokens) with 8 prompts x 8 rollouts of
# 2048 new tokens, prompts <= 512, on a mesh of any size.
LORA = str(Path(__file__).resolve().parents[1] / "configs" / "qwen3_4b_lora.yaml")
RL_RUN = ["mesh.fsdp=-1", "rl.enabled=true", "rl.prompts_per_step=8", "rl.rollouts_per_prompt=8",
          "rl.max_new_tokens=2048", "rl.max_prompt_tokens=512", "rl.rollout_batch=64"]


def test_kv_cache_and_prompt_pass_by_hand():
    plan = rl_plan(QWEN3_4B, load_config(LORA, [*RL_RUN, "mesh.fsdp=2"]), num_devices=2)
    # 36 layers x (key + value) x 8 KV heads x head_dim 128 x 2 bytes (bf16) a position
    per_position = 36 * 2 * 8 * 128 * 2
    assert per_position == 147_456
    # 64 rollout rows split over fsdp 2; prompt bucket 512 + new-token bucket 2048
    assert (plan.rows, plan.prompt_positions, plan.positions) == (32, 512, 2560)
    assert plan.kv_cache == 32 * 2560 * per_position == 12_079_595_520  # 11.25 GiB
    # one layer's prompt pass: 32 rows x 32 heads x 512 queries x 2560 slots, fp32 scores + bf16 probabilities
    assert plan.prompt_scores == 32 * 32 * 512 * 2560 * (4 + 2)


def test_kv_cache_term_is_the_samplers_cache():
    """kv_cache_bytes against the arrays KVCache.zeros allocates (shapes only; nothing allocated)."""
    cfg = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, compute_dtype="bfloat16")
    cache = jax.eval_shape(lambda: KVCache.zeros(cfg, 5, 96))
    kv = sum(a.size * a.dtype.itemsize for a in (*cache.k, *cache.v))
    assert jnp.dtype(cache.k[0].dtype).itemsize == 2
    assert kv_cache_bytes(cfg, rows=5, positions=96, itemsize=2) == kv == 5 * 96 * 3 * 2 * 2 * 16 * 2


def test_reference_policy_and_gradients():
    lora = rl_plan(QWEN3_4B, load_config(LORA, RL_RUN), num_devices=1)
    shapes = [(2560, 4096), (2560, 1024), (2560, 1024), (4096, 2560), (2560, 9728), (2560, 9728), (9728, 2560)]
    adapters = 36 * 32 * sum(fan_in + fan_out for fan_in, fan_out in shapes)  # rank 32, all 7 projections
    assert lora.reference == (adapters + 66 * 2560) * 4  # zeros of the fp32 adapters and new-token rows, no base
    full = rl_plan(QWEN3_4B, load_config(LORA, [*RL_RUN, "train.mode=full", "model.param_dtype=float32",
                                                "mesh.fsdp=2"]), num_devices=2)
    step = memory_plan(QWEN3_4B, load_config(LORA, [*RL_RUN, "train.mode=full", "model.param_dtype=float32",
                                                    "mesh.fsdp=2"]), num_devices=2)
    assert full.reference == step.trainable_params  # a frozen copy of the fp32 weights, split as they are
    assert full.gradients == 2 * step.trainable_params
    assert full.total == full.persistent + max(full.sampling, full.training)


def test_largest_rollout_batch_is_the_last_that_fits():
    run = load_config(LORA, RL_RUN)
    totals = {b: rl_plan(QWEN3_4B, run, 1, b).total for b in (20, 21)}
    assert totals[21] > totals[20]  # one row per rollout on one device
    assert largest_rollout_batch(QWEN3_4B, run, 1, totals[20]) == 20
    assert largest_rollout_batch(QWEN3_4B, run, 1, totals[21] - 1) == 20
    assert largest_rollout_batch(QWEN3_4B, run, 1, 10**15) == 64  # never more than a step's 8 x 8 rollouts
    assert largest_rollout_batch(QWEN3_4B, run, 1, rl_plan(QWEN3_4B, run, 1, 1).total - 1) == 0


def test_cli_rl_verdict_and_one_line_when_the_rollout_batch_does_not_fit(capsys):
    def plan_cli(*settings, memory="80GB"):
        code = main(["--config", LORA, "--hf-config", "qwen3-4b", "--devices", "1", "--device-memory", memory,
                     *[a for s in (*RL_RUN, *settings) for a in ("--set", s)]])
        captured = capsys.readouterr()
        return code, captured.out.strip().splitlines(), captured.err.strip().splitlines()

    code, out, err = plan_cli()
    assert code == 0 and not err
    assert out[-1].startswith("rl fits: ") and out[-1].endswith(
        "the largest rl.rollout_batch that fits: 64 (all 64 rollouts of a step at once)")
    assert "sampling: KV cache                                       22.50" in out  # 64 rows x 2560 x 147,456 B

    long_prompts = ("rl.max_prompt_tokens=6144",)  # a [64, 32, 8192, 10240] prompt pass
    largest = largest_rollout_batch(QWEN3_4B, load_config(LORA, [*RL_RUN, *long_prompts]), 1, 0.92 * 80 * 2**30)
    assert 0 < largest < 64
    code, out, err = plan_cli(*long_prompts)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: rl.rollout_batch=64 does not fit: ")
    assert err[0].endswith(f"; set rl.rollout_batch={largest}")
    # 27.6 GiB: the update fits (8.5 + 9.1 GiB), one row of 6,144-token prompts does not (8.5 + 23.3 GiB)
    code, out, err = plan_cli(*long_prompts, memory="30GB")
    assert code == 2 and err == [err[0]] and err[0].endswith(
        "not even one rollout row fits: lower rl.max_prompt_tokens or rl.max_new_tokens")
    code, out, err = plan_cli("train.mode=full", "model.param_dtype=float32")  # 1 x 80 GB: the update is 90+ GiB
    assert code == 2 and err == [err[0]] and err[0].endswith(
        "the update alone does not fit: use more devices, LoRA or a shorter train.seq_len")


def test_cli_rl_new_tokens_longer_than_the_rows_is_one_line(capsys):
    assert main(["--hf-config", "qwen3-4b", "--set", "rl.enabled=true", "--set", "rl.max_new_tokens=2048"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: rl.max_new_tokens=2048 leaves no room for a prompt within train.seq_len=1024; raise train.seq_len "
        "or lower rl.max_new_tokens"]
