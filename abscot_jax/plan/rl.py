"""The rl stage's bytes per device (abscot_jax/rl), beside the training step's plan (`memory_plan`).

A GRPO step samples its rollouts, then trains on them; the two never run at the same time, so

    peak = persistent + max(sampling, training)

  persistent  parameters and optimizer state (as `memory_plan` counts them) and the reference
              policy, held as the values of the trainable parameters it differs by
              (rl/trainer.py `reference_params`): in full fine-tuning a frozen copy of the starting
              weights; in LoRA mode zeros of the adapters and new-token rows, no copy of the base.
  sampling    the sampler's KV cache, R rows x S positions x layers x 2 (key, value) x KV heads x
              head_dim x compute-dtype bytes; the prompt pass's attention of one layer, R x H x P x S
              scores in fp32 and probabilities in the compute dtype; the weights in the compute dtype
              for decoding (every layer's split once, a copy whatever its dtype; the embedding and
              head where their dtype differs). R: rl.rollout_batch rows as the sampler forms them
              (within the step's P x K rollouts), split over data x fsdp. P: the longest prompt kept
              (`RunConfig.rl_prompt_limit`) and S: P plus rl.max_new_tokens, each rounded up to a power
              of two as the sampler buckets them. Heads split over tensor as in `memory_plan`.
  training    the gradient accumulator and one micro-batch's gradients, the weights in the compute
              dtype, and the activations of a micro-batch of train.batch_size x train.seq_len
              (`memory_plan`'s: the log-probs are computed in chunks of train.loss_chunk, as the loss).
Not counted: a decode step's own activations (R tokens), the prompt pass's other activations
(R x P x (hidden + mlp) values, small beside its scores) and the rollouts on the host.
"""
from __future__ import annotations

import bisect
import dataclasses

from abscot_jax.config import RunConfig
from abscot_jax.errors import ConfigError
from abscot_jax.model.config import Qwen3Config
from abscot_jax.plan import DTYPE_BYTES, MemoryPlan, _bytes_per_device, _parameters, _split, memory_plan
from abscot_jax.sampling.sampler import batch_rows, bucket


@dataclasses.dataclass(frozen=True)
class RLPlan:
    """Bytes per device of the rl stage at one rl.rollout_batch."""

    step: MemoryPlan  # the training step's plan (its parameters, optimizer state, activations)
    rollout_batch: int
    rows: int  # R per device
    prompt_positions: int  # P
    positions: int  # S
    reference: int
    kv_cache: int
    prompt_scores: int
    decode_weights: int

    @property
    def persistent(self) -> int:
        return self.step.frozen_params + self.step.trainable_params + self.step.optimizer + self.reference

    @property
    def sampling(self) -> int:
        return self.kv_cache + self.prompt_scores + self.decode_weights

    @property
    def gradients(self) -> int:
        return 2 * self.step.trainable_params  # the accumulator and one micro-batch's

    @property
    def training(self) -> int:
        return self.gradients + self.step.compute_copy + self.step.activations

    @property
    def total(self) -> int:
        return self.persistent + max(self.sampling, self.training)


def kv_cache_bytes(cfg: Qwen3Config, rows: int, positions: int, itemsize: int, heads_split: int = 1) -> int:
    """The sampler's KV cache (model/qwen3.py KVCache): a key and a value per layer, KV head and position."""
    return rows * positions * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * itemsize // heads_split


def rl_plan(model_cfg: Qwen3Config, run: RunConfig, num_devices: int, rollout_batch: int | None = None) -> RLPlan:
    """The rl stage's plan for `run` (rl.rollout_batch unless `rollout_batch` is given)."""
    cfg, rl = model_cfg, run.rl
    if run.rl_prompt_limit() < 1:
        raise ConfigError(f"rl.max_new_tokens={rl.max_new_tokens} leaves no room for a prompt within "
                          f"train.seq_len={run.train.seq_len}; raise train.seq_len or lower rl.max_new_tokens")
    step = memory_plan(cfg, run, num_devices)
    data, fsdp, tensor = step.mesh
    mesh = {"data": data, "fsdp": fsdp, "tensor": tensor}
    h, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    heads_split = _split(kv * hd, "kv_heads", mesh) if (h * hd) % tensor == 0 and kv % tensor == 0 else 1
    c = DTYPE_BYTES[run.model.compute_dtype]
    batch = rollout_batch or rl.rollout_batch
    shards = data * fsdp
    rows = batch_rows(min(batch, rl.prompts_per_step * rl.rollouts_per_prompt), 1, batch, shards) // shards
    prompt = bucket(run.rl_prompt_limit(), 1)
    positions = prompt + bucket(rl.max_new_tokens, 1)
    return RLPlan(
        step=step, rollout_batch=batch, rows=rows, prompt_positions=prompt, positions=positions,
        reference=step.trainable_params,
        kv_cache=kv_cache_bytes(cfg, rows, positions, c, heads_split),
        prompt_scores=rows * h * prompt * positions * (4 + c) // heads_split,
        decode_weights=sum(_bytes_per_device(a, mesh, c) for a in _parameters(cfg, run) if a.stacked or a.itemsize != c),
    )


def largest_rollout_batch(model_cfg: Qwen3Config, run: RunConfig, num_devices: int, budget: float) -> int:
    """The largest rl.rollout_batch whose plan fits `budget` bytes per device (0: none fits), at most
    a step's P x K rollouts (a larger one samples no more rows at once)."""
    rollouts = run.rl.prompts_per_step * run.rl.rollouts_per_prompt
    return bisect.bisect_right(range(1, rollouts + 1), budget,
                               key=lambda b: rl_plan(model_cfg, run, num_devices, b).total)
