"""Sampling engines that all speak `run_requests(requests) -> results` (see protocol.py):

  JaxEngine         the JAX sampler, in process (shares the model with training code).
  HFEngine          HF transformers `generate`; a logits processor runs the same token choice
                    (constraint + greedy/sampling) as the JAX sampler. The CPU reference.
  run_vllm          vLLM, in the process of a vLLM environment; `vllm_engine(...)` starts it
                    there (a SubprocessEngine with the Python named in VllmOptions).
  SubprocessEngine  any of them in another process through JSONL files: this module's CLI,
                    python -m abscot_jax.sampling.engines --engine hf|vllm|jax --model DIR \
                        --requests IN.jsonl --out OUT.jsonl

Only the engines import jax, torch or vllm, and only when used: the vLLM environment needs none
of the others to run this module.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from abscot_jax.progress import Progress, current_label
from abscot_jax.sampling.protocol import (
    RequestError, SamplingRequest, SamplingResult, make_result, new_token_limit, prompt_token_ids, read_requests,
    read_results, stop_ids, write_requests, write_results,
)

END_OF_TURN = "<|im_end|>"
REPO_ROOT = Path(__file__).resolve().parents[2]


def end_of_turn_id(tokenizer) -> int | None:
    """`<|im_end|>` when the tokenizer has it (Qwen3 chat), else its eos token."""
    vocab = tokenizer.get_vocab()
    return vocab.get(END_OF_TURN, tokenizer.eos_token_id)


def load_abstract_vocab(tokenizer):
    """The tokenizer's AbstractVocab, or None when it has no abstract tokens (verbal mode only)."""
    from abscot_jax.vocab import abstract_vocab, has_abstract_tokens

    return abstract_vocab(tokenizer) if has_abstract_tokens(tokenizer) else None


def model_context(model_dir: str | Path) -> int:
    return int(json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings", 40960))


def check_model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json); pass an exported HF directory")
    return path


@dataclasses.dataclass
class Prepared:
    """The requests that passed the checks, with their prompt ids and token limits, and the
    error results of those that did not (at their positions)."""

    index: list[int]
    prompts: list[list[int]]
    limits: list[int]
    results: list[SamplingResult | None]


def prepare(requests: Sequence[SamplingRequest], tokenizer, vocab_size: int, context: int, vocab) -> Prepared:
    prepared = Prepared([], [], [], [None] * len(requests))
    for i, request in enumerate(requests):
        if isinstance(request, SamplingResult):  # a line read_requests could not parse
            prepared.results[i] = request
            continue
        try:
            ids = prompt_token_ids(request, tokenizer, vocab_size, context, vocab is not None)
        except RequestError as e:
            prepared.results[i] = SamplingResult.failure(request.id, str(e))
            continue
        except (TypeError, ValueError) as e:  # e.g. a string where a number belongs, from a JSON file
            prepared.results[i] = SamplingResult.failure(request.id, f"a field has the wrong type or value: {e}")
            continue
        prepared.index.append(i)
        prepared.prompts.append(ids)
        prepared.limits.append(new_token_limit(request, len(ids), context))
    return prepared


