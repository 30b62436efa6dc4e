"""Rehearse the whole pipeline at Qwen3-4B's real shape on one CPU host, with random bf16 weights.

    python scripts/rehearse_qwen3_4b.py --out DIR [--layers 36] [--seq-len 256] [--steps 4]
        [--checkpoint-every 2] [--fsdp 2 --tensor 4] [--tokenizer DIR] [--budget-gb 22] [--keep]

Each stage runs in its own process (scripts/rehearsal_stages.py); its wall time and peak RSS come
from os.wait4:
  tokenizer   Qwen3's real tokenizer (convert/qwen3_tokenizer.py), unless --tokenizer names one
  source      random weights written as the hub lays out Qwen3-4B: bf16, 3 shards of at most 4 GB,
              model.safetensors.index.json, Qwen3-4B's config.json; one tensor in memory at a time
  bad_*       the converter on broken copies of it (a missing shard, a truncated one, an index
              naming an absent file, a config that disagrees with a tensor's shape): exit 2 and one
              `error:` line each, nothing written, and a peak RSS that shows no weights were read
  convert     convert/hf_to_flax.py (bf16 kept)
  vocab       that checkpoint loaded, the abstract vocabulary put in Qwen3's spare embedding rows
              (no growth), written as the HF base the phase trains from (as the driver's prepare_base)
  train_*     Phase A, LoRA r 32 as configs/qwen3_4b_lora.yaml, on packed synthetic Dolci-schema
              rows, on 8 host devices (fsdp x tensor): train_ref uninterrupted; train_kill SIGKILLed
              once its first checkpoint is on disk; train_resume resumes it. resume_exact: the final
              adapters of train_ref and train_resume are equal bit for bit.
  export      convert/flax_to_hf.py --merge-lora of the resumed phase (bf16)
  hf_logits   transformers.AutoModelForCausalLM on 64 tokens of the training rows, in bf16 and, as the
              exact reference, in fp32 (the same weights, cast one decoder layer at a time)
  jax_logits  our model (load_hf, bf16) on the same tokens. Tolerance: max |ours - theirs| <= 3 x
              max |theirs - fp32|. bf16 keeps 8 significant bits: each stack rounds every layer's
              activations at about 2^-8 of their size, in different places (on CPU XLA computes bf16
              dots in fp32 and our head returns fp32 logits; torch rounds each product to bf16), and
              the rounding adds up over the layers, so no fixed figure holds at every depth. The fair
              yardstick is transformers' own bf16 error in the same run: ours may be twice as far
              from fp32 (as tests/test_checkpoint.py allows), so the two may differ by three times it.
  sample      the JAX sampler draws a constrained abstract trace for 2 prompts
plan_error = |plan - measured| / measured, where plan is abscot_jax.plan.memory_plan for train_ref
times the 8 devices (all in this host's memory) and measured is train_ref's peak RSS less its RSS
before it loaded the model.

A stage whose peak RSS passes --budget-gb fails; each runs under RLIMIT_DATA = budget + 2 GB, so one
that needs far more fails with an out of memory error rather than waking the kernel's OOM killer.
Any failure ends the run with `error: stage NAME: ...` (logs in DIR/logs/). Unless --keep, the model
and phase directories are deleted once no later stage reads them (source and ckpt after vocab, the
rest at the end): the run's disk use peaks near 19 GB at 36 layers. Last line:
`peak_rss_gb=<float> resume_exact=<true|false> logits_max_abs_diff=<float> plan_error=<float>`.

What this host allows (24 GB, 2 cores; docs/BENCHMARKS.md): every stage at 36 layers, about 25 minutes.
- seq_len 256 is the longest that fits: train_resume peaks at 21.1 GB; at 512 train_ref passes 21.5.
- XLA's CPU backend computes bf16 dots in fp32. With while-loop-invariant code motion on, it
  converts each whole stacked [layers, ...] weight before the layer loop (a 16 GB fp32 copy of the
  model), hence XLA_FLAGS turns that pass off; and it all-gathers the tied embedding in fp32 on every
  device: with fsdp over all 8 devices that is 8 fp32 copies of the 1.6 GB table, hence fsdp 2 x tensor 4.
- The JAX sampler, for bf16 weights on CPU, indexes each layer inside its decode loop
  (abscot_jax/sampling/sampler.py): XLA's temporaries are 1.6 GB beside the 8 GB of weights, and
  the sample stage peaks at 11.1 GB.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from rehearsal_stages import CHILD_STAGES, REPO, StageError  # this script's directory is on sys.path

XLA_FLAGS = "--xla_force_host_platform_device_count=8 --xla_disable_hlo_passes=while-loop-invariant-code-motion"
LARGE_DIRS = ("source", "ckpt", "base", "export", "phase_ref", "phase_kill")  # models: 8 GB each at 36 layers


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="work directory (created)")
    p.add_argument("--layers", type=int, default=36, help="decoder layers (Qwen3-4B: 36)")
    p.add_argument("--seq-len", type=int, default=256, help="packed row length of the Phase A run")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--checkpoint-every", type=int, default=2)
    p.add_argument("--rows", type=int, default=48, help="synthetic Dolci rows")
    p.add_argument("--fsdp", type=int, default=2)
    p.add_argument("--tensor", type=int, default=4)
    p.add_argument("--tokenizer", type=Path, default=None, help="a Qwen3 tokenizer directory (default: build it)")
    p.add_argument("--budget-gb", type=float, default=22.0, help="the most peak RSS any stage may reach")
    p.add_argument("--keep", action="store_true", help="keep the model directories")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # run one stage in this process (used by the driver)
    p.add_argument("--which", help=argparse.SUPPRESS)  # train: the phase directory
    return p.parse_args(argv)


class Driver:
    """Runs the stages (stdlib + numpy only: its own memory stays small)."""

    def __init__(self, args):
        self.args, self.out = args, args.out
        self.logs = args.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}

    def run(self, label: str, cmd: list, kill_when=None, expect_rc: int = 0) -> dict:
        """Run one stage's process under the memory limit; record its wall time and peak RSS."""
        env = {**os.environ, "XLA_FLAGS": XLA_FLAGS, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        # XLA reserves address space it never touches: VmData runs 1-2 GB above RSS.
        limit = int((self.args.budget_gb + 2) * 1e9)
        log = self.logs / f"{label}.log"
        start, load = time.perf_counter(), os.getloadavg()[0]
        with open(log, "w") as f:
            proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (limit, limit)))
            while True:  # os.wait4, not Popen.wait: it also gives the process's own peak RSS
                pid, status, usage = os.wait4(proc.pid, 0 if kill_when is None else os.WNOHANG)
                if pid:
                    break
                if kill_when():
                    os.kill(proc.pid, signal.SIGKILL)
                    kill_when = None
                else:
                    time.sleep(0.5)
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        record = {"seconds": time.perf_counter() - start, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
                  "cpu_seconds": usage.ru_utime + usage.ru_stime, "returncode": rc, "load_at_start": load}
        self.records[label] = record
        print(f"{label:<14} {record['seconds']:8.1f} s wall {record['cpu_seconds']:8.1f} s CPU   "
              f"peak RSS {record['peak_rss_gb']:6.2f} GB   (load {load:.1f})", flush=True)
        if rc != expect_rc:
            lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
            raise StageError(f"stage {label}: exit {rc}: {lines[-1] if lines else 'no output'} (log: {log})")
        if record["peak_rss_gb"] > self.args.budget_gb:
            raise StageError(f"stage {label}: peak RSS {record['peak_rss_gb']:.2f} GB, over --budget-gb "
                             f"{self.args.budget_gb:g}")
        return record

    def stage(self, name: str, *extra, **kwargs) -> dict:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--out", self.out, "--stage", name, *extra]
        return self.run(kwargs.pop("label", name), cmd, **kwargs)

    def cli(self, label: str, script: str, *options, **kwargs) -> dict:
        return self.run(label, [sys.executable, REPO / "convert" / script, *options], **kwargs)


