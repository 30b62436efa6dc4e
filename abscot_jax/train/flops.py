"""What a training step computes: processed tokens, loss tokens, model FLOPs, and MFU.

Throughput counts the tokens the step processes (every non-padding token), not only the
loss-weighted ones (trace + answer, a small part of a Phase A row). Model FLOPs count the work
the step must do, not what a kernel happens to do: recomputation (remat) is not counted, nor are
attention pairs the mask forbids (a kernel that skips empty tiles gets no credit for skipping).

Per layer and processed token, a forward pass multiplies by each projection once (2 FLOPs per
weight); a backward pass takes twice that when the weights train (activation and weight
gradients) and once when they are frozen (LoRA: activation gradients only, plus the adapters).
Attention: 4·hd FLOPs per head per allowed (query, key) pair forward (QKᵀ and PV), 8·hd backward.
The head: logits are computed only where the loss has weight (abscot_jax.train.loss).
"""
from __future__ import annotations

import numpy as np

from abscot_jax.data.roles import Role
from abscot_jax.model.config import Qwen3Config

# Dense bf16 peak TFLOP/s per device (vendor datasheets, without sparsity), by device-kind substring.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0,
               "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def peak_tflops(device_kind: str, configured: float = 0.0) -> float | None:
    """The configured figure if set, else the table's for this device kind, else None (no MFU)."""
    if configured:
        return configured
    if "PCIe" in device_kind and "H100" in device_kind:
        return 756.0
    for name in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "GH200" before "H200"
        if name in device_kind:
            return PEAK_TFLOPS[name]
    return None


def allowed_pairs(segment_ids: np.ndarray, roles: np.ndarray) -> int:
    """Number of (query, key) pairs the bottleneck mask allows, summed over rows, in O(T) a row:
    causal pairs within each segment, less the pairs of an ANSWER query and an earlier COT key."""
    seg = segment_ids.reshape(-1, segment_ids.shape[-1]).astype(np.int64)
    roles = roles.reshape(seg.shape)
    total = 0
    for row_seg, row_roles in zip(seg, roles):
        _, counts = np.unique(row_seg[row_seg != 0], return_counts=True)
        total += int(np.sum(counts * (counts + 1) // 2))
        # COT keys at or before each position in its segment: running count, reset at segment starts.
        cot = np.cumsum(row_roles == Role.COT)
        starts = np.concatenate([[True], row_seg[1:] != row_seg[:-1]])
        before_segment = np.maximum.accumulate(np.where(starts, cot - (row_roles == Role.COT), 0))
        answer = (row_roles == Role.ANSWER) & (row_seg != 0)
        total -= int(np.sum((cot - before_segment)[answer]))
    return total


def step_flops(cfg: Qwen3Config, batch: dict, *, lora_rank: int = 0, lora_targets: tuple[str, ...] = ()) -> dict:
    """Processed tokens, loss tokens and model FLOPs of one step on `batch` (host arrays with
    segment_ids, roles, loss_mask). LoRA when `lora_rank` > 0 (base frozen)."""
    from abscot_jax.model.qwen3 import projection_shapes

    processed = int(np.count_nonzero(batch["segment_ids"]))
    loss_tokens = int(np.count_nonzero(batch["loss_mask"]))
    shapes = projection_shapes(cfg)
    forward = 2 * sum(fan_in * fan_out for fan_in, fan_out in shapes.values())  # per token and layer
    backward = 2 * forward if not lora_rank else forward
    adapters = 6 * sum(lora_rank * (shapes[n][0] + shapes[n][1]) for n in lora_targets) if lora_rank else 0
    layers = cfg.num_hidden_layers
    attention_per_pair = 12 * cfg.num_attention_heads * cfg.head_dim  # forward 4·hd, backward 8·hd
    head = 2 * cfg.hidden_size * cfg.vocab_size * (3 if not lora_rank else 2)
    flops = (processed * layers * (forward + backward + adapters)
             + layers * attention_per_pair * allowed_pairs(batch["segment_ids"], batch["roles"])
             + loss_tokens * head)
    return {"processed_tokens": processed, "loss_tokens": loss_tokens, "flops": float(flops)}


def throughput(cfg: Qwen3Config, local_batch: dict, seconds: float, peak_tflops_per_device: float | None, *,
               lora_rank: int = 0, lora_targets: tuple[str, ...] = ()) -> dict:
    """Step metrics from this process's rows: processed and loss tokens per second (all processes,
    assuming each process's rows are like this one's), per device, and MFU (None without a peak)."""
    import jax

    counted = step_flops(cfg, local_batch, lora_rank=lora_rank, lora_targets=lora_targets)
    processes, local_devices = jax.process_count(), jax.local_device_count()
    per_device_flops = counted["flops"] / local_devices / seconds
    return {
        "processed_tokens": counted["processed_tokens"] * processes,
        "tokens_per_s": counted["processed_tokens"] * processes / seconds,
        "loss_tokens_per_s": counted["loss_tokens"] * processes / seconds,
        "tokens_per_s_per_device": counted["processed_tokens"] / local_devices / seconds,
        "mfu": per_device_flops / (peak_tflops_per_device * 1e12) if peak_tflops_per_device else None,
    }