class _LocalEngine:
    """What the in-process engines share: checks and results here, generation in `_generate`."""

    tokenizer = None
    vocab = None
    vocab_size: int
    context: int

    def _generate(self, prompts, requests, limits) -> list[tuple[list[int], bool]]:
        raise NotImplementedError

    def batch_size(self) -> int:
        """Requests one `_generate` call runs together: the engine's batch (JaxEngine: its sampler's)."""
        sampler = getattr(self, "sampler", None)
        return getattr(sampler, "max_batch", None) or getattr(self, "max_batch", None) or 32

    def _generate_in_batches(self, prompts, requests, limits) -> list:
        """`_generate` one batch at a time, shortest prompts first (the batches the engines form
        themselves), counting the finished requests in a progress line. After an error the
        remaining requests fail with it, unrun (a failure such as running out of memory repeats)."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        outputs: list = [None] * len(prompts)
        size, error = self.batch_size(), None
        bar = Progress(current_label(), len(prompts), unit="requests")
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            if error is None:
                try:
                    done = self._generate([prompts[i] for i in chunk], [requests[i] for i in chunk],
                                          [limits[i] for i in chunk])
                except Exception as e:  # keep the results so far; fail the rest with the reason
                    error = e
            for i, output in zip(chunk, done if error is None else [error] * len(chunk)):
                outputs[i] = output
            bar.update(len(chunk))
        failed = sum(isinstance(o, Exception) for o in outputs)
        generated = sum(len(o[0]) for o in outputs if not isinstance(o, Exception))
        bar.close(generated_tokens=f"{generated:,}", errors=failed or None)
        return outputs

    def run_requests(self, requests: Sequence[SamplingRequest]) -> list[SamplingResult]:
        prep = prepare(requests, self.tokenizer, self.vocab_size, self.context, self.vocab)
        valid = [requests[i] for i in prep.index]
        if valid:
            outputs = self._generate_in_batches(prep.prompts, valid, prep.limits)
            eos = end_of_turn_id(self.tokenizer)
            begin = self.vocab.begin_id if self.vocab else None
            end = self.vocab.end_id if self.vocab else None
            for i, request, output in zip(prep.index, valid, outputs):
                if isinstance(output, Exception):
                    prep.results[i] = SamplingResult.failure(request.id, f"{type(output).__name__}: {output}")
                    continue
                tokens, stopped = output
                prep.results[i] = make_result(request, tokens, "stop" if stopped else "length",
                                              self.tokenizer, begin, end, eos)
        return prep.results


# ---- JAX --------------------------------------------------------------------------------------

class JaxEngine(_LocalEngine):
    """The JAX sampler behind the common interface. `model`: a Qwen3 NNX model; `sampler_options`
    go to `Sampler` (max_batch, min_batch, min_prompt_bucket, min_new_bucket)."""

    def __init__(self, model, tokenizer, *, mesh=None, context: int | None = None, **sampler_options):
        from abscot_jax.sampling.sampler import Sampler, TraceTokens

        self.tokenizer = tokenizer
        self.vocab = load_abstract_vocab(tokenizer)
        self.vocab_size = model.config.vocab_size
        self.context = context or model.config.max_position_embeddings
        self.sampler = Sampler(model, trace=TraceTokens.of(self.vocab), eos_id=end_of_turn_id(tokenizer),
                               mesh=mesh, **sampler_options)

    @classmethod
    def from_dir(cls, model_dir, *, param_dtype: str = "float32", **kwargs) -> "JaxEngine":
        from transformers import AutoTokenizer

        from abscot_jax.checkpoint.hf import load_hf

        model_dir = check_model_dir(model_dir)
        return cls(load_hf(model_dir, param_dtype=param_dtype), AutoTokenizer.from_pretrained(str(model_dir)), **kwargs)

    def _generate(self, prompts, requests, limits):
        return self.sampler.generate(prompts, requests, limits)


# ---- HF transformers --------------------------------------------------------------------------

class HFEngine(_LocalEngine):
    """`generate` on an HF directory. HF runs the model and its cache; at each step a logits
    processor applies the sampler's `decode_step` (the same constraint and token choice, per-row
    seeds included) and leaves only the chosen token finite, so greedy `generate` emits it; a
    stopping criterion ends each row when `decode_step` says it is done."""

    def __init__(self, model_dir, *, dtype: str = "float32", device: str = "cpu", max_batch: int = 32,
                 context: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        model_dir = check_model_dir(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.vocab = load_abstract_vocab(self.tokenizer)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).to(device).eval()
        # Our processor and stopping criterion decide everything: drop the checkpoint's defaults
        # (eos, temperature, ...) so generate adds no processors or stops of its own.
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.model.generation_config = GenerationConfig(pad_token_id=self.pad_id)
        self.vocab_size = self.model.config.vocab_size
        self.context = context or model_context(model_dir)
        self.device, self.max_batch = device, max_batch

    def _generate(self, prompts, requests, limits):
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = [None] * len(prompts)
        for start in range(0, len(order), self.max_batch):
            chunk = order[start:start + self.max_batch]
            results = self._generate_batch([prompts[i] for i in chunk], [requests[i] for i in chunk],
                                           [limits[i] for i in chunk])
            for i, result in zip(chunk, results):
                out[i] = result
        return out

    def _generate_batch(self, prompts, requests, limits):
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding, as generate expects for decoder-only models
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        chooser = _DecodeStepProcessor(requests, limits, self.vocab, end_of_turn_id(self.tokenizer), self.pad_id)
        config = GenerationConfig(do_sample=False, max_new_tokens=max(limits), pad_token_id=self.pad_id)
        with torch.no_grad():
            self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                generation_config=config, logits_processor=LogitsProcessorList([chooser]),
                                stopping_criteria=StoppingCriteriaList([chooser.stopping]))
        return chooser.outputs()


class _DecodeStepProcessor:
    """HF LogitsProcessor running `sampler.decode_step` on HF's logits (see HFEngine)."""

    def __init__(self, requests, limits, vocab, eos_id, pad_id):
        import jax
        import jax.numpy as jnp
        from transformers import StoppingCriteria

        from abscot_jax.sampling.sampler import DecodeState, Rows, TraceTokens, decode_step

        self.trace, self.pad_id = TraceTokens.of(vocab), pad_id
        self.rows = jax.tree.map(jnp.asarray, Rows.build(requests, limits, eos_id))
        self.state = DecodeState.init(self.rows, max(limits))
        self._step = _jitted(decode_step)
        processor = self

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                import numpy as np
                import torch

                return torch.from_numpy(np.asarray(processor.state.done)).to(input_ids.device)

        self.stopping = Stop()

    def __call__(self, input_ids, scores):
        import numpy as np
        import torch

        step = int(self.state.step)
        live = ~np.asarray(self.state.done)
        if step > 0:  # HF must have fed back what we chose
            fed, chosen = input_ids[:, -1].cpu().numpy(), np.asarray(self.state.tokens[:, step - 1])
            if not np.array_equal(fed[live], chosen[live]):
                raise RuntimeError("HF generate appended tokens other than the ones chosen")
        logits = scores.detach().float().cpu().numpy()
        self.state = self._step(self.state, logits, self.rows, trace=self.trace)
        token = np.asarray(self.state.tokens[:, step])
        token = torch.from_numpy(np.where(token >= 0, token, self.pad_id)).to(scores.device)
        forced = torch.full_like(scores, -float("inf"))
        forced[torch.arange(scores.shape[0], device=scores.device), token] = 0.0
        return forced

    def outputs(self) -> list[tuple[list[int], bool]]:
        import numpy as np

        tokens, stopped = np.asarray(self.state.tokens), np.asarray(self.state.stopped)
        return [([int(t) for t in row if t >= 0], bool(s)) for row, s in zip(tokens, stopped)]