def write_rows(path: Path, n: int) -> None:
    """Dolci-Think-shaped rows: a sum of three numbers, one CoT step per addition, a boxed answer."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            a, b, c = (rng.randint(10, 99) for _ in range(3))
            think = f"<think>\nFirst {a} + {b} = {a + b}.\nThen {a + b} + {c} = {a + b + c}.\n</think>\n\n"
            f.write(json.dumps({"id": f"r{i:03d}", "dataset_source": "rehearsal", "messages": [
                {"role": "user", "content": f"What is {a} + {b} + {c}?"},
                {"role": "assistant", "content": think + f"The sum is \\boxed{{{a + b + c}}}."}]}) + "\n")


def bad_inputs(src: Path, work: Path):
    """(name, broken copy of `src`, what its error line must name). The copies link to the real
    files; the truncated shard is a sparse file: the real header, then a hole 1000 bytes short."""
    index_name = "model.safetensors.index.json"
    index, config = (json.loads((src / name).read_text()) for name in (index_name, "config.json"))
    shards = sorted(set(index["weight_map"].values()))
    absent, first = shards[0].replace("00001-of", "00009-of"), next(iter(index["weight_map"]))
    with open(src / shards[0], "rb") as f:
        length = f.read(8)
        header = length + f.read(int.from_bytes(length, "little"))
    cases = {  # name: (file replaced, its content (None: deleted), what the error line names)
        "missing_shard": (shards[-1], None, shards[-1]),
        "truncated_shard": (shards[0], header, "truncated"),
        "index_names_absent_file": (index_name, {**index, "weight_map": {**index["weight_map"], first: absent}}, absent),
        "config_disagrees": ("config.json", {**config, "intermediate_size": config["intermediate_size"] + 128},
                             "has shape"),
    }
    for name, (replaced, content, expect) in cases.items():
        d = work / name
        d.mkdir(parents=True)
        for f in src.iterdir():
            if f.name != replaced:
                (d / f.name).symlink_to(f)
        if isinstance(content, dict):
            (d / replaced).write_text(json.dumps(content))
        elif content is not None:
            (d / replaced).write_bytes(content)
            os.truncate(d / replaced, (src / replaced).stat().st_size - 1000)
        yield name, d, expect


def check_bad_inputs(driver: Driver) -> None:
    work = driver.out / "bad_input"
    for name, broken, expect in bad_inputs(driver.out / "source", work):
        label, target = f"bad_{name}", work / "out"
        record = driver.cli(label, "hf_to_flax.py", "--hf-dir", broken, "--out", target, expect_rc=2)
        lines = (driver.logs / f"{label}.log").read_text().strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("error:") or expect not in lines[0]:
            raise StageError(f"{label}: expected one `error:` line naming {expect!r}, got: {lines[-3:]}")
        if target.exists() or any(p.name.startswith(".out.tmp") for p in work.iterdir()):
            raise StageError(f"{label}: the converter left output behind in {work}")
        if record["peak_rss_gb"] > 1:
            raise StageError(f"{label}: peak RSS {record['peak_rss_gb']:.2f} GB: weights were read before the check")
        print(f"    {lines[0][:150]}", flush=True)
    shutil.rmtree(work)


def same_adapters(a: Path, b: Path) -> bool:
    import numpy as np

    with np.load(a) as x, np.load(b) as y:
        return x.files == y.files and all(x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes()
                                          for k in x.files)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out = args.out.absolute()
    if args.stage:
        CHILD_STAGES[args.stage](args)
        return 0
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: {args.out} is not empty; pass a new directory (a rerun would resume its training phases)",
              file=sys.stderr)
        return 2
    d = Driver(args)
    print(f"rehearsal: {args.layers} layers, seq_len {args.seq_len}, {args.steps} steps, mesh fsdp {args.fsdp} x "
          f"tensor {args.tensor}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    start = time.perf_counter()
    try:
        if args.tokenizer is None:
            d.cli("tokenizer", "qwen3_tokenizer.py", "--out", args.out / "tokenizer", "--overwrite")
        else:
            shutil.copytree(args.tokenizer, args.out / "tokenizer", dirs_exist_ok=True)
        write_rows(args.out / "dolci_rows.jsonl", args.rows)
        d.stage("source")
        check_bad_inputs(d)
        d.cli("convert", "hf_to_flax.py", "--hf-dir", args.out / "source", "--out", args.out / "ckpt")
        d.stage("vocab")
        if not args.keep:  # no later stage reads them: the run's disk peak is 8 GB lower per directory
            for name in ("source", "ckpt"):
                shutil.rmtree(args.out / name)
        d.stage("train", "--which", "phase_ref", label="train_ref")
        first = args.out / "phase_kill" / "checkpoints" / str(args.checkpoint_every)
        d.stage("train", "--which", "phase_kill", label="train_kill", kill_when=first.exists, expect_rc=-signal.SIGKILL)
        d.stage("train", "--which", "phase_kill", label="train_resume")
        ref, resumed = (json.loads((args.out / f"{p}.json").read_text()) for p in ("phase_ref", "phase_kill"))
        if resumed["resumed_from"] != args.checkpoint_every:
            raise StageError(f"train_resume started from step {resumed['resumed_from']}, not {args.checkpoint_every}")
        exact = same_adapters(*(args.out / p / "final_adapters.npz" for p in ("phase_ref", "phase_kill")))
        print(f"    resumed from step {resumed['resumed_from']}; final adapters bit-identical: {exact}; "
              f"loss {ref['first_loss']:.4f} -> {ref['final_loss']:.4f}; train_ref steps "
              f"{', '.join(f'{s:.1f}' for s in ref['step_seconds'])} s", flush=True)
        measured = d.records["train_ref"]["peak_rss_gb"] * 1e9 - ref["baseline_rss"]
        plan_error = abs(ref["plan_bytes"] - measured) / measured
        print(f"    memory plan {ref['plan_bytes'] / 1e9:.2f} GB vs measured {measured / 1e9:.2f} GB (train_ref's peak "
              f"RSS less its {ref['baseline_rss'] / 1e9:.2f} GB before loading): plan_error {plan_error:.3f}", flush=True)
        d.cli("export", "flax_to_hf.py", "--ckpt", args.out / "phase_kill", "--out", args.out / "export", "--merge-lora")
        d.stage("hf_logits")
        d.stage("jax_logits")
        logits = json.loads((args.out / "logits.json").read_text())
        print(f"    logits: max abs diff {logits['logits_max_abs_diff']:.4f} (tolerance {logits['tolerance']:.4f}); "
              f"vs fp32: ours {logits['ours_vs_fp32']:.4f}, transformers {logits['theirs_vs_fp32']:.4f}; "
              f"same top token {logits['same_top_token']:.0%}", flush=True)
        d.stage("sample")
        print("    " + "\n    ".join((d.logs / "sample.log").read_text().strip().splitlines()[-2:]), flush=True)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        (args.out / "stages.json").write_text(json.dumps(d.records, indent=1))
        if not args.keep:
            for name in LARGE_DIRS:
                shutil.rmtree(args.out / name, ignore_errors=True)
    peak = max(max(r["peak_rss_gb"] for r in d.records.values()),
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)
    print(f"whole run {time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.1f} at end", flush=True)
    print(f"peak_rss_gb={peak:.2f} resume_exact={str(exact).lower()} "
          f"logits_max_abs_diff={logits['logits_max_abs_diff']:.4f} plan_error={plan_error:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
