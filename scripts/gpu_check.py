"""GPU check: what our training step and attention kernels do on the accelerator that is there.

Sections (each measurement is recorded, or its error; one failure does not stop the others):
- env: versions, devices, memory;
- hf: transformers + PEFT on the same card, same shapes and rows (scripts/gpu_check_hf.py, run
  first in its own process so that PyTorch has the accelerator to itself);
- attention: one attention layer, forward + backward, at Qwen3-4B's heads for each
  implementation, on Phase A-like and Phase B-like packed rows, against causal-only attention
  (cuDNN's flash kernel on a GPU); numerics against the dense reference; tiles skipped;
- train: the real train step (configs/qwen3_4b_{lora,full}.yaml) at Qwen3-4B's shapes cut to
  `--layers` layers, random weights, Dolci-like packed Phase A rows: compile time, median step
  time, processed and loss tokens/s, MFU, peak device memory against the plan, collectives.

    python scripts/gpu_check.py [--layers 4] [--out DIR]     # on a machine with a GPU
    python scripts/gpu_check.py --dry-run                      # CPU, tiny shapes, 2 host devices

Results go to DIR/gpu_check.json and DIR/gpu_check.md (DIR: --out, else $OUT, else runs/gpu_check).
Last line: `gpu_check ok=<true|false> backend=<name> modes=<n>` (n: measurements that succeeded).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gpu_check_hf import CONFIGS, check_shapes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, 2 host devices (fsdp 2)")
    p.add_argument("--layers", type=int, default=4, help="Qwen3-4B layers to build (of 36)")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    p.add_argument("--modes", default="lora,full", help="modes of the HF side")
    p.add_argument("--train", default="lora,full",
                   help="our steps to run: MODE[+key=value...], comma-separated (e.g. full+model.remat=dots)")
    p.add_argument("--sections", default="env,hf,attention,train")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check")
    return p.parse_args(argv)


def timed(fn, reps: int) -> float:
    """Median seconds of `fn()` (which blocks until done) after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def error_text(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"


# ---- sections -----------------------------------------------------------------------------------

PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
            "transformers", "torch", "peft")


def env_section(args) -> list[dict]:
    from importlib import metadata

    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return [{"section": "env", "python": sys.version.split()[0], "backend": jax.default_backend(),
             "device_kind": device.device_kind, "devices": jax.device_count(),
             "memory_limit_gib": stats.get("bytes_limit", 0) / 2**30 or None,
             "packages": " ".join(f"{k}=={v}" for k, v in versions.items())}]


def hf_section(args, out_dir: Path) -> list[dict]:
    path = out_dir / "hf.json"
    command = [sys.executable, str(Path(__file__).with_name("gpu_check_hf.py")), "--out", str(path),
               "--layers", str(args.layers), "--seq", str(args.seq), "--steps", str(args.steps),
               "--rows", "1", "--modes", args.modes] + (["--dry-run"] if args.dry_run else [])
    # JAX in that process (for the reference mask) stays on the CPU: the accelerator is PyTorch's.
    done = subprocess.run(command, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True)
    if done.returncode or not path.exists():
        return [{"section": "hf", "error": f"gpu_check_hf.py exited {done.returncode}: {done.stderr.strip()[-500:]}"}]
    return [{"section": "hf", **r} for r in json.loads(path.read_text())]


