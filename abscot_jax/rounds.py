"""Policy iteration: the stages of each round, one run directory, resumable state.

    RUN/
      state.json                 finished stages and what they reported; config; code version;
                                 wall and CPU seconds per stage
      config.yaml
      base/                      the starting model (HF) with the abstract vocabulary added
      splits.json                disjoint example ids per round and phase (and the warm-up)
      warmup/ (optional)         verbal-CoT SFT of the base (phase/ checkpoints, model/ HF)
      baseline/<mode>/           evaluation of the starting model (verbal CoT, direct answer)
      round_T/
        traces_a.json            z for Phase A (round 1: the random rule; else round T-1's model on (x, c))
        phase_a/                 checkpoints/, metrics.jsonl, tensorboard/
        model_a/                 Phase A model, exported HF (LoRA merged)
        traces_b.json            z for Phase B (this round's Phase A model on x)
        phase_b/, model_b/
        eval/                    results.jsonl, summary.json
      report.md, *.png

Every stage reads files earlier stages wrote and writes its own under a temporary name, renamed
when complete; a stage is marked done in state.json only after that. Rerunning skips finished
stages; a half-done training phase resumes from its latest checkpoint. Each round continues
from the previous round's final model (round 1 from the starting model).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import resource
import shutil
import subprocess
import time
from pathlib import Path

import jax
import yaml

from abscot_jax.config import RunConfig, to_dict

log = logging.getLogger(__name__)

# A phase stage ends with its merged HF export (model_a/, model_b/).
class RunError(ValueError):
    """A run that cannot proceed as configured; the message says what to do."""


ROUND_STAGES = ("traces_a", "phase_a", "traces_b", "phase_b", "eval")


def process_cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_json_atomic(path: Path, data) -> None:
    """Every process calls it with the same data; process 0 writes, the others wait until it has."""
    from abscot_jax.sharding import sync_processes

    if jax.process_index() == 0:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    sync_processes(f"write {path}")


def code_version() -> str:
    from importlib.metadata import version

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
    """`key: old -> new` for each setting (flattened, EXECUTION_KEYS left out) that differs."""
    changes = []
    for key in sorted(set(before) | set(now)):
        name, old, new = prefix + key, before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += changed_settings(old, new, name + ".")
        elif old != new and name not in EXECUTION_KEYS:
            changes.append(f"{name}: {old!r} -> {new!r}")
    return changes


class Run:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.dir = Path(cfg.run_dir) / cfg.name
        self.state_path = self.dir / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"done": {}}
        finished = self.state["done"] and "config" in self.state
        changes = changed_settings(self.state["config"], to_dict(cfg)) if finished else []
        if changes:  # its finished stages would be reused with settings they were not made with
            raise RunError(f"run {cfg.name!r} ({self.dir}) has {len(self.state['done'])} finished stage(s) made with "
                           f"other settings ({'; '.join(changes)}); give this run a new name (--set name=...) or "
                           "rerun with the settings it was made with")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state.setdefault("versions", []).append(code_version())
        self.state["config"] = to_dict(cfg)
        if jax.process_index() == 0:
            (self.dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self._save_state()
        self._tokenizer = None
        self._examples = None

    # ---- bookkeeping --------------------------------------------------------------------------
    def _save_state(self):
        write_json_atomic(self.state_path, self.state)

    def done(self, key: str) -> bool:
        return key in self.state["done"]

    def stage(self, key: str, fn):
        """Run `fn` unless `key` is already done; record what it returns."""
        if self.done(key):
            log.info("%s: done, skipped", key)
            return self.state["done"][key]
        print(f"[{self.cfg.name}] {key} ...", flush=True)
        wall, cpu = time.perf_counter(), process_cpu_seconds()
        result = fn() or {}
        self.state["done"][key] = result
        # What the stage cost this process (a resumed stage: its last attempt only).
        self.state.setdefault("seconds", {})[key] = {"wall": time.perf_counter() - wall,
                                                      "cpu": process_cpu_seconds() - cpu}
        self._save_state()
        return result

    def round_dir(self, t: int) -> Path:
        return self.dir / f"round_{t}"

    # ---- data ---------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.dir / "base"))
        return self._tokenizer

    def examples(self) -> dict:
        if self._examples is None:
            from abscot_jax.data.dolci import load_dolci

            d = self.cfg.data
            examples, _ = load_dolci(d.train, limit=d.max_rows or None)
            self._examples = {e.id: e for e in examples}
        return self._examples

    def split(self, name: str) -> list:
        """The examples of one subset ('warmup', 'round_T_a', 'round_T_b'); fixed in splits.json."""
        path = self.dir / "splits.json"
        if not path.exists():
            write_json_atomic(path, self._make_splits())
        ids = json.loads(path.read_text())[name]
        examples = self.examples()
        return [examples[i] for i in ids]

    def _make_splits(self) -> dict:
        d = self.cfg.data
        ids = sorted(self.examples())
        random.Random(self.cfg.train.seed).shuffle(ids)
        names = [f"round_{t}_{p}" for t in range(1, self.cfg.rounds + 1) for p in "ab"]
        need = d.warmup_examples + len(names) * d.examples_per_phase
        if len(ids) < need:
            per_phase = (len(ids) - d.warmup_examples) // len(names)
            if per_phase < 1:
                raise RunError(f"{len(ids)} usable training examples cannot fill {len(names)} disjoint subsets "
                                 f"(+{d.warmup_examples} warm-up); add data or lower data.examples_per_phase")
            log.warning("only %d examples: %d per phase instead of %d", len(ids), per_phase, d.examples_per_phase)
        else:
            per_phase = d.examples_per_phase
        splits = {"warmup": ids[:d.warmup_examples]}
        start = d.warmup_examples
        for name in names:
            splits[name] = ids[start:start + per_phase]
            start += per_phase
        return splits

    def builder(self):
        from abscot_jax.data.sequences import BuildConfig, SequenceBuilder

        d, t = self.cfg.data, self.cfg.train
        return SequenceBuilder(self.tokenizer, BuildConfig(
            seq_len=t.seq_len, m_max=d.m_max, cut_policy=d.cut_policy, loss_on_trace=t.loss_on_trace,
            system=d.system or None, seed=t.seed))

    # ---- models -------------------------------------------------------------------------------
    def prepare_base(self):
        """Copy the starting model with the abstract vocabulary added (an explicit, recorded step)."""
        from transformers import AutoTokenizer

        from abscot_jax.checkpoint import load_hf, save_hf
        from abscot_jax.sharding import sync_processes
        from abscot_jax.vocab import prepare_model_vocab

        m = self.cfg.model
        if not m.hf_dir:
            raise RunError("model.hf_dir is not set: give the starting model's HF directory")
        model = load_hf(m.hf_dir, param_dtype=m.param_dtype)
        tokenizer = AutoTokenizer.from_pretrained(m.hf_dir)
        vocab, initialised = (prepare_model_vocab(model, tokenizer, sigma=m.new_row_sigma, seed=self.cfg.train.seed)
                              if m.add_abstract_vocab else (None, False))
        if jax.process_index() == 0:  # every process loaded the same model; one writes it
            # In the training dtype: a bf16 base (LoRA) is exported in bf16, not as a 16 GB fp32 copy of 4B.
            save_hf(model, self.dir / "base", tokenizer=tokenizer, dtype=m.param_dtype, overwrite=True)
        sync_processes("write base")
        return {"abstract_rows_initialised": initialised, "vocab_size": model.config.vocab_size}

    def load_for_training(self, hf_dir: Path):
        from flax import nnx  # noqa: F401  (model construction below)

        from abscot_jax.checkpoint import load_hf
        from abscot_jax.model.lora import LoRAConfig, apply_lora
        from abscot_jax.vocab import abstract_vocab

        m, t = self.cfg.model, self.cfg.train
        model = load_hf(hf_dir, param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, remat=m.remat,
                        attention_impl=m.attention_impl)
        if t.mode == "lora":
            vocab = abstract_vocab(self.tokenizer)
            new_ids = vocab.all_new_ids
            lora = self.cfg.lora
            apply_lora(model, LoRAConfig(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                                         targets=tuple(lora.targets)),
                       new_token_start=min(new_ids), num_new_tokens=len(new_ids), seed=t.seed)
        return model

    def train_and_export(self, init_dir: Path, examples, phase_dir: Path, out_dir: Path) -> dict:
        from abscot_jax.checkpoint import save_hf
        from abscot_jax.model.lora import merge_lora
        from abscot_jax.sharding import MeshConfig, gather_params, make_mesh, sync_processes
        from abscot_jax.train.runner import run_phase

        mesh_cfg = self.cfg.mesh
        mesh = make_mesh(MeshConfig(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor))
        model, summary = run_phase(self.load_for_training(init_dir), examples, self.cfg, phase_dir, mesh,
                                   base_dir=init_dir)
        gather_params(model)
        if jax.process_index() == 0:
            # The training dtype: what the next phase trains from (fp32 master weights in full fine-tuning).
            save_hf(merge_lora(model), out_dir, tokenizer=self.tokenizer, dtype=self.cfg.model.param_dtype,
                    overwrite=True)
        sync_processes(f"export {out_dir}")
        return summary

    def engine(self, model_dir: Path):
        from abscot_jax.sampling.engines import HFEngine, JaxEngine, VllmOptions, vllm_engine

        s = self.cfg.sampler
        if s.engine == "jax":
            return JaxEngine.from_dir(model_dir, max_batch=s.max_batch)
        if s.engine == "hf":
            return HFEngine(model_dir, max_batch=s.max_batch)
        return vllm_engine(model_dir, VllmOptions(python=s.python, tensor_parallel_size=s.tensor_parallel_size,
                                                  data_parallel_size=s.data_parallel_size, max_batch=s.max_batch,
                                                  gpu_memory_utilization=s.gpu_memory_utilization, dtype=s.dtype))

    def sample_traces(self, model_dir: Path, examples, *, with_cot: bool, out: Path) -> dict:
        """Constrained traces from `model_dir` conditioned on (x, c) or x alone; failures are counted
        and those examples left out."""
        from abscot_jax.sampling.protocol import SamplingRequest

        s, builder = self.cfg.sampler, self.builder()
        requests = []
        for i, example in enumerate(examples):
            prompt = builder.condition_ids(example) if with_cot else builder.prompt_ids(example)
            if prompt is None:  # the example cannot fit seq_len; the builder counted it
                continue
            prompt = [int(t) for t in prompt]
            if with_cot:
                prompt = prompt[:-1]  # condition_ids ends with <beginabstract>, which the sampler forces itself
            requests.append(SamplingRequest(id=example.id, prompt_ids=prompt, mode="trace",
                                            temperature=s.trace_temperature, m_min=s.m_min, m_max=self.cfg.data.m_max,
                                            max_new_tokens=self.cfg.data.m_max + 2, seed=self.cfg.train.seed + i))
        engine, v, cost = self.engine(model_dir), self.cfg.variants, {}
        if v.trace_selection == "best_of_k" and (with_cot or v.select_phase_b):  # with_cot: Phase A, rounds >= 2
            from abscot_jax import variants

            m = self.cfg.model
            scorer = variants.scoring_model(engine, model_dir, param_dtype=m.param_dtype, compute_dtype=m.compute_dtype)
            selection = variants.select_traces(engine, scorer, builder, examples, requests, v.k,
                                               rows=self.cfg.train.batch_size, chunk=self.cfg.train.loss_chunk,
                                               trace_prior_weight=v.trace_prior_weight)
            write_json_atomic(out.with_name(out.stem + "_candidates.json"), selection.candidates)
            traces, cost = selection.best, {"selection": f"best_of_{v.k}", **selection.cost}
        else:
            results = engine.run_requests(requests)
            self.check_engine_errors(f"trace sampling from {model_dir}",
                                     [r.error for r in results if r.finish_reason == "error"], len(requests))
            traces = {r.id: r.trace_ids for r in results if r.finish_reason == "stop" and r.trace_ids}
        if not traces:
            raise RunError(f"trace sampling from {model_dir} gave no complete trace for {len(requests)} requests "
                           f"(sampler.engine={s.engine}); not marked done: check the model and the engine, then rerun")
        failed = len(requests) - len(traces)
        write_json_atomic(out, traces)
        lengths = [len(t) for t in traces.values()]
        return {"traces": len(traces), "failed": failed,
                "mean_length": sum(lengths) / max(len(lengths), 1), **cost}

    def evaluate(self, model_dir: Path, mode: str, out_dir: Path) -> dict:
        from abscot_jax.data.math500 import load_math500
        from abscot_jax.eval.evaluate import dataset_name, evaluate, write_results

        e = self.cfg.eval
        problems, _ = load_math500(self.cfg.data.eval, limit=e.limit or None)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        records, summary = evaluate(self.engine(model_dir), tokenizer, problems, mode=mode,
                                    samples_per_problem=e.samples, m_min=e.m_min, m_max=self.cfg.data.m_max,
                                    trace_temperature=e.trace_temperature, max_new_tokens=e.max_new_tokens,
                                    seed=self.cfg.train.seed, dataset=dataset_name(self.cfg.data.eval))
        if jax.process_index() == 0:
            write_results(out_dir, records, summary)  # also when it fails below: the records say why
        self.check_engine_errors(f"evaluation of {model_dir} ({mode})",
                                 [r["error"] for r in records if r["finish_reason"] == "error"], len(records))
        return {"accuracy": summary.get("accuracy"), "mean_tokens": summary.get("mean_generated_tokens")}

    def check_engine_errors(self, what: str, errors: list, total: int) -> None:
        """Fail the stage (it is not marked done) when more than eval.max_error_fraction of its
        `total` requests came back as errors (an engine that could not start fails them all)."""
        allowed = self.cfg.eval.max_error_fraction
        if total and len(errors) > allowed * total:
            raise RunError(f"{what}: {len(errors)} of {total} requests failed in the {self.cfg.sampler.engine} engine "
                           f"({str(errors[0])[:400]}); above eval.max_error_fraction={allowed:g}, so the stage is "
                           "not marked done: fix the engine or its settings and rerun")

    # ---- the round ----------------------------------------------------------------------------
    def start_model(self) -> Path:
        return self.dir / ("warmup/model" if self.cfg.data.warmup_examples else "base")

    def final_model(self, t: int) -> Path:
        return self.round_dir(t) / "model_b" if t > 0 else self.start_model()

    def setup(self):
        self.stage("prepare_base", self.prepare_base)
        if self.cfg.data.warmup_examples:
            self.stage("warmup", self.warmup)
        for mode in self.cfg.eval.baselines:
            self.stage(f"baseline_{mode}", lambda mode=mode: self.evaluate(
                self.start_model(), mode, self.dir / "baseline" / mode))

    def warmup(self):
        """Teach the starting model the verbal-CoT format: [x; c y], loss on c and y."""
        builder = self.builder()
        examples = [v for v in (verbal_example(builder, e) for e in self.split("warmup")) if v is not None]
        return self.train_and_export(self.dir / "base", examples, self.dir / "warmup" / "phase",
                                     self.dir / "warmup" / "model")

    def run_round(self, t: int, stages=ROUND_STAGES):
        unknown = set(stages) - set(ROUND_STAGES)
        if unknown:
            raise RunError(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join(ROUND_STAGES)}")
        rd = self.round_dir(t)
        rd.mkdir(parents=True, exist_ok=True)
        key = f"round_{t}"
        steps = {
            "traces_a": lambda: self._traces_a(t),
            "phase_a": lambda: self.train_and_export_phase(t, "a"),
            "traces_b": lambda: self.sample_traces(rd / "model_a", self.split(f"{key}_b"), with_cot=False,
                                                   out=rd / "traces_b.json"),
            "phase_b": lambda: self.train_and_export_phase(t, "b"),
            "eval": lambda: self.evaluate(rd / "model_b", "abstract", rd / "eval"),
        }
        for name in ROUND_STAGES:
            if name in stages and name in steps:
                self.stage(f"{key}/{name}", steps[name])

    def _traces_a(self, t: int) -> dict:
        examples = self.split(f"round_{t}_a")
        out = self.round_dir(t) / "traces_a.json"
        if t == 1 and self.cfg.variants.round1_traces == "cot_codes":
            return self._cot_code_traces(examples, out)
        if t == 1:  # the paper's round-1 rule: random abstract tokens per CoT step
            builder = self.builder()
            traces = {e.id: list(builder.random_trace(e)) for e in examples}
            write_json_atomic(out, traces)
            return {"traces": len(traces), "rule": "random"}
        return self.sample_traces(self.final_model(t - 1), examples, with_cot=True, out=out)

    def _cot_code_traces(self, examples, out: Path) -> dict:
        """Round-1 traces from k-means codes of the CoT steps' hidden states under the starting model;
        the codebook and its statistics go to round_1/."""
        from abscot_jax import variants
        from abscot_jax.checkpoint import load_hf

        v, m = self.cfg.variants, self.cfg.model
        model = load_hf(self.start_model(), param_dtype=m.param_dtype, compute_dtype=m.compute_dtype)
        traces, stats = variants.cot_code_traces(model, self.builder(), examples, code_layer=v.code_layer,
                                                 codes_per_step=v.codes_per_step, rows=self.cfg.train.batch_size,
                                                 seed=self.cfg.train.seed, out_dir=self.round_dir(1))
        write_json_atomic(out, traces)
        return {"traces": len(traces), "rule": "cot_codes", "layer": stats["layer"], "steps": stats["steps"],
                "mean_length": stats["mean_trace_length"],
                "code_perplexity": [level["perplexity"] for level in stats["levels"]]}

    def train_and_export_phase(self, t: int, phase: str) -> dict:
        """Phase A (from the previous round's final model) or Phase B (from this round's Phase A
        model), then the merged HF export. Export is part of the stage: a phase whose export was
        interrupted resumes from its final checkpoint and exports again."""
        rd = self.round_dir(t)
        traces = json.loads((rd / f"traces_{phase}.json").read_text())
        from abscot_jax.variants import build_phase_examples

        builder, v = self.builder(), self.cfg.variants
        examples = build_phase_examples(builder, [e for e in self.split(f"round_{t}_{phase}") if e.id in traces],
                                        phase.upper(), traces, v, rd / f"traces_{phase}_candidates.json")
        print(f"  phase {phase.upper()} data: {builder.report}", flush=True)
        if not examples:
            raise RunError(f"no Phase {phase.upper()} example fits train.seq_len={self.cfg.train.seq_len} "
                           f"({builder.report}); raise train.seq_len")
        init = self.final_model(t - 1) if phase == "a" else rd / "model_a"
        summary = self.train_and_export(init, examples, rd / f"phase_{phase}", rd / f"model_{phase}")
        extra = {}  # what a variant changed in this phase's data, and its size
        if phase == "a" and v.bottleneck == "two_pass":
            extra["bottleneck"] = "two_pass"
        if v.weight_by_score and (rd / f"traces_{phase}_candidates.json").exists():
            extra["weighted_candidates"] = True
        if extra:
            extra["sequence_tokens"] = sum(len(e) for e in examples)
        return {**summary, "examples": len(examples), "build": str(builder.report), **extra}

    def report(self):
        from abscot_jax.report import write_report

        if jax.process_index() == 0:
            path = write_report(self.dir)
            print(f"report: {path}", flush=True)
            return path


def verbal_example(builder, example):
    """[x; c y] with c and y trained (role ANSWER, plain causal): the verbal-CoT format.
    None when it does not fit seq_len."""
    from abscot_jax.data.sequences import make_example
    from abscot_jax.model.attention import Role

    x, y = builder.prompt_ids(example), builder.answer_ids(example)
    open_, cot, close, _ = builder.cot_pieces(example)
    if len(x) + len(open_) + len(cot) + len(close) + len(y) > builder.config.seq_len:
        return None
    return make_example([(x, Role.PROMPT), (open_ + cot + close + y, Role.ANSWER)], example_id=example.id, phase="verbal")


def run(cfg: RunConfig, rounds: list[int], stages=ROUND_STAGES) -> Run:
    if cfg.sampler.engine == "vllm" and not Path(cfg.sampler.python).is_file():
        raise RunError(f"sampler.python={cfg.sampler.python!r} does not exist: give the Python of an environment "
                       "with vllm installed")
    r = Run(cfg)
    r.setup()
    for t in rounds:
        if t > 1 and not (r.final_model(t - 1)).exists():
            raise RunError(f"round {t} needs round {t - 1}'s final model ({r.final_model(t - 1)}); run round {t - 1} first")
        r.run_round(t, stages)
    r.report()
    return r
