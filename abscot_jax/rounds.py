"""Policy iteration as a ledger: which stages a run has, in what order, which are done, and which
files each reads and writes. Each stage runs in its own process (`python -m abscot_jax.stages`,
functions in abscot_jax/stages/), so the accelerator memory it took is released when it ends; this
process never starts a JAX backend, and an out-of-process engine (vLLM) finds the GPUs free.

    RUN/
      state.json                 finished stages and what they reported; config; code version;
                                 wall and CPU seconds and peak RSS per stage
      config.yaml                the settings every stage process reads
      base/                      the starting model (HF) with the abstract vocabulary added
      splits.json                disjoint example ids per round and phase (and the warm-up)
      warmup/ (optional)         verbal-CoT SFT of the base (phase/ checkpoints, model/ HF)
      baseline/<mode>/           evaluation of the starting model (verbal CoT, direct answer)
      round_T/
        traces_a.json            z for Phase A (abscot_jax/trace_sources: round 1 a rule, later sampled)
        phase_a/                 checkpoints/, metrics.jsonl, tensorboard/
        model_a/                 Phase A model, exported HF (LoRA merged)
        traces_b.json            z for Phase B (this round's Phase A model on x)
        phase_b/, model_b/
        eval/                    results.jsonl, summary.json
      rl/ (optional)             GRPO: checkpoints/, metrics.jsonl, tensorboard/, model/ (HF), eval/
      xla_cache/                 compiled programs, shared by the stage processes
      stage_results/             what each stage process returned (every host's ledger reads it)
      report.md, *.png

Every stage writes its files under temporary names, renamed when complete; it is marked done in
state.json only after its process exits cleanly and its outputs are there. Rerunning skips
finished stages; a half-done training phase resumes from its latest checkpoint. Each round
continues from the previous round's final model (round 1 from the starting model). Multi-host:
every process runs the same ledger, its stage processes join the others' (ABSCOT_* / SLURM), and
process 0 writes the ledger's files.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from importlib.metadata import version

import yaml

from abscot_jax.config import RunConfig, to_dict
from abscot_jax.errors import Interrupted, RunError
from abscot_jax.files import replace_json
from abscot_jax.progress import duration
from abscot_jax.report import write_report
from abscot_jax.trace_sources import trace_source, uses_jax_devices


ROUND_STAGES = ("traces_a", "phase_a", "traces_b", "phase_b", "eval")
RL_STAGE = "rl"  # after the last round (rl.enabled), or alone: `--stage rl`
RL_EVAL_STAGE = "rl_eval"  # the rl stage's model on the evaluation set: after rl, or alone (`--stage rl_eval`)
RL_STAGES = (RL_STAGE, RL_EVAL_STAGE)
# How a stage process is started (followed by RUN_DIR KEY); tests start a fault-injecting wrapper.
STAGE_COMMAND = [sys.executable, "-m", "abscot_jax.stages"]
PR_SET_PDEATHSIG = 1  # prctl(2): a signal for the child when its parent dies


@dataclasses.dataclass(frozen=True)
class Stage:
    key: str  # its name in state.json
    kind: str  # its function in abscot_jax.stages.STAGE_FUNCTIONS
    args: dict  # that function's arguments beside the run context
    reads: tuple[str, ...]  # run-directory paths it needs (the configured inputs are checked where they are read)
    writes: tuple[str, ...]  # paths it leaves (relative to the run directory)
    accelerator: bool = True  # False: JAX stays on the CPU in its process (an engine has the GPUs)
    checkpoints: str = ""  # a training stage's checkpoint directory (run-relative)


def start_model(cfg: RunConfig) -> str:
    return "warmup/model" if cfg.data.warmup_examples else "base"


def final_model(cfg: RunConfig, t: int) -> str:
    return f"round_{t}/model_b" if t > 0 else start_model(cfg)


def phase_start(cfg: RunConfig, t: int, phase: str) -> str:
    """The model round t's Phase `phase` trains from: Phase A from the previous round's final model,
    Phase B from this round's Phase A model (the stepwise curriculum has no Phase A)."""
    if phase == "a" or cfg.variants.curriculum == "stepwise":
        return final_model(cfg, t - 1)
    return f"round_{t}/model_a"


