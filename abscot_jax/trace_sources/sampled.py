"""Traces sampled by the model itself, constrained to the abstract vocabulary: Phase A (rounds
>= 2) from the previous round's final model given (x, c), Phase B from this round's Phase A model
given x. Failed requests are counted and their examples left out; more than
eval.max_error_fraction of them, or no trace at all, fails the stage."""
from __future__ import annotations

from pathlib import Path

from abscot_jax.errors import RunError
from abscot_jax.rounds import phase_start
from abscot_jax.sampling.protocol import SamplingRequest
from abscot_jax.stages.context import write_json_atomic


def source_model(ctx, t: int, phase: str) -> Path:
    """The model the phase's traces are sampled from: the one the phase starts from."""
    return ctx.dir / phase_start(ctx.cfg, t, phase)


def trace_requests(ctx, builder, examples, *, with_cot: bool, temperature: float | None = None) -> list:
    """One constrained trace request per example that fits seq_len (the builder counts the others),
    at `temperature` (default sampler.trace_temperature)."""
    s, m_max = ctx.cfg.sampler, ctx.cfg.data.m_max
    requests = []
    for i, example in enumerate(examples):
        prompt = builder.condition_ids(example) if with_cot else builder.prompt_ids(example)
        if prompt is None:
            continue
        prompt = [int(t) for t in prompt]
        if with_cot:
            prompt = prompt[:-1]  # condition_ids ends with <beginabstract>, which the sampler forces itself
        requests.append(SamplingRequest(id=example.id, prompt_ids=prompt, mode="trace",
                                        temperature=s.trace_temperature if temperature is None else temperature,
                                        m_min=s.m_min, m_max=m_max, max_new_tokens=m_max + 2,
                                        seed=ctx.cfg.train.seed + i))
    return requests


def write_traces(ctx, traces: dict, requests: list, model_dir: Path, out: Path, **cost) -> dict:
    """Write the traces file; fail the stage when there is none."""
    if not traces:
        raise RunError(f"trace sampling from {model_dir} gave no complete trace for {len(requests)} requests "
                       f"(sampler.engine={ctx.cfg.sampler.engine}); not marked done: check the model and the "
                       "engine, then rerun")
    write_json_atomic(out, traces)
    lengths = [len(t) for t in traces.values()]
    return {"traces": len(traces), "failed": len(requests) - len(traces), "mean_length": sum(lengths) / len(lengths),
            **cost}


def make_traces(ctx, examples, *, t: int, phase: str, out) -> dict:
    return sample_traces(ctx, examples, source_model(ctx, t, phase), out, with_cot=phase == "a")


def sample_traces(ctx, examples, model_dir: Path, out: Path, *, with_cot: bool, temperature: float | None = None
                  ) -> dict:
    """One constrained sample per example from `model_dir`, given x (and c when `with_cot`)."""
    requests = trace_requests(ctx, ctx.builder(), examples, with_cot=with_cot, temperature=temperature)
    results = ctx.engine(model_dir).run_requests(requests)
    ctx.check_engine_errors(f"trace sampling from {model_dir}",
                            [r.error for r in results if r.finish_reason == "error"], len(requests))
    traces = {r.id: r.trace_ids for r in results if r.finish_reason == "stop" and r.trace_ids}
    return write_traces(ctx, traces, requests, model_dir, out)
