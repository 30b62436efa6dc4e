"""Conversion benchmark: our HF -> Orbax -> HF against transformers' from_pretrained + save_pretrained.

Generates a random Qwen3 checkpoint, one tensor in memory at a time: by default fp32, about 2 GB
(hidden 2048, 8 layers, untied, vocab 32000) in one file; with --shape qwen3-4b, Qwen3-4B's shape
in bf16 (8 GB), sharded as the hub shards it (3 files + index, Qwen3-4B's config.json). Then it
runs each step in its own process and reads that process's own peak RSS (os.wait4) and wall time,
every step in the source's dtype:
  ours:         convert/hf_to_flax.py, then convert/flax_to_hf.py
  transformers: AutoModelForCausalLM.from_pretrained(dtype=the source's) + save_pretrained
  for context, not in the ratios: our load_hf + save_hf in one process (HF -> HF, no Orbax)
Our peak RSS is the larger of our two processes; our time is their sum. The exported weights are
checked bit-exact against the source. Last line: `rss_ratio_vs_hf=<float> time_ratio_vs_hf=<float>`.

    python scripts/bench_convert.py [--work DIR] [--shape small|qwen3-4b] [--layers N] [--hidden 2048]
                                    [--keep] [--phases]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rehearsal_stages import QWEN3_4B_CONFIG, write_random_hf  # this script's directory is on sys.path

REPO = Path(__file__).resolve().parent.parent
# Each takes: source dir, output dir, dtype.
DIRECT_ROUND_TRIP = """
import sys
from abscot_jax.checkpoint import load_hf, save_hf
save_hf(load_hf(sys.argv[1], param_dtype=sys.argv[3]), sys.argv[2], tokenizer_dir=sys.argv[1], dtype=sys.argv[3])
"""
HF_ROUND_TRIP = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[3]))
model.save_pretrained(sys.argv[2])
"""

# --phases: CPU seconds (user + system) of each phase of the two round trips, in one process each.
PHASE_TIMER = """
import contextlib, gc, os, sys, time
gc.disable()
start, totals = (sum(os.times()[:2]), time.perf_counter()), {}
@contextlib.contextmanager
def timed(label, since=None):
    cpu, wall = since or (sum(os.times()[:2]), time.perf_counter())
    yield
    total = totals.setdefault(label, [0.0, 0.0])
    total[0] += sum(os.times()[:2]) - cpu
    total[1] += time.perf_counter() - wall
def report():
    for label, (cpu, wall) in totals.items():
        print(f"  {label:<44} {cpu:6.2f} s CPU {wall:6.2f} s wall", flush=True)
"""
OUR_PHASES = PHASE_TIMER + """
with timed("ours: imports (jax, flax, orbax, model code)", since=start):
    import numpy as np
    from orbax.checkpoint import v1 as ocp
    from abscot_jax.checkpoint import hf, orbax_io
gc.freeze(); gc.enable()
src, ckpt, out = map(os.path.abspath, sys.argv[1:4])
dtype = sys.argv[4]
cfg, reader = hf.open_hf_dir(src, param_dtype=dtype, compute_dtype=dtype)
leaves = hf.abstract_model(cfg)[1].to_pure_dict()
nbytes = lambda leaf: leaf.size * leaf.dtype.itemsize
buffer = np.empty(max(nbytes(leaf) for leaf in leaves.values()), np.uint8)  # reused, as the CLI does
view = lambda name: buffer[: nbytes(leaves[name])].view(leaves[name].dtype).reshape(leaves[name].shape)
with orbax_io._orbax_context():
    for name, leaf in leaves.items():
        with timed("ours: read safetensors + transpose"):
            hf.read_param(reader, name, leaf.shape, leaf.dtype, out=view(name))
        with timed("ours: Orbax partial saves"):
            ocp.partial.save(os.path.join(ckpt, "params"), {name: view(name)})
    with timed("ours: Orbax partial saves"):
        ocp.partial.finalize(os.path.join(ckpt, "params"))
with orbax_io._orbax_context(partial_load=True):
    for name, leaf in leaves.items():
        with timed("ours: Orbax partial loads"):
            ocp.load(os.path.join(ckpt, "params"), {name: np.empty(leaf.shape, leaf.dtype)})
with timed("ours: transpose + write safetensors"):  # from the buffer: the loads are timed above
    hf.write_hf_dir(cfg, hf.hf_tensors(cfg, view), out, dtype=dtype)
report()
"""
HF_PHASES = PHASE_TIMER + """
with timed("transformers: imports (torch, transformers)", since=start):
    import torch
    from transformers import AutoModelForCausalLM
gc.freeze(); gc.enable()
with timed("transformers: from_pretrained"):
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[3]))
with timed("transformers: save_pretrained"):
    model.save_pretrained(sys.argv[2])
report()
"""


def source_config(args):
    """(architecture, dtype, largest shard, config.json fields we do not model) of the source."""
    from abscot_jax.model.config import Qwen3Config
    from abscot_jax.plan import PRESETS

    if args.shape == "qwen3-4b":
        arch = {**PRESETS["qwen3-4b"], "num_hidden_layers": args.layers or 36}
        return Qwen3Config.from_hf_dict(arch), "bfloat16", "4GB", QWEN3_4B_CONFIG
    cfg = Qwen3Config(
        vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers or 8, num_attention_heads=16, num_key_value_heads=4,
        head_dim=args.hidden // 16, tie_word_embeddings=False,
    )
    return cfg, "float32", "20GB", None