def trace_source_reads(cfg: RunConfig, source: str, t: int, phase: str) -> str:
    """The model directory a trace source reads (the rules need only the tokenizer, in base/)."""
    if source in ("random", "pause"):
        return "base"
    return start_model(cfg) if source == "cot_codes" else phase_start(cfg, t, phase)


def setup_stages(cfg: RunConfig) -> list[Stage]:
    external = cfg.sampler.engine != "jax"
    stages = [Stage("prepare_base", "prepare_base", {}, (), ("base",))]
    if cfg.data.warmup_examples:
        stages.append(Stage("warmup", "warmup", {}, ("base",), ("warmup/model",), checkpoints="warmup/phase/checkpoints"))
    stages += [Stage(f"baseline_{mode}", "baseline", {"mode": mode}, (start_model(cfg),),
                     (f"baseline/{mode}/summary.json",), accelerator=not external)
               for mode in cfg.eval.baselines]
    return stages


def round_stages(cfg: RunConfig, t: int) -> list[Stage]:
    rd = f"round_{t}"
    stages = []
    for phase in ("b",) if cfg.variants.curriculum == "stepwise" else ("a", "b"):
        source, init = trace_source(cfg.variants, t, phase), phase_start(cfg, t, phase)
        stages += [Stage(f"{rd}/traces_{phase}", "traces", {"t": t, "phase": phase, "source": source},
                         (trace_source_reads(cfg, source, t, phase),),
                         (f"{rd}/traces_{phase}.json",), accelerator=uses_jax_devices(source, cfg.sampler.engine)),
                   Stage(f"{rd}/phase_{phase}", "phase", {"t": t, "phase": phase}, (init, f"{rd}/traces_{phase}.json"),
                         (f"{rd}/model_{phase}",), checkpoints=f"{rd}/phase_{phase}/checkpoints")]
    stages.append(Stage(f"{rd}/eval", "eval", {"t": t}, (f"{rd}/model_b",), (f"{rd}/eval/summary.json",),
                        accelerator=cfg.sampler.engine == "jax"))
    return stages


def rl_stage(cfg: RunConfig) -> Stage:
    """GRPO from the last round's final model (rl.mode=abstract) or the warm-up model (verbal)."""
    start = final_model(cfg, cfg.rounds) if cfg.rl.mode == "abstract" else start_model(cfg)
    return Stage(RL_STAGE, "rl", {}, (start,), ("rl/model",), checkpoints="rl/checkpoints")


def rl_eval_stage(cfg: RunConfig) -> Stage:
    """The rl stage's model evaluated as a round's model (rl.mode=abstract) or as the verbal baseline (verbal)."""
    return Stage(RL_EVAL_STAGE, "rl_eval", {}, ("rl/model",), ("rl/eval/summary.json",),
                 accelerator=cfg.sampler.engine == "jax")


def find_stage(cfg: RunConfig, key: str) -> Stage:
    stages = setup_stages(cfg) + [s for t in range(1, cfg.rounds + 1) for s in round_stages(cfg, t)]
    stages += [rl_stage(cfg), rl_eval_stage(cfg)]
    for stage in stages:
        if stage.key == key:
            return stage
    raise RunError(f"no stage {key!r} in this run; its stages: {', '.join(s.key for s in stages)}")


def result_path(run_dir: Path, key: str) -> Path:
    return run_dir / "stage_results" / (key.replace("/", "__") + ".json")


def host_index() -> int:
    """This process's index among the run's hosts, as its launcher set it (no JAX needed)."""
    return int(os.environ.get("ABSCOT_PROCESS_ID") or os.environ.get("SLURM_PROCID") or 0)


def write_json(path: Path, data) -> None:
    """Host 0 writes; the others keep theirs in memory."""
    if host_index() == 0:
        replace_json(path, data)


def code_version() -> str:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", str(here)],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return f"abscot-jax {version('abscot-jax')}" + (f" @ {commit}{'+dirty' if dirty else ''}" if commit else "")