_JITTED = {}


def _jitted(fn):
    import jax

    if fn not in _JITTED:
        _JITTED[fn] = jax.jit(fn, static_argnames=("trace",))
    return _JITTED[fn]


# ---- vLLM -------------------------------------------------------------------------------------
# vLLM cannot switch its logits mask mid-sequence, so a trace_answer request runs in two stages:
# (1) the trace: `<beginabstract>` appended to the prompt (it is forced anyway), then
#     allowed_token_ids = V_abs + {end}, stop_token_ids = [end], min_tokens = m_min (vLLM
#     suppresses stop tokens before that) and max_tokens = m_max: a trace that reaches m_max gets
#     its forced `<endabstract>` appended by us;
# (2) the answer: prompt + whole trace, unconstrained, with the answer's temperature.
# The same rule as constraints.py, in the terms vLLM offers.

def vllm_trace_params(request: SamplingRequest, abstract_ids: Sequence[int], end_id: int, limit: int) -> dict:
    """SamplingParams kwargs of stage 1 (the trace); `limit` is the request's token budget."""
    max_tokens = max(1, min(request.m_max, limit - 1))  # -1: the forced <beginabstract>
    return {
        "n": 1,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k or -1,
        "seed": request.seed,
        "max_tokens": max_tokens,
        "min_tokens": min(request.m_min, max_tokens),
        "allowed_token_ids": [*abstract_ids, end_id],
        "stop_token_ids": [end_id],
        "skip_special_tokens": False,
    }