def attention_section(args, shapes: dict) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from abscot_jax.data.synthetic_rows import PRESETS, packed_rows
    from abscot_jax.model import attention
    from abscot_jax.model.attention_pallas import default_config, tile_counts
    from abscot_jax.train.flops import allowed_pairs

    arch, t = shapes["arch"], shapes["seq"]
    h, kv, d = arch["num_attention_heads"], arch["num_key_value_heads"], arch["head_dim"]
    gpu = jax.default_backend() == "gpu"
    impls = [i for i in attention.IMPLEMENTATIONS if i != "auto" and not (gpu and i == "blockwise")
             and not (not gpu and i == "cudnn")]
    dtype = jnp.bfloat16 if gpu else jnp.float32
    kernel = default_config(d).fit(t)
    rng = np.random.default_rng(0)
    q, k, v, dout = (jnp.asarray(rng.standard_normal(s), dtype) for s in
                     [(1, t, h, d), (1, t, kv, d), (1, t, kv, d), (1, t, h, d)])
    results = []
    for row_kind in ("phase_a", "phase_b"):
        row = packed_rows(rng, 1, t, 100, PRESETS[row_kind])
        seg, roles = jnp.asarray(row["segment_ids"][0]), jnp.asarray(row["roles"][0])
        real = np.asarray(seg[0] != 0)
        pairs = allowed_pairs(row["segment_ids"], row["roles"])

        def layer(fn):
            def loss(q, k, v, dout):  # dout an argument: a closed-over array would be folded in as a constant
                return jnp.sum(fn(q, k, v).astype(jnp.float32) * dout)
            grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
            # Padding queries carry no loss: their outputs are arbitrary in the dense reference.
            real_dout = dout * jnp.asarray(real, dout.dtype)[None, :, None, None]
            return lambda q, k, v: grad(q, k, v, real_dout)

        contenders = {impl: layer(lambda q, k, v, impl=impl: attention.bottleneck_attention(q, k, v, seg, roles, impl))
                      for impl in impls}
        contenders["causal_only"] = layer(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn" if gpu else None))
        reference = None
        for name, fn in contenders.items():
            record = {"section": "attention", "rows": row_kind, "impl": name, "seq": t, "heads": f"{h}/{kv}x{d}",
                      "dtype": jnp.dtype(dtype).name}
            try:
                out = jax.block_until_ready(fn(q, k, v))
                seconds = timed(lambda: jax.block_until_ready(fn(q, k, v)), args.steps)
                counted = t * (t + 1) // 2 if name == "causal_only" else pairs
                record.update(ms=1e3 * seconds, useful_tflops=12 * h * d * counted / seconds / 1e12)
                if name == "xla":
                    reference = out
                elif reference is not None and name != "causal_only":
                    diffs = [jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))[:, real] for a, b in zip(out[1], reference[1])]
                    record["max_grad_diff_vs_xla"] = max(float(jnp.max(x)) for x in diffs)
                    record["grad_diff_relative"] = max(float(jnp.max(x) / jnp.max(jnp.abs(b.astype(jnp.float32))))
                                                       for x, b in zip(diffs, reference[1]))
            except Exception as e:  # noqa: BLE001 - recorded as a failed measurement
                record["error"] = error_text(e)
            results.append(record)
        for kind, (bq, bk) in (("forward", (kernel.block_q, kernel.block_k)),
                               ("backward", (kernel.block_q_bwd, kernel.block_k_bwd))):
            counts = tile_counts(seg, roles, bq, bk)
            results.append({"section": "attention", "rows": row_kind, "impl": f"pallas {kind} tiles {bq}x{bk}",
                            "computed": int(counts.computed), "causal": int(counts.causal), "total": int(counts.total),
                            "skipped_of_causal": 1 - int(counts.computed) / int(counts.causal)})
    return results


