"""Conversion benchmark: our HF -> Orbax -> HF against transformers' from_pretrained + save_pretrained.

Generates a random fp32 Qwen3 checkpoint (default about 2 GB: hidden 2048, 8 layers, untied,
vocab 32000), then runs each step in its own process and reads that process's own peak RSS
(os.wait4) and wall time:
  ours:         convert/hf_to_flax.py, then convert/flax_to_hf.py --dtype float32
  transformers: AutoModelForCausalLM.from_pretrained(dtype=float32) + save_pretrained
  for context, not in the ratios: our load_hf + save_hf in one process (HF -> HF, no Orbax)
Our peak RSS is the larger of our two processes; our time is their sum. The exported weights are
checked bit-exact against the source. Last line: `rss_ratio_vs_hf=<float> time_ratio_vs_hf=<float>`.

    python scripts/bench_convert.py [--work DIR] [--layers 8] [--hidden 2048] [--keep] [--phases]
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

REPO = Path(__file__).resolve().parent.parent
DIRECT_ROUND_TRIP = """
import sys
from abscot_jax.checkpoint import load_hf, save_hf
save_hf(load_hf(sys.argv[1]), sys.argv[2], tokenizer_dir=sys.argv[1], dtype="float32")
"""
HF_ROUND_TRIP = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
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
cfg, reader = hf.open_hf_dir(src, param_dtype="float32", compute_dtype="float32")
leaves = hf.abstract_model(cfg)[1].to_pure_dict()
buffer = np.empty(max(leaf.size * 4 for leaf in leaves.values()), np.uint8)  # reused, as the CLI does
view = lambda name: buffer[: leaves[name].size * 4].view(np.float32).reshape(leaves[name].shape)
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
    hf.write_hf_dir(cfg, hf.hf_tensors(cfg, view), out, dtype="float32")
report()
"""
HF_PHASES = PHASE_TIMER + """
with timed("transformers: imports (torch, transformers)", since=start):
    import torch
    from transformers import AutoModelForCausalLM
gc.freeze(); gc.enable()
with timed("transformers: from_pretrained"):
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
with timed("transformers: save_pretrained"):
    model.save_pretrained(sys.argv[2])
report()
"""


def make_source(path: Path, args) -> int:
    """A random HF checkpoint written tensor by tensor (no model ever held in memory)."""
    from abscot_jax.checkpoint.hf import write_safetensors, hf_config_dict, hf_tensor_specs
    from abscot_jax.fixtures import make_tokenizer
    from abscot_jax.model.config import Qwen3Config

    cfg = Qwen3Config(
        vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
        head_dim=args.hidden // 16, tie_word_embeddings=False,
    )
    path.mkdir(parents=True)
    specs = hf_tensor_specs(cfg)
    rng = np.random.default_rng(0)

    def tensors():
        for hf_name, _, _, shape in specs:
            scale = 0.1 if len(shape) == 1 else 0.02
            yield hf_name, (1.0 if len(shape) == 1 else 0.0) + scale * rng.standard_normal(shape, np.float32)

    layout = [(hf_name, shape) for hf_name, _, _, shape in specs]
    write_safetensors(path / "model.safetensors", layout, tensors(), np.dtype(np.float32))
    (path / "config.json").write_text(json.dumps(hf_config_dict(cfg, None, "float32"), indent=2))
    make_tokenizer(path)
    # write_safetensors bypasses the page cache: read the file once so that every contender
    # starts from the same warm cache (the first reader would otherwise pay the disk alone).
    with open(path / "model.safetensors", "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        while f.readinto(buf):
            pass
    return (path / "model.safetensors").stat().st_size


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
    """Every tensor of `out` equals `src` bit for bit (read one tensor at a time)."""
    from safetensors import safe_open

    from abscot_jax.checkpoint.hf import SafetensorsDir

    a, b = SafetensorsDir(src).tensors, SafetensorsDir(out).tensors
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    for name in a:
        with safe_open(a[name][0], "numpy") as fa, safe_open(b[name][0], "numpy") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8)), name
    return len(a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
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
        size = make_source(src, args)
        load = os.getloadavg()[0]
        print(f"source checkpoint: {size / 1e9:.2f} GB fp32 ({args.layers} layers, hidden {args.hidden}); "
              f"{os.cpu_count()} CPUs, load average {load:.1f} at start")
        py = sys.executable
        t1, c1, r1 = run("ours: hf_to_flax", [py, "convert/hf_to_flax.py", "--hf-dir", str(src), "--out", str(ckpt)])
        t2, c2, r2 = run("ours: flax_to_hf", [py, "convert/flax_to_hf.py", "--ckpt", str(ckpt), "--out", str(ours),
                                          "--dtype", "float32"])
        th, ch, rh = run("transformers: load + save", [py, "-c", HF_ROUND_TRIP, str(src), str(theirs)])
        run("ours, direct: load_hf+save_hf", [py, "-c", DIRECT_ROUND_TRIP, str(src), str(direct)])
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
                subprocess.run([py, "-c", script, *map(str, dirs)], cwd=REPO, check=True,
                               env={**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"})
        print(f"rss_ratio_vs_hf={ours_rss / rh:.3f} time_ratio_vs_hf={ours_time / th:.3f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