def vllm_answer_params(request: SamplingRequest, limit: int, eos_id: int | None) -> dict:
    """SamplingParams kwargs of the (stage-2 or verbal) answer; `limit`: tokens left."""
    stops = stop_ids(request, eos_id)
    return {
        "n": 1,
        "temperature": request.answer_temp,
        "top_p": request.top_p,
        "top_k": request.top_k or -1,
        "seed": request.seed,
        "max_tokens": limit,
        "stop_token_ids": stops,
        "ignore_eos": eos_id is not None and eos_id not in stops,  # only the request's stop tokens stop it
        "skip_special_tokens": False,
    }


# generate_fn(prompt id lists, SamplingParams kwargs) -> (token ids, finish_reason, stop_reason) each
GenerateFn = Callable[[list[list[int]], list[dict]], list[tuple[list[int], str, object]]]


def _with_stop_token(tokens: list[int], finish: str, stop_reason, stops: Sequence[int], eos_id) -> list[int]:
    """vLLM versions differ on whether token_ids hold the stop token; make sure they do."""
    tokens = list(tokens)
    if finish == "stop" and (not tokens or tokens[-1] not in stops):
        tokens.append(stop_reason if isinstance(stop_reason, int) else eos_id)
    return tokens


def run_two_stage(generate_fn: GenerateFn, requests, prompts, limits, vocab, eos_id) -> list[tuple[list[int], bool]]:
    """(generated ids, stopped) per request, through vLLM-style calls (see the comment above)."""
    outputs: list = [None] * len(requests)
    answer_jobs = [(i, [], limits[i]) for i, r in enumerate(requests) if not r.has_trace]
    traced = [i for i, r in enumerate(requests) if r.has_trace]
    if traced:
        stage1 = generate_fn(
            [[*prompts[i], vocab.begin_id] for i in traced],
            [vllm_trace_params(requests[i], vocab.abstract_ids, vocab.end_id, limits[i]) for i in traced])
        for i, (tokens, finish, _) in zip(traced, stage1):
            request, budget = requests[i], limits[i] - 1
            body = list(tokens)
            closed = bool(body) and body[-1] == vocab.end_id
            if not closed and finish == "stop":  # the stop token missing from token_ids
                body, closed = [*body, vocab.end_id], True
            if not closed and len(body) == request.m_max and budget > request.m_max:
                body, closed = [*body, vocab.end_id], True  # forced at m_max
            generated = [vocab.begin_id, *body]
            if not closed or request.mode == "trace":
                outputs[i] = (generated, closed)
            elif len(generated) >= limits[i]:
                outputs[i] = (generated, False)
            else:
                answer_jobs.append((i, generated, limits[i] - len(generated)))
    if answer_jobs:
        stage2 = generate_fn([[*prompts[i], *prefix] for i, prefix, _ in answer_jobs],
                             [vllm_answer_params(requests[i], left, eos_id) for i, _, left in answer_jobs])
        for (i, prefix, _), (tokens, finish, reason) in zip(answer_jobs, stage2):
            stops = stop_ids(requests[i], eos_id)
            outputs[i] = ([*prefix, *_with_stop_token(tokens, finish, reason, stops, eos_id)], finish == "stop")
    return outputs


@dataclasses.dataclass
class VllmOptions:
    """How to start vLLM. `python`: the interpreter of the environment that has vllm ("": this one)."""

    python: str = ""
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1  # independent vLLM processes, each on its own group of GPUs
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None
    dtype: str = "auto"
    enforce_eager: bool = False
    max_batch: int = 256  # max_num_seqs
    timeout_s: float | None = None

    def llm_kwargs(self) -> dict:
        kwargs = {"tensor_parallel_size": self.tensor_parallel_size,
                  "gpu_memory_utilization": self.gpu_memory_utilization, "dtype": self.dtype,
                  "enforce_eager": self.enforce_eager, "max_num_seqs": self.max_batch}
        if self.max_model_len:
            kwargs["max_model_len"] = self.max_model_len
        return kwargs

    def cli_args(self) -> list[str]:
        args = ["--tensor-parallel-size", str(self.tensor_parallel_size),
                "--gpu-memory-utilization", str(self.gpu_memory_utilization),
                "--dtype", self.dtype, "--max-batch", str(self.max_batch)]
        if self.max_model_len:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.enforce_eager:
            args.append("--enforce-eager")
        return args