def make_source(path: Path, args) -> tuple[int, str]:
    """The random source checkpoint; returns its weight bytes and dtype."""
    from abscot_jax.fixtures import make_tokenizer

    cfg, dtype, max_shard_size, base_config = source_config(args)
    make_tokenizer(path.with_name("tokenizer"))
    write_random_hf(cfg, path, dtype=dtype, tokenizer_dir=path.with_name("tokenizer"), max_shard_size=max_shard_size,
                    base_config=base_config)
    # write_hf_dir bypasses the page cache: read the files once so that every contender starts
    # from the same warm cache (the first reader would otherwise pay the disk alone).
    size = 0
    for shard in sorted(path.glob("*.safetensors")):
        size += shard.stat().st_size
        with open(shard, "rb", buffering=0) as f:
            buf = bytearray(8 << 20)
            while f.readinto(buf):
                pass
    return size, dtype


def run(label: str, cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (GB) of one child process."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Every contender writes ~2 GB through the page cache; flush the previous one's dirty pages
    # first, or the kernel throttles this one's writes to pay for them (seen: 2-3x slower saves).
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{label} failed ({proc.returncode}): {stderr.decode()[-2000:]}")
    rss_gb = usage.ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux
    cpu = usage.ru_utime + usage.ru_stime
    print(f"{label:<28} {seconds:7.1f} s wall {cpu:7.1f} s CPU   peak RSS {rss_gb:6.2f} GB", flush=True)
    return seconds, cpu, rss_gb


def check_identical(src: Path, out: Path) -> int:
    """Every tensor of `out` equals `src` bit for bit, dtype and shape included (read in chunks)."""
    from abscot_jax.checkpoint.safetensors_io import SafetensorsDir

    a, b = SafetensorsDir(src).tensors, SafetensorsDir(out).tensors
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    for name, (path, shape, dtype, offset) in a.items():
        other, other_shape, other_dtype, other_offset = b[name]
        assert (shape, dtype) == (other_shape, other_dtype), name
        left = int(np.prod(shape)) * dtype.itemsize
        with open(path, "rb") as f, open(other, "rb") as g:
            f.seek(offset)
            g.seek(other_offset)
            while left:
                n = min(left, 64 << 20)
                assert f.read(n) == g.read(n), name
                left -= n
    return len(a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--shape", choices=["small", "qwen3-4b"], default="small",
                        help="small: fp32, --hidden/--layers, one file; qwen3-4b: bf16, sharded as the hub")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 8 small, 36 qwen3-4b)")
    parser.add_argument("--hidden", type=int, default=2048, help="small shape only")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--phases", action="store_true",
                        help="then time each phase (imports, reads, Orbax saves and loads, writes) of both "
                             "round trips, one process each (CPU s = user + system)")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        src, ckpt, ours, theirs, direct = (
            work / n for n in ("src_hf", "ckpt", "ours_hf", "transformers_hf", "direct_hf"))
        for d in (src, ckpt, ours, theirs, direct):
            shutil.rmtree(d, ignore_errors=True)
        size, dtype = make_source(src, args)
        load = os.getloadavg()[0]
        files = len(list(src.glob("*.safetensors")))
        print(f"source checkpoint: {size / 1e9:.2f} GB {dtype} in {files} file(s) ({args.shape}, "
              f"{json.loads((src / 'config.json').read_text())['num_hidden_layers']} layers); "
              f"{os.cpu_count()} CPUs, load average {load:.1f} at start")
        py = sys.executable
        t1, c1, r1 = run("ours: hf_to_flax", [py, "convert/hf_to_flax.py", "--hf-dir", str(src), "--out", str(ckpt)])
        t2, c2, r2 = run("ours: flax_to_hf", [py, "convert/flax_to_hf.py", "--ckpt", str(ckpt), "--out", str(ours)])
        if not args.phases:
            shutil.rmtree(ckpt)  # disk: at 4B every copy is 8 GB
        th, ch, rh = run("transformers: load + save", [py, "-c", HF_ROUND_TRIP, str(src), str(theirs), dtype])
        run("ours, direct: load_hf+save_hf", [py, "-c", DIRECT_ROUND_TRIP, str(src), str(direct), dtype])
        n = check_identical(src, ours)
        check_identical(src, direct)
        ours_time, ours_rss = t1 + t2, max(r1, r2)
        print(f"ours total {ours_time:.1f} s ({c1 + c2:.1f} s CPU), peak RSS {ours_rss:.2f} GB; "
              f"transformers {th:.1f} s ({ch:.1f} s CPU), {rh:.2f} GB; round trip bit-exact on {n} tensors; "
              f"load average {os.getloadavg()[0]:.1f} at end")
        print(f"cpu_ratio_vs_hf={(c1 + c2) / ch:.3f}")
        if args.phases:
            for d in (ckpt, ours, theirs):
                shutil.rmtree(d)
            for script, dirs in ((OUR_PHASES, (src, ckpt, ours)), (HF_PHASES, (src, theirs))):
                os.sync()  # as in run()
                subprocess.run([py, "-c", script, *map(str, dirs), dtype], cwd=REPO, check=True,
                               env={**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"})
        print(f"rss_ratio_vs_hf={ours_rss / rh:.3f} time_ratio_vs_hf={ours_time / th:.3f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
