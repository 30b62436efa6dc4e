"""Sampling requests and results, and their JSONL files: the one protocol every engine speaks.

The JAX sampler, the HF engine and the vLLM engine (in another process, another Python) all take a
list of `SamplingRequest` and return one `SamplingResult` per request, in order. Out-of-process
engines exchange them as JSONL files (one JSON object a line, the dataclass fields). This module
imports neither jax nor torch, so the vLLM environment can load it.

Modes:
  verbal        answer only, no trace (the verbal-CoT baseline).
  trace         `<beginabstract>` forced first, a constrained trace, stop after `<endabstract>`
                (Phase A rounds >= 2: the prompt is x + CoT; Phase B: the prompt is x).
  trace_answer  the same trace, then the answer decoded freely until end of turn (evaluation).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from abscot_jax.files import replace_jsonl

MODES = ("verbal", "trace", "trace_answer")
TRACE_MODES = ("trace", "trace_answer")
FINISH_REASONS = ("stop", "length", "error")
MAX_SEED = 2**32 - 1


class RequestError(ValueError):
    """A request that cannot be run; the message says what is wrong. It fails that request only."""


@dataclasses.dataclass(frozen=True)
class SamplingRequest:
    id: str
    prompt: str | None = None  # text, tokenized as is (render the chat template first) ...
    prompt_ids: list[int] | None = None  # ... or token ids; exactly one of the two
    mode: str = "verbal"
    max_new_tokens: int = 512  # all generated tokens: delimiters, trace, answer and stop token
    temperature: float = 0.0  # 0 = greedy; used before and inside the trace (and for the answer by default)
    answer_temperature: float | None = None  # the answer's temperature, when it differs (eval: trace 0.7, answer 0)
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0
    stop_token_ids: list[int] | None = None  # None: the tokenizer's end of turn (eos)
    m_min: int = 1
    m_max: int = 128

    @property
    def has_trace(self) -> bool:
        return self.mode in TRACE_MODES

    @property
    def answer_temp(self) -> float:
        return self.temperature if self.answer_temperature is None else self.answer_temperature

    def check(self) -> None:
        """Raise RequestError for settings no engine can run."""
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode {self.mode!r}; expected one of {list(MODES)}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens}; must be >= 1")
        for name in ("temperature", "answer_temperature"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                problems.append(f"{name}={value}; must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p}; must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k}; must be >= 0 (0 = off)")
        if not 0 <= self.seed <= MAX_SEED:
            problems.append(f"seed={self.seed}; must be in [0, 2**32)")
        if self.has_trace and not 0 <= self.m_min <= self.m_max:
            problems.append(f"m_min={self.m_min}, m_max={self.m_max}; need 0 <= m_min <= m_max")
        if (self.prompt is None) == (self.prompt_ids is None):
            problems.append("give exactly one of prompt (text) and prompt_ids")
        if problems:
            raise RequestError("; ".join(problems))

    def budget(self) -> int:
        """Most tokens this request can generate: a trace-only request ends after m_max + 2."""
        if self.mode == "trace":
            return min(self.max_new_tokens, self.m_max + 2)
        return self.max_new_tokens

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingRequest":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise RequestError(f"unknown field(s) {unknown}; valid fields: {sorted(fields)}")
        if "id" not in data:
            raise RequestError("missing field 'id'")
        try:
            return cls(**{**data, "id": str(data["id"])})
        except TypeError as e:
            raise RequestError(str(e)) from None


@dataclasses.dataclass
class SamplingResult:
    id: str
    token_ids: list[int] = dataclasses.field(default_factory=list)  # everything generated, stop token included
    text: str = ""  # token_ids decoded, special tokens kept
    trace_ids: list[int] = dataclasses.field(default_factory=list)  # the abstract tokens between the delimiters
    trace_length: int = 0
    answer_ids: list[int] = dataclasses.field(default_factory=list)  # after the trace (or all), stop token excluded
    answer_text: str = ""  # answer_ids decoded, special tokens skipped
    answer_length: int = 0
    finish_reason: str = "error"  # stop | length | error
    error: str | None = None

    @classmethod
    def failure(cls, request_id: str, message: str) -> "SamplingResult":
        return cls(id=request_id, finish_reason="error", error=message)

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingResult":
        return cls(**data)


# ---- from prompts to results, the same for every engine ----------------------------------------

def prompt_token_ids(request: SamplingRequest, tokenizer, vocab_size: int, context: int,
                     has_abstract_vocab: bool) -> list[int]:
    """The request's prompt ids, after every check that needs the model; RequestError otherwise."""
    request.check()
    if request.prompt_ids is not None:
        ids = list(request.prompt_ids)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise RequestError("prompt_ids must be a list of integers")
    else:
        ids = tokenizer.encode(request.prompt, add_special_tokens=False)
    if not ids:
        raise RequestError("empty prompt")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    bad = [t for t in request.stop_token_ids or () if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"stop token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if len(ids) >= context:
        raise RequestError(f"prompt has {len(ids)} tokens but the context is {context}: no room to generate; "
                           "shorten the prompt")
    if request.has_trace and not has_abstract_vocab:
        raise RequestError(f"mode {request.mode!r} needs the abstract tokens, but this tokenizer has none")
    return ids


def stop_ids(request: SamplingRequest, eos_id: int | None) -> list[int]:
    if request.stop_token_ids is not None:
        return list(request.stop_token_ids)
    return [] if eos_id is None else [eos_id]


def new_token_limit(request: SamplingRequest, prompt_len: int, context: int) -> int:
    """Tokens this request may generate: its budget, cut to what the context leaves."""
    return min(request.budget(), context - prompt_len)


def make_result(request: SamplingRequest, token_ids: Sequence[int], finish_reason: str, tokenizer,
                begin_id: int | None, end_id: int | None, eos_id: int | None) -> SamplingResult:
    """Split generated tokens into trace and answer and decode them."""
    token_ids = [int(t) for t in token_ids]
    trace: list[int] = []
    answer = token_ids
    if request.has_trace and token_ids and token_ids[0] == begin_id:
        body = token_ids[1:]
        if end_id in body:
            cut = body.index(end_id)
            trace, answer = body[:cut], body[cut + 1:]
        else:  # cut off by length inside the trace
            trace, answer = body, []
    if finish_reason == "stop" and answer and answer[-1] in stop_ids(request, eos_id):
        answer = answer[:-1]
    return SamplingResult(
        id=request.id,
        token_ids=token_ids,
        text=tokenizer.decode(token_ids, skip_special_tokens=False) if tokenizer is not None else "",
        trace_ids=trace,
        trace_length=len(trace),
        answer_ids=answer,
        answer_text=tokenizer.decode(answer, skip_special_tokens=True) if tokenizer is not None else "",
        answer_length=len(answer),
        finish_reason=finish_reason,
    )


# ---- JSONL files ------------------------------------------------------------------------------


def _read_jsonl(path: str | Path) -> list[tuple[int, dict | None, str | None]]:
    """(line number, object or None, parse error or None) per non-blank line."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                out.append((n, obj, None) if isinstance(obj, dict) else (n, None, "not a JSON object"))
            except json.JSONDecodeError as e:
                out.append((n, None, f"invalid JSON: {e}"))
    return out


def write_requests(path: str | Path, requests: Iterable[SamplingRequest]) -> None:
    replace_jsonl(path, (dataclasses.asdict(r) for r in requests))


def read_requests(path: str | Path) -> list[SamplingRequest | SamplingResult]:
    """The requests of a JSONL file, in order; a malformed line becomes an error result in its
    place (named by its id when it has one, else `line-N`), so the other requests still run."""
    out: list[SamplingRequest | SamplingResult] = []
    for n, obj, problem in _read_jsonl(path):
        request_id = str(obj["id"]) if obj and "id" in obj else f"line-{n}"
        if obj is not None:
            try:
                out.append(SamplingRequest.from_dict(obj))
                continue
            except RequestError as e:
                problem = str(e)
        out.append(SamplingResult.failure(request_id, f"{path}:{n}: {problem}"))
    return out


def write_results(path: str | Path, results: Iterable[SamplingResult]) -> None:
    replace_jsonl(path, (dataclasses.asdict(r) for r in results))


def read_results(path: str | Path) -> list[SamplingResult]:
    results = []
    for n, obj, problem in _read_jsonl(path):
        if obj is None:
            raise ValueError(f"{path}:{n}: {problem}")
        results.append(SamplingResult.from_dict(obj))
    return results


def in_length_batches(prompts: Sequence, requests: Sequence, limits: Sequence[int], max_batch: int,
                      generate_batch) -> list:
    """`generate_batch(prompts, requests, limits)` over batches of at most `max_batch` prompts of
    similar lengths (sorted by length, so a batch pads little); the results in the prompts' order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [None] * len(prompts)
    for start in range(0, len(order), max_batch):
        chunk = order[start:start + max_batch]
        results = generate_batch([prompts[i] for i in chunk], [requests[i] for i in chunk], [limits[i] for i in chunk])
        for i, result in zip(chunk, results):
            out[i] = result
    return out
