"""Where a phase's traces z come from, chosen by name.

Each source is a module here with one entry point, `make_traces(ctx, examples, *, t, phase, out)`:
it writes {example id: trace token ids} to `out` and returns what the stage records.
  random     the paper's round-1 rule: random abstract tokens per CoT step
  cot_codes  round 1: k-means codes of the CoT steps' hidden states under the starting model
  sampled    the model's own constrained samples: Phase A of round t >= 2 on (x, c) from round
             t-1's final model; Phase B on x from this round's Phase A model
  best_of_k  k samples as `sampled`, the one that best predicts the answer kept (docs/variants.md)
"""
from __future__ import annotations

import importlib

# name: module
TRACE_SOURCES = {"random": "random_rule", "cot_codes": "cot_codes", "sampled": "sampled", "best_of_k": "best_of_k"}
ROUND1_SOURCES = ("random", "cot_codes")  # those that need no trained model
SELECTIONS = {"none": "sampled", "best_of_k": "best_of_k"}  # variants.trace_selection: its source


def trace_source(variants, t: int, phase: str) -> str:
    """The source of round t's Phase `phase` ("a" or "b") traces under the configured variants."""
    if phase == "a" and t == 1:
        return variants.round1_traces
    selected = phase == "a" or variants.select_phase_b
    return SELECTIONS[variants.trace_selection] if selected else "sampled"


def uses_jax_devices(source: str, engine: str) -> bool:
    """Whether the source computes with JAX on the accelerators (else its process leaves them
    to an out-of-process engine): the JAX engine, and the sources that score or encode in JAX."""
    return source in ("cot_codes", "best_of_k") or (source == "sampled" and engine == "jax")


def make_traces(source: str, ctx, examples, *, t: int, phase: str, out) -> dict:
    module = importlib.import_module(f"{__name__}.{TRACE_SOURCES[source]}")
    return module.make_traces(ctx, examples, t=t, phase=phase, out=out)
