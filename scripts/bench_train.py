"""Training-step throughput: our jitted step vs HF transformers + PEFT on PyTorch CPU.

The same small Qwen3 (same initial weights), the same packed Phase A batches (all four roles, the
bottleneck mask, several segments per row, padding), AdamW with global-norm clipping, for LoRA
(r=32 on q, k, v, o, gate, up, down) and for full fine-tuning. The two sides' steps are
interleaved and the medians taken, so both see the same machine load. Our compile time (lowering
and compiling the step) is reported apart. Thread counts stay at each library's default.

    python scripts/bench_train.py            # 5 timed steps per side and mode
    python scripts/bench_train.py --attention xla --modes full

Last line: `lora_speedup_vs_hf=<float> full_speedup_vs_hf=<float>` (tokens/s ours / theirs).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from abscot_jax.config import OptimSection, TrainSection
from abscot_jax.hostmem import keep_freed_memory
from abscot_jax.data.synthetic_rows import packed_rows
from abscot_jax.model.attention import reference_mask
from abscot_jax.model.config import Qwen3Config
from abscot_jax.model.lora import DEFAULT_TARGETS, LoRAConfig, apply_lora
from abscot_jax.model.qwen3 import Qwen3
from abscot_jax.sharding import MeshConfig, make_mesh
from abscot_jax.train.step import TrainStep

HF_NAMES = {  # ours -> HF per-layer module path (torch Linear weights are [out, in])
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj", "input_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
    "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm",
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", default="lora,full")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side and mode (after one warm-up step)")
    p.add_argument("--attention", default="auto", help="our attention_impl: auto | blockwise | xla")
    p.add_argument("--remat", default="none")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-attention-check", dest="attention_check", action="store_false",
                   help="skip timing one attention layer alone (ours vs dense XLA vs transformers' SDPA)")
    return p.parse_args()


# ---- HF side ----------------------------------------------------------------------------------
def hf_model(args):
    from transformers import Qwen3Config as HFConfig, Qwen3ForCausalLM

    torch.manual_seed(args.seed)
    config = HFConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, tie_word_embeddings=True, max_position_embeddings=args.seq,
        attn_implementation="sdpa",
    )
    return Qwen3ForCausalLM(config).float(), config


def hf_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """The same micro-batch for transformers: the 4-D boolean mask from `reference_mask` (a padding
    row may see itself, so SDPA never softmaxes an empty row: no NaN, and padding has no loss)."""
    b = {k: v[0] for k, v in batch.items()}
    mask = np.array(reference_mask(jnp.asarray(b["segment_ids"]), jnp.asarray(b["roles"])))
    pad = b["segment_ids"] == 0
    mask |= np.eye(mask.shape[-1], dtype=bool)[None] & pad[:, :, None]
    labels = np.full_like(b["tokens"], -100)  # HF shifts labels by one inside the loss
    labels[:, 1:] = np.where(b["loss_mask"][:, :-1] > 0, b["tokens"][:, 1:], -100)
    return dict(input_ids=torch.from_numpy(b["tokens"]).long(), position_ids=torch.from_numpy(b["positions"]).long(),
                attention_mask=torch.from_numpy(mask)[:, None], labels=torch.from_numpy(labels).long())


class HFTrainer:
    """One optimizer step of transformers (+ PEFT for LoRA) on `base`'s device: AdamW, global-norm
    clipping, under autocast to `autocast_dtype` when given (mixed precision, as DeepSpeed runs it)."""

    def __init__(self, base, mode: str, optim: OptimSection, lora_rank: int, lora_alpha: float,
                 lora_dropout: float = 0.0, targets=DEFAULT_TARGETS, autocast_dtype=None):
        import copy

        model = copy.deepcopy(base)
        if mode == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=lora_alpha,
                                                     lora_dropout=lora_dropout, target_modules=list(targets)))
        model.train()
        self.model = model
        self.device = next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=optim.learning_rate, betas=(optim.b1, optim.b2),
                                     eps=optim.eps, weight_decay=optim.weight_decay)
        self.clip = optim.clip_norm
        self.autocast_dtype = autocast_dtype

    def __call__(self, inputs) -> float:
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            loss = self.model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss)


# ---- our side ---------------------------------------------------------------------------------
def our_model(hf, args) -> Qwen3:
    cfg = Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, tie_word_embeddings=True, rms_norm_eps=hf.config.rms_norm_eps,
        rope_theta=float(hf.config.rope_parameters["rope_theta"]), remat=args.remat,
        attention_impl=args.attention,
    )
    model = Qwen3(cfg, rngs=nnx.Rngs(args.seed))
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    for ours, theirs in HF_NAMES.items():
        layers = [sd[f"model.layers.{i}.{theirs}.weight"] for i in range(args.layers)]
        stacked = np.stack([w.T if w.ndim == 2 else w for w in layers])
        getattr(model, ours)[...] = jnp.asarray(stacked)
    model.embed[...] = jnp.asarray(sd["model.embed_tokens.weight"])
    model.final_norm[...] = jnp.asarray(sd["model.norm.weight"])
    return model


def attention_layer_times(batch: dict, args, reps: int = 5) -> dict[str, float]:
    """Median seconds of one attention layer, forward + backward, on the benchmark's batch: our
    blockwise kernel, the dense XLA reference, and what transformers runs (K/V repeated per head,
    SDPA with the 4-D boolean mask). Interleaved like the steps."""
    from abscot_jax.model.attention import bottleneck_attention

    b, t, h, kv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(b, t, h, d), (b, t, kv, d), (b, t, kv, d)])
    seg, roles = jnp.asarray(batch["segment_ids"][0]), jnp.asarray(batch["roles"][0])

    def ours(impl):
        f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(bottleneck_attention(q, k, v, seg, roles, impl) ** 2), (0, 1, 2)))
        return lambda: jax.block_until_ready(f(q, k, v))

    mask = hf_inputs(batch)["attention_mask"]
    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))

    def hf_sdpa():
        out = torch.nn.functional.scaled_dot_product_attention(
            tq, tk.repeat_interleave(h // kv, 1), tv.repeat_interleave(h // kv, 1), attn_mask=mask)
        (out**2).sum().backward()

    fns = {"ours (blockwise)": ours("blockwise"), "xla dense": ours("xla"), "hf sdpa": hf_sdpa}
    for f in fns.values():
        f()  # compile / warm up
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    keep_freed_memory()  # as the train command does (abscot_jax/hostmem.py); torch here benefits too
    args = parse_args()
    optim = OptimSection(learning_rate=1e-4, warmup_ratio=0.0, clip_norm=1.0)
    rng = np.random.default_rng(args.seed)
    batches = [packed_rows(rng, args.batch, args.seq, args.vocab) for _ in range(args.steps + 1)]
    hf_batches = [hf_inputs(b) for b in batches]
    tokens_per_step = args.batch * args.seq
    real = float(np.mean([(b["segment_ids"] > 0).mean() for b in batches]))
    print(f"machine: {platform.processor() or platform.machine()}, {jax.local_device_count()} JAX CPU device(s), "
          f"torch threads {torch.get_num_threads()}, jax {jax.__version__}, torch {torch.__version__}")
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv, head_dim "
          f"{args.head_dim}, mlp {args.intermediate}, vocab {args.vocab}, fp32; batch {args.batch} x seq {args.seq} "
          f"({real:.0%} real tokens, Phase A mask); our attention: {args.attention}")
    if args.attention_check:
        layer = attention_layer_times(batches[0], args)
        print("one attention layer, forward + backward (median s): "
              + ", ".join(f"{name} {sec:.3f}" for name, sec in layer.items()))
    hf_base, _ = hf_model(args)
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    speedups = {}
    for mode in args.modes.split(","):
        model = our_model(hf_base, args)
        if mode == "lora":
            apply_lora(model, LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank))
        ours = TrainStep.create(model, optim, TrainSection(mode=mode, seq_len=args.seq, batch_size=args.batch),
                                total_steps=args.steps + 1, mesh=mesh)
        theirs = HFTrainer(hf_base, mode, optim, args.lora_rank, 2.0 * args.lora_rank)
        t0 = time.perf_counter()
        ours.compile(batches[0])
        compile_s = time.perf_counter() - t0
        # Warm-up step; same batch on both sides: the losses must agree.
        our_loss = float(ours(batches[0])["loss"])
        their_loss = theirs(hf_batches[0])
        times = {"ours": [], "hf": []}
        for i in range(1, args.steps + 1):
            t0 = time.perf_counter()
            jax.block_until_ready(ours(batches[i]))
            times["ours"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            theirs(hf_batches[i])
            times["hf"].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        speedups[mode] = med["hf"] / med["ours"]
        print(f"[{mode}] first-step loss ours {our_loss:.5f} hf {their_loss:.5f}; "
              f"step s ours {med['ours']:.3f} (all: {' '.join(f'{t:.2f}' for t in times['ours'])}) "
              f"hf {med['hf']:.3f} (all: {' '.join(f'{t:.2f}' for t in times['hf'])})")
        print(f"[{mode}] tokens/s ours {tokens_per_step / med['ours']:.0f} hf {tokens_per_step / med['hf']:.0f} "
              f"speedup {speedups[mode]:.2f}x; our compile {compile_s:.1f} s")
        del ours, theirs
    print(" ".join(f"{mode}_speedup_vs_hf={speedups.get(mode, float('nan')):.3f}" for mode in ("lora", "full")))


if __name__ == "__main__":
    main()
