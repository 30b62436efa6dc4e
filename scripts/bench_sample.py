"""Generated tokens/s of the JAX sampler vs HF transformers `generate`, same model, same prompts.

A random Qwen3 (hidden 512, intermediate 1536, 8 layers, 8 heads / 2 kv heads, head_dim 64, the
tiny fixture tokenizer's 640-row vocabulary), fp32, batch 32 prompts of 16..64 tokens, 128 new
tokens each, greedy, no stop token (every row generates all 128). Both timed after a warm-up,
interleaved, best of --repeats; HF with torch's default threads and with one thread, the faster
being the baseline. The JAX compile time is reported apart. Also checks that both produced the
same tokens. Each side runs on the accelerator that is there (JAX's default backend; PyTorch on
CUDA when it has it), unless JAX_PLATFORMS says otherwise. Last line: speedup_vs_hf=<float> (vs
HF's faster setting). Example: python scripts/bench_sample.py
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--hf-threads", default="default,1",
                   help="torch thread counts to time HF with, comma-separated ('default' = torch's own, one a core)")
    p.add_argument("--xla-threads", type=int, default=None, choices=[1],
                   help="1: run XLA single-threaded (default: XLA's thread pool over every core)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each, interleaved (the best is kept)")
    a = p.parse_args()
    if a.xla_threads == 1:  # before jax starts
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + \
            " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    from abscot_jax.hostmem import keep_freed_memory

    keep_freed_memory()  # as the sampling commands do (abscot_jax/hostmem.py); torch here benefits too
    import jax
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from abscot_jax.checkpoint.hf import load_hf
    from abscot_jax.fixtures import make_checkpoint
    from abscot_jax.sampling.protocol import SamplingRequest
    from abscot_jax.sampling.sampler import Sampler

    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({'1 thread' if a.xla_threads else 'all cores'}); "
          f"torch {torch.__version__}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_checkpoint(tmp, hidden_size=a.hidden, intermediate_size=a.intermediate,
                                    num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                    num_key_value_heads=a.kv_heads, head_dim=a.hidden // a.heads)
        device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
        hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval().to(device)
        jax_model = load_hf(model_dir)
    vocab = hf.config.vocab_size
    rng = np.random.default_rng(0)
    lengths = rng.integers(a.min_prompt, a.max_prompt + 1, a.batch)
    prompts = [rng.integers(1, 500, n).tolist() for n in lengths]
    total = a.batch * a.new_tokens
    print(f"model: hidden {a.hidden}, {a.layers} layers, {a.heads}/{a.kv_heads} heads, vocab {vocab}; "
          f"batch {a.batch}, prompts {lengths.min()}..{lengths.max()} tokens, {a.new_tokens} new tokens", flush=True)

    # ---- HF generate ----
    width = max(lengths)
    ids = torch.zeros((a.batch, width), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt)
        mask[i, width - len(prompt):] = 1
    hf.generation_config = GenerationConfig(pad_token_id=0)  # no checkpoint defaults (eos, ...)
    config = GenerationConfig(do_sample=False, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                              pad_token_id=0, eos_token_id=None)
    # torch's default (one OpenMP thread a core) and one thread: on a shared, busy machine OpenMP's
    # spinning threads can make the default several times slower; the faster one is the baseline.
    thread_counts = sorted({torch.get_num_threads() if n == "default" else int(n) for n in a.hf_threads.split(",")},
                           reverse=True)

    def run_hf(threads):
        torch.set_num_threads(threads)
        with torch.no_grad():
            t = time.perf_counter()
            out = hf.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, width:].cpu()
            return time.perf_counter() - t, out.numpy()

    with torch.no_grad():  # warm-up
        hf.generate(input_ids=ids[:, -8:], attention_mask=mask[:, -8:], max_new_tokens=4, do_sample=False)

    # ---- JAX sampler ----
    sampler = Sampler(jax_model, max_batch=a.batch)
    requests = [SamplingRequest(id=str(i), prompt_ids=x, max_new_tokens=a.new_tokens, stop_token_ids=[])
                for i, x in enumerate(prompts)]
    limits = [a.new_tokens] * a.batch

    def run_jax():
        t = time.perf_counter()
        out = sampler.generate(prompts, requests, limits)
        return time.perf_counter() - t, out

    first, _ = run_jax()
    # Interleaved repeats, best of each: the machine's load changes over minutes.
    hf_times = {n: [] for n in thread_counts}
    jax_times = []
    for _ in range(a.repeats):
        for n in thread_counts:
            dt, hf_tokens = run_hf(n)
            hf_times[n].append(dt)
            print(f"hf generate, {n} thread(s): {dt:.2f} s, {total / dt:.1f} tokens/s", flush=True)
        dt, out = run_jax()
        jax_times.append(dt)
        print(f"jax sampler: {dt:.2f} s, {total / dt:.1f} tokens/s", flush=True)
    hf_best = {n: min(v) for n, v in hf_times.items()}
    best_threads = min(hf_best, key=hf_best.get)
    hf_time, jax_time = hf_best[best_threads], min(jax_times)
    print(f"jax compile: {max(first - jax_time, 0):.2f} s (first call {first:.2f} s); "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    print(f"best: hf {total / hf_time:.1f} tokens/s ({best_threads} thread(s)), jax {total / jax_time:.1f} tokens/s")
    for n, dt in hf_best.items():
        print(f"speedup vs hf with {n} thread(s): {dt / jax_time:.2f}")

    same = sum(list(hf_tokens[i]) == out[i][0] for i in range(a.batch))
    print(f"identical greedy rows: {same}/{a.batch}")
    print(f"speedup_vs_hf={hf_time / jax_time:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
