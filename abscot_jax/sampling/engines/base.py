"""What the engines share: the request checks (`prepare`), model-directory and tokenizer helpers,
and `LocalEngine`, the batching and results of the in-process engines (JAX, HF)."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from abscot_jax.progress import Progress, current_label
from abscot_jax.sampling.protocol import (
    RequestError, SamplingRequest, SamplingResult, make_result, new_token_limit, prompt_token_ids,
)

END_OF_TURN = "<|im_end|>"


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


class LocalEngine:
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
