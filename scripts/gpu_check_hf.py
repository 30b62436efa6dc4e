"""The transformers + PEFT side of scripts/gpu_check.py, in a process of its own so that PyTorch and
JAX each have the accelerator to themselves. Same shapes, configs and packed rows as our step.

Two layouts of the same Phase A rows:
- `mask_4d`: the exact single-pass bottleneck mask as a 4-D boolean mask (SDPA then runs its
  masked kernel): what a correct PyTorch pipeline computes;
- `two_pass_causal`: causal attention with no mask (SDPA's flash kernel), standing for the
  two-pass layout ([x; c; z] and [x; z; y]) the PyTorch pipeline uses to keep FlashAttention. Timing
  only: segments are not isolated. That layout repeats x and z in the second pass, so its tokens/s
  is also given per Phase A token (divided by 1 + the repeated share).

    JAX_PLATFORMS=cpu python scripts/gpu_check_hf.py --out hf.json [--dry-run] [--layers 4] [--steps 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def check_shapes(dry_run: bool, layers: int, seq: int) -> dict:
    """Architecture (HF config dict) and sequence length of the check: Qwen3-4B cut to `layers`
    layers, or a tiny model for the dry run."""
    from abscot_jax.plan import PRESETS

    if dry_run:
        arch = {**PRESETS["qwen3-4b"], "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}
        return {"arch": {**arch, "num_hidden_layers": 2}, "seq": min(seq, 256)}
    return {"arch": {**PRESETS["qwen3-4b"], "num_hidden_layers": layers}, "seq": seq}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--rows", type=int, default=1, help="packed rows per step")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--modes", default="lora,full")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import numpy as np
    import torch
    from transformers import Qwen3Config as HFConfig, Qwen3ForCausalLM

    from abscot_jax.config import load_config
    from abscot_jax.data.roles import Role
    from abscot_jax.data.synthetic_rows import PHASE_A_DOLCI, packed_rows
    from bench_train import HFTrainer, hf_inputs

    shapes = check_shapes(args.dry_run, args.layers, args.seq)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(0)
    arch = shapes["arch"]
    batches = [packed_rows(rng, args.rows, shapes["seq"], arch["vocab_size"], PHASE_A_DOLCI) for _ in range(args.steps + 1)]
    processed = [int(np.count_nonzero(b["segment_ids"])) for b in batches]
    roles = np.concatenate([b["roles"][b["segment_ids"] > 0] for b in batches])
    repeated = float(np.mean((roles == Role.PROMPT) | (roles == Role.ABSTRACT)))  # x and z, seen twice
    results = []
    for mode in args.modes.split(","):
        run = load_config(CONFIGS / f"qwen3_4b_{mode}.yaml", [])
        torch.manual_seed(0)
        with torch.device(device):  # initialised where it runs: a 4B model's CPU init takes minutes
            base = Qwen3ForCausalLM(HFConfig(**arch, attn_implementation="sdpa"))
        base = base.to(dtype=torch.bfloat16 if run.model.param_dtype == "bfloat16" else torch.float32)
        base.config.use_cache = False
        if run.model.remat != "none":
            base.gradient_checkpointing_enable()
        for layout in ("mask_4d", "two_pass_causal"):
            record = {"side": "hf", "mode": mode, "layout": layout, "device": device}
            try:
                trainer = HFTrainer(base, mode, run.optim, run.lora.rank, run.lora.alpha, run.lora.dropout,
                                    run.lora.targets, autocast_dtype=torch.bfloat16)
                inputs = [hf_inputs(b) for b in batches]
                if layout == "two_pass_causal":
                    for x in inputs:
                        del x["attention_mask"]
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                trainer(inputs[0])  # warm-up
                times = []
                for x in inputs[1:]:
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    trainer(x)  # float(loss) waits for the step
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                step_s = statistics.median(times)
                tokens_per_s = statistics.median(processed[1:]) / step_s
                record.update(step_s=step_s, tokens_per_s=tokens_per_s,
                              peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None)
                if layout == "two_pass_causal":
                    record.update(repeated_share=repeated, phase_a_tokens_per_s=tokens_per_s / (1 + repeated))
                del trainer
            except Exception as e:  # noqa: BLE001 - recorded and reported by gpu_check as a failed measurement
                record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            results.append(record)
            if device == "cuda":
                torch.cuda.empty_cache()
        del base
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