def vllm_generate_fn(llm) -> GenerateFn:
    from vllm import SamplingParams

    def generate(prompts, params):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [SamplingParams(**k) for k in params],
                            use_tqdm=False)
        return [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in outs]

    return generate


def run_vllm(requests, model_dir, options: VllmOptions = VllmOptions()) -> list[SamplingResult]:
    """In the vLLM environment's process: load the model once, run every request."""
    from transformers import AutoTokenizer
    from vllm import LLM

    model_dir = check_model_dir(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    vocab = load_abstract_vocab(tokenizer)
    config = json.loads((model_dir / "config.json").read_text())
    context = options.max_model_len or model_context(model_dir)
    prep = prepare(requests, tokenizer, config["vocab_size"], context, vocab)
    eos = end_of_turn_id(tokenizer)
    valid = [requests[i] for i in prep.index]
    if valid:
        llm = LLM(model=str(model_dir), **options.llm_kwargs())
        outputs = run_two_stage(vllm_generate_fn(llm), valid, prep.prompts, prep.limits, vocab, eos)
        for i, request, (tokens, stopped) in zip(prep.index, valid, outputs):
            prep.results[i] = make_result(request, tokens, "stop" if stopped else "length", tokenizer,
                                          vocab and vocab.begin_id, vocab and vocab.end_id, eos)
    return prep.results


# ---- out of process ---------------------------------------------------------------------------

class SubprocessEngine:
    """Runs `python -m abscot_jax.sampling.engines --engine NAME` in another process (another
    environment's Python, say), through JSONL files. With `shards` > 1 the requests are split
    round-robin over that many processes started together, `shard_env[i]` added to shard i's
    environment (e.g. CUDA_VISIBLE_DEVICES). A process that fails fails its requests only, each
    with the process's last lines of output."""

    def __init__(self, engine: str, model_dir, *, python: str = sys.executable, args: Sequence[str] = (),
                 shards: int = 1, shard_env: Sequence[dict] | None = None, timeout_s: float | None = None):
        self.engine, self.model_dir, self.python, self.args = engine, str(model_dir), python, list(args)
        self.shards, self.shard_env, self.timeout_s = shards, shard_env or [{}] * shards, timeout_s

    def run_requests(self, requests: Sequence[SamplingRequest]) -> list[SamplingResult]:
        check_accelerators_free()
        # Lines read_requests could not parse are already results; the rest go to the processes.
        results: list[SamplingResult | None] = [r if isinstance(r, SamplingResult) else None for r in requests]
        todo = [i for i, r in enumerate(results) if r is None]
        shards = [(s, todo[s::self.shards]) for s in range(self.shards) if todo[s::self.shards]]
        # The processes report nothing until they end: the progress line counts finished
        # processes' requests, and shows the time so far while they run.
        bar = Progress(f"{current_label()} ({self.engine}, {len(shards)} process{'es' * (len(shards) > 1)})",
                       len(todo), unit="requests", every=0)
        with tempfile.TemporaryDirectory(prefix="abscot_sampling_") as tmp:
            started = [self._start(s, [requests[i] for i in index], Path(tmp)) for s, index in shards]
            for (_, index), run in zip(shards, started):  # all shards run at once; collect in turn
                for i, result in zip(index, self._collect(*run, [requests[i].id for i in index], bar.update)):
                    results[i] = result
                bar.update(len(index))
        bar.close(errors=sum(results[i].finish_reason == "error" for i in todo) or None)
        return results

    def _start(self, shard: int, requests, tmp: Path):
        req_path, out_path, log_path = (tmp / f"{name}{shard}"
                                        for name in ("requests.jsonl", "results.jsonl", "log.txt"))
        write_requests(req_path, requests)
        env = {**os.environ, **self.shard_env[shard],
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        cmd = [self.python, "-m", "abscot_jax.sampling.engines", "--engine", self.engine, "--model", self.model_dir,
               "--requests", str(req_path), "--out", str(out_path), *self.args]
        log = open(log_path, "w")
        try:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        except OSError as e:  # e.g. the configured Python does not exist
            log.write(f"cannot start {self.python}: {e}")
            proc = None
        return proc, out_path, log_path, log

    def _collect(self, proc, out_path: Path, log_path: Path, log, ids: list[str], tick) -> list[SamplingResult]:
        """The results of one process, once it ends; `tick(0)` every second while it runs."""
        code = "an error"
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        while proc is not None:
            try:
                code = proc.wait(timeout=1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() >= deadline:
                    proc.kill()
                    proc.wait()
                    code = f"killed after {self.timeout_s} s"
                    break
                tick(0)
        log.close()
        got = {r.id: r for r in read_results(out_path)} if out_path.exists() else {}
        tail = " | ".join(log_path.read_text().strip().splitlines()[-5:])
        message = f"{self.engine} process exited with {code} without a result: {tail}"
        return [got.get(i) or SamplingResult.failure(i, message) for i in ids]


def check_accelerators_free() -> None:
    """An out-of-process engine needs the accelerators: refuse to start one while JAX in this
    process has a backend on them (XLA holds most of each device's memory until the process ends)."""
    if "jax" not in sys.modules:
        return
    from jax._src import xla_bridge

    held = sorted(set(xla_bridge.backends()) - {"cpu"}) if xla_bridge.backends_are_initialized() else []
    if held:
        raise RuntimeError(f"this process holds JAX {', '.join(held)} devices; an out-of-process engine needs them "
                           "free: run it from a process that computes with JAX on the CPU only (JAX_PLATFORMS=cpu)")


def visible_gpus() -> list[str] | None:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (None when it is unset)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return None if visible is None else [g.strip() for g in visible.split(",") if g.strip()]


def vllm_engine(model_dir, options: VllmOptions = VllmOptions(), gpus: Sequence[int | str] | None = None
                ) -> SubprocessEngine:
    """vLLM in the Python of `options.python`: data_parallel_size processes of tensor_parallel_size
    GPUs each, GPU groups taken in order from `gpus` (default: this process's own visible GPUs, so
    an engine started under CUDA_VISIBLE_DEVICES=4,5 uses 4 and 5; else 0, 1, ...)."""
    dp, tp = options.data_parallel_size, options.tensor_parallel_size
    gpus = list(gpus if gpus is not None else visible_gpus() or range(dp * tp))
    if len(gpus) < dp * tp:
        raise ValueError(f"data_parallel_size {dp} x tensor_parallel_size {tp} needs {dp * tp} GPUs; got {gpus}")
    shard_env = [{"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus[s * tp:(s + 1) * tp]))} for s in range(dp)]
    return SubprocessEngine("vllm", model_dir, python=options.python or sys.executable, args=options.cli_args(),
                            shards=dp, shard_env=shard_env, timeout_s=options.timeout_s)


# ---- command line -----------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m abscot_jax.sampling.engines", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True, choices=["hf", "vllm", "jax"])
    p.add_argument("--model", required=True, help="exported HF model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--requests", required=True, help="JSONL file of SamplingRequest objects")
    p.add_argument("--out", required=True, help="JSONL file to write the results to (one per request, in order)")
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--context", type=int, default=None, help="longest prompt + generation (default: the model's)")
    p.add_argument("--dtype", default=None, help="hf/jax: float32 (default) or bfloat16; vllm: auto")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    a = p.parse_args(argv)
    try:
        check_model_dir(a.model)
        if not Path(a.requests).is_file():
            raise FileNotFoundError(f"{a.requests} not found; pass the requests JSONL file")
        requests = read_requests(a.requests)
        if a.engine == "vllm":
            options = VllmOptions(tensor_parallel_size=a.tensor_parallel_size,
                                  gpu_memory_utilization=a.gpu_memory_utilization,
                                  max_model_len=a.max_model_len or a.context, dtype=a.dtype or "auto",
                                  enforce_eager=a.enforce_eager, max_batch=a.max_batch or 256)
            results = run_vllm(requests, a.model, options)
        else:
            kwargs = {"max_batch": a.max_batch or 32, "context": a.context}
            if a.engine == "hf":
                engine = HFEngine(a.model, dtype=a.dtype or "float32", **kwargs)
            else:
                engine = JaxEngine.from_dir(a.model, param_dtype=a.dtype or "float32", **kwargs)
            results = engine.run_requests(requests)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_results(a.out, results)
    failed = sum(r.finish_reason == "error" for r in results)
    print(f"{len(results)} results ({failed} errors) -> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
