"""vLLM behind the engines' interface: `run_vllm` runs in the process of a vLLM environment;
`vllm_engine(...)` starts it there (a SubprocessEngine with the Python named in VllmOptions)."""
from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence

from abscot_jax.sampling.engines.base import (
    check_model_dir, end_of_turn_id, load_abstract_vocab, model_context, prepare,
)
from abscot_jax.sampling.engines.process import SubprocessEngine, visible_gpus
from abscot_jax.sampling.protocol import SamplingRequest, SamplingResult, make_result, stop_ids

# vLLM cannot switch its logits mask mid-sequence, so a trace_answer request runs in two stages:
# (1) the trace: `<beginabstract>` appended to the prompt (it is forced anyway), then
#     allowed_token_ids = V_abs + {end}, stop_token_ids = [end], min_tokens = m_min (vLLM
#     suppresses stop tokens before that) and max_tokens = m_max: a trace that reaches m_max gets
#     its forced `<endabstract>` appended by us;
# (2) the answer: prompt + whole trace, unconstrained, with the answer's temperature.
# The same rule as constraints.py, in the terms vLLM offers.

def _params(request: SamplingRequest, temperature: float, max_tokens: int, stops: Sequence[int]) -> dict:
    """The SamplingParams kwargs both stages share."""
    return {"n": 1, "temperature": temperature, "top_p": request.top_p, "top_k": request.top_k or -1,
            "seed": request.seed, "max_tokens": max_tokens, "stop_token_ids": list(stops),
            "skip_special_tokens": False}


def vllm_trace_params(request: SamplingRequest, abstract_ids: Sequence[int], end_id: int, limit: int) -> dict:
    """SamplingParams kwargs of stage 1 (the trace); `limit` is the request's token budget."""
    max_tokens = max(1, min(request.m_max, limit - 1))  # -1: the forced <beginabstract>
    return {**_params(request, request.temperature, max_tokens, [end_id]),
            "min_tokens": min(request.m_min, max_tokens), "allowed_token_ids": [*abstract_ids, end_id]}


def vllm_answer_params(request: SamplingRequest, limit: int, eos_id: int | None) -> dict:
    """SamplingParams kwargs of the (stage-2 or verbal) answer; `limit`: tokens left."""
    stops = stop_ids(request, eos_id)
    # only the request's stop tokens stop it
    return {**_params(request, request.answer_temp, limit, stops),
            "ignore_eos": eos_id is not None and eos_id not in stops}


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