def train_section(args, shapes: dict) -> list[dict]:
    import jax
    import numpy as np
    from flax import nnx

    from abscot_jax.config import load_config
    from abscot_jax.data.synthetic_rows import PHASE_A_DOLCI, packed_rows
    from abscot_jax.hlo import collectives, summarize
    from abscot_jax.model.config import Qwen3Config
    from abscot_jax.model.lora import apply_lora
    from abscot_jax.model.qwen3 import Qwen3
    from abscot_jax.plan import memory_plan
    from abscot_jax.sharding import make_mesh
    from abscot_jax.train.flops import peak_tflops, throughput
    from abscot_jax.train.step import TrainStep
    from abscot_jax.vocab import NEW_TOKENS

    arch, t = shapes["arch"], shapes["seq"]
    devices = jax.device_count()
    rng = np.random.default_rng(0)
    batches = [packed_rows(rng, devices, t, arch["vocab_size"], PHASE_A_DOLCI) for _ in range(args.steps + 1)]
    kind = jax.devices()[0].device_kind
    results = []
    for spec in args.train.split(","):
        mode, *overrides = spec.split("+")
        record = {"section": "train", "mode": mode, "overrides": " ".join(overrides),
                  "layers": arch["num_hidden_layers"], "seq": t, "rows": devices}
        try:
            run = load_config(CONFIGS / f"qwen3_4b_{mode}.yaml", [
                f"train.batch_size={devices}", "train.grad_accum=1", f"train.seq_len={t}",
                "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1", *overrides])
            cfg = Qwen3Config.from_hf_dict(arch, param_dtype=run.model.param_dtype, compute_dtype=run.model.compute_dtype,
                                           remat=run.model.remat, attention_impl=run.model.attention_impl)
            record.update(remat=cfg.remat, attention=cfg.attention_impl, param_dtype=cfg.param_dtype)
            model = Qwen3(cfg, rngs=nnx.Rngs(0))
            lora = (0, ())
            if mode == "lora":
                n = len(NEW_TOKENS)
                apply_lora(model, run.lora, new_token_start=arch["vocab_size"] - 267, num_new_tokens=n)
                lora = (run.lora.rank, run.lora.targets)
            trainer = TrainStep.create(model, run.optim, run.train, total_steps=args.steps + 1, mesh=make_mesh(run.mesh))
            t0 = time.perf_counter()
            compiled = trainer.compile(batches[0])
            record["compile_s"] = time.perf_counter() - t0
            analysis = compiled.memory_analysis()
            record["xla_memory_gib"] = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                                        + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes) / 2**30
            record["collectives"] = summarize(collectives(compiled.as_text()))
            record["plan_gib"] = memory_plan(cfg, run, devices).total / 2**30
            jax.block_until_ready(trainer(batches[0]))
            times = []
            for batch in batches[1:]:
                t0 = time.perf_counter()
                metrics = jax.block_until_ready(trainer(batch))
                times.append(time.perf_counter() - t0)
            step_s = statistics.median(times)
            record.update(step_s=step_s, loss=float(metrics["loss"]),
                          **throughput(cfg, batches[1], step_s, peak_tflops(kind), lora_rank=lora[0], lora_targets=lora[1]))
            stats = jax.devices()[0].memory_stats() or {}
            record["peak_memory_gib_so_far"] = stats.get("peak_bytes_in_use", 0) / 2**30 or None
            del trainer, model, compiled
        except Exception as e:  # noqa: BLE001 - recorded as a failed measurement
            record["error"] = error_text(e)
        results.append(record)
    return results


# ---- report -------------------------------------------------------------------------------------

def table(results: list[dict]) -> str:
    """One markdown table per section: the keys its records have, in order of first appearance."""
    lines = []
    for section in dict.fromkeys(r["section"] for r in results):
        rows = [r for r in results if r["section"] == section]
        keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "section"]

        def cell(x):
            if isinstance(x, float):
                return f"{x:.4g}"
            if isinstance(x, dict):
                return "; ".join(f"{k} {v['count']} ({v['bytes'] / 2**20:.0f} MiB)" if isinstance(v, dict) else f"{k} {v}"
                                 for k, v in x.items())
            return "" if x is None else str(x).replace("\n", " / ")

        lines += [f"### {section}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:  # before JAX starts
        os.environ["JAX_PLATFORMS"] = "cpu"
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=2"])
        args.steps = min(args.steps, 2)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    shapes = check_shapes(args.dry_run, args.layers, args.seq)
    results = hf_section(args, out_dir) if "hf" in sections else []  # before JAX takes the accelerator
    if not args.dry_run:
        from abscot_jax.config import load_config
        from abscot_jax.sharding import set_device_memory_fraction

        set_device_memory_fraction(load_config(CONFIGS / "qwen3_4b_full.yaml", []).train.device_memory_fraction)
    for name, section in (("env", env_section), ("attention", attention_section), ("train", train_section)):
        if name in sections:
            try:
                results += section(args, shapes) if name != "env" else section(args)
            except Exception as e:  # noqa: BLE001 - a section that cannot start is one failed measurement
                results.append({"section": name, "error": error_text(e)})
            (out_dir / "gpu_check.json").write_text(json.dumps(results, indent=1))
    report = table(results)
    (out_dir / "gpu_check.md").write_text(report)
    print(report)
    import jax

    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"failed: {r['section']} {r.get('mode', r.get('impl', ''))}: {r['error']}")
    measured = sum(1 for r in results if "error" not in r and r["section"] != "env")
    print(f"gpu_check ok={str(not failed).lower()} backend={jax.default_backend()} modes={measured}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