# Settings that change how a run executes, not what it computes: a rerun may change them.
EXECUTION_KEYS = {"run_dir", "rounds", "sampler.engine", "sampler.python", "sampler.tensor_parallel_size",
                  "sampler.data_parallel_size", "sampler.max_batch", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.device_memory_fraction", "eval.max_error_fraction", "mesh.data", "mesh.fsdp", "mesh.tensor"}


def changed_settings(before: dict, now: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for each setting of `before` (flattened, EXECUTION_KEYS left out) that differs."""
    changes = []
    # A key only `now` has is a setting added since the run was made (it ran as its default does).
    for key in sorted(before):
        name, old, new = prefix + key, before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += changed_settings(old, new, name + ".")
        elif old != new and name not in EXECUTION_KEYS:
            changes.append(f"{name}: {old!r} -> {new!r}")
    return changes


def set_parent_death_signal() -> None:
    """In a stage process (before exec): die with the ledger, so that a killed run leaves no stage behind."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def launch(cmd: list[str], env: dict, started) -> tuple[int, os.rusage, list[str]]:
    """Run a stage process (`started(process)` once it runs); its stderr passes through. Returns
    its exit code (negative: the signal that ended it), its resource usage and its last lines of
    stderr. Its own session: a terminal's Ctrl-C reaches it only through the ledger, once."""
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace",
                            preexec_fn=set_parent_death_signal, start_new_session=True)
    started(proc)
    tail = deque(maxlen=20)

    def relay():
        for line in proc.stderr:
            # A progress bar's last state has no newline: end it, so that the next line starts clean.
            sys.stderr.write(line if line.endswith("\n") else line + "\n")
            if line.strip():
                tail.append(line.rstrip("\n"))

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)  # not Popen.wait: the rusage gives its CPU time and peak RSS
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    reader.join()
    return code, usage, list(tail)


