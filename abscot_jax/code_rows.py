"""Code rows from the tokens they stand for (`variants.code_rows: step_tokens`).

Before the first phase that trains on CoT-code traces, each code in use gets as its embedding row
(and untied head column) the mean, over the CoT steps it encodes, of the mean row of the step's
tokens: the model first meets a code as a blend of the tokens it replaces, so what the warm-up
learned about reading and writing those tokens applies to the code from the start. Codes no step
uses, the separator and every other row keep their values. With several codes per step each of
the step's codes gets the step's mean.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from abscot_jax.variants import step_spans


def step_token_weights(builder, examples, traces: Mapping[str, Sequence[int]], per_step: int,
                       codes_per_step: int, vocab_size: int) -> dict[int, np.ndarray]:
    """Code id -> [vocab_size] weights whose dot product with the embedding table is the code's
    row: the mean over its steps of each step's token-frequency / step-length. A trace holds
    `per_step` tokens a step (its `codes_per_step` codes, then the separator if any); steps past a
    trace capped at m_max have no code."""
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for example in examples:
        trace = traces.get(example.id)
        if not trace:
            continue
        tokens, spans = step_spans(builder, example)
        for j, (a, b) in enumerate(spans[:len(trace) // per_step]):
            if b <= a:
                continue
            for code in trace[j * per_step:j * per_step + codes_per_step]:
                if code not in sums:
                    sums[code], counts[code] = np.zeros(vocab_size), 0
                np.add.at(sums[code], tokens[a:b], 1.0 / (b - a))  # no dense vector per step
                counts[code] += 1
    return {code: total / counts[code] for code, total in sums.items()}


def set_code_rows(model, weights: Mapping[int, np.ndarray]) -> None:
    """Set each code's embedding row (and untied head column) to its weights times the table, in
    one update each, keeping the tables' dtype and sharding."""
    if not weights:
        return
    ids = np.asarray(sorted(weights))
    embed = model.embed[...]
    mix = np.zeros((len(ids), embed.shape[0]))  # [codes, rows]: the table may have padding rows past the tokenizer
    for n, i in enumerate(ids):
        mix[n, :len(weights[i])] = weights[i]
    rows = jnp.asarray(mix, jnp.float32) @ embed.astype(jnp.float32)
    model.embed.set_value(jax.device_put(embed.at[ids].set(rows.astype(embed.dtype)), embed.sharding))
    if model.lm_head is not None:
        head = model.lm_head[...]  # [hidden, vocab]
        columns = head.astype(jnp.float32) @ jnp.asarray(mix.T, jnp.float32)
        model.lm_head.set_value(jax.device_put(head.at[:, ids].set(columns.astype(head.dtype)), head.sharding))