class Ledger:
    """state.json of one run directory, and the stage processes that fill it."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.dir = Path(cfg.run_dir) / cfg.name
        self.state_path = self.dir / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"done": {}}
        finished = self.state["done"] and "config" in self.state
        changes = changed_settings(self.state["config"], to_dict(cfg)) if finished else []
        if RL_STAGE not in self.state["done"]:  # rl settings change only the rl stage, which has not run
            changes = [c for c in changes if not c.startswith("rl.")]
        if changes:  # its finished stages would be reused with settings they were not made with
            raise RunError(f"run {cfg.name!r} ({self.dir}) has {len(self.state['done'])} finished stage(s) made with "
                           f"other settings ({'; '.join(changes)}); give this run a new name (--set name=...) or "
                           "rerun with the settings it was made with")
        (self.dir / "stage_results").mkdir(parents=True, exist_ok=True)
        self.state.setdefault("versions", []).append(code_version())
        self.state["config"] = to_dict(cfg)
        if host_index() == 0:
            (self.dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        write_json(self.state_path, self.state)
        self.child: subprocess.Popen | None = None  # the stage process running now
        self.stopped_by: int | None = None  # SIGINT or SIGTERM, once received

    def on_signal(self, signum: int, _frame) -> None:
        """SIGINT/SIGTERM: pass it to the stage process, which stops where its files stay whole and
        ends the run when it exits; between stages, end the run now."""
        self.stopped_by = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)
        else:
            raise self.interrupted("between stages", "")

    @contextlib.contextmanager
    def forwarding_signals(self):
        """While inside: SIGINT/SIGTERM go to `on_signal` (a stage process is never left running)."""
        handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)

    def interrupted(self, where: str, checkpoints: str) -> Interrupted:
        steps = [int(p.name) for p in (self.dir / checkpoints).glob("[0-9]*")] if checkpoints else []
        latest = f" (latest checkpoint: {self.dir / checkpoints / str(max(steps))})" if steps else ""
        return Interrupted(f"{where}{latest}; resume with: {shlex.join(sys.orig_argv)}",
                           128 + (self.stopped_by or signal.SIGINT))

    def done(self, key: str) -> bool:
        return key in self.state["done"]

    def run(self, stage: Stage) -> dict:
        """Run `stage` in its own process unless it is done; record what it returned."""
        if self.done(stage.key):
            return self.state["done"][stage.key]
        missing = [p for p in stage.reads if not (self.dir / p).exists()]
        if missing:
            raise RunError(f"stage {stage.key} needs {', '.join(missing)}, which is not there; run the stages "
                           "before it first")
        print(f"[{self.cfg.name}] {stage.key} ...", flush=True)
        env = dict(os.environ) if stage.accelerator else {**os.environ, "JAX_PLATFORMS": "cpu"}
        start = time.perf_counter()
        try:
            code, usage, tail = launch([*STAGE_COMMAND, str(self.dir), stage.key], env,
                                       lambda proc: setattr(self, "child", proc))
        finally:
            self.child = None
        if self.stopped_by is not None and code != 0:
            raise self.interrupted(f"stage {stage.key}", stage.checkpoints)
        if code != 0:
            last = tail[-1].rpartition("\r")[2] if tail else "no output"  # (after a progress bar's redraws)
            if code == 2 and "error: " in last:  # the stage's own one-line reason
                raise RunError(last.split("error: ", 1)[1])
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            raise RunError(f"stage {stage.key} {how} ({last}); not marked done: rerun the same command to retry it")
        result = json.loads(result_path(self.dir, stage.key).read_text())
        absent = [p for p in stage.writes if not (self.dir / p).exists()]
        if absent:
            raise RunError(f"stage {stage.key} finished without writing {', '.join(absent)}; not marked done")
        self.state["done"][stage.key] = result
        # What the stage cost its process (a resumed stage: its last attempt only).
        self.state.setdefault("seconds", {})[stage.key] = {"wall": time.perf_counter() - start,
                                                           "cpu": usage.ru_utime + usage.ru_stime}
        self.state.setdefault("peak_rss_gb", {})[stage.key] = usage.ru_maxrss * 1024 / 1e9
        write_json(self.state_path, self.state)
        if self.stopped_by is not None:  # the stage finished before the signal could stop it
            raise self.interrupted(f"after stage {stage.key}", "")
        return result

    def report(self) -> Path | None:
        if host_index() == 0:
            path = write_report(self.dir)
            print(f"report: {path}", flush=True)
            return path


def run(cfg: RunConfig, rounds: list[int], stages=ROUND_STAGES) -> Ledger:
    """Run the setup stages, then `stages` of each round in `rounds`, then the rl stage and its
    evaluation (when `stages` names rl, or rl.enabled and the last round ran whole; the evaluation
    alone when `stages` names rl_eval), then write the report."""
    unknown = set(stages) - {*ROUND_STAGES, *RL_STAGES}
    if unknown:
        raise RunError(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join((*ROUND_STAGES, *RL_STAGES))}")
    if cfg.sampler.engine == "vllm" and not Path(cfg.sampler.python).is_file():
        raise RunError(f"sampler.python={cfg.sampler.python!r} does not exist: give the Python of an environment "
                       "with vllm installed")
    ledger = Ledger(cfg)
    start, done_before = time.perf_counter(), len(ledger.state["done"])
    with ledger.forwarding_signals():
        for stage in setup_stages(cfg):
            ledger.run(stage)
        for t in rounds:
            for stage in round_stages(cfg, t):
                if stage.key.split("/")[1] in stages:
                    ledger.run(stage)
        rl = RL_STAGE in stages or (cfg.rl.enabled and cfg.rounds in rounds and set(ROUND_STAGES) <= set(stages))
        if rl:
            ledger.run(rl_stage(cfg))
        if rl or RL_EVAL_STAGE in stages:
            ledger.run(rl_eval_stage(cfg))
        ledger.report()
        final = ledger.state["done"].get(f"round_{rounds[-1]}/eval") if rounds else None
        result = (f"; round {rounds[-1]}: accuracy {final['accuracy']:.1%}, {final['mean_tokens'] or 0:.1f} tokens"
                  if final and final.get("accuracy") is not None else "")
        print(f"[{cfg.name}] done: {len(ledger.state['done']) - done_before} stage(s) run in "
              f"{duration(time.perf_counter() - start)}, {done_before} done before{result}", flush=True)
    return ledger
