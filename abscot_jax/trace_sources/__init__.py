"""Where a phase's traces z come from, chosen by name.

Each source is a module here with one entry point, `make_traces(ctx, examples, *, t, phase, out)`:
it writes {example id: trace token ids} to `out` and returns what the stage records.
  random     the paper's round-1 rule: random abstract tokens per CoT step
  cot_codes  k-means codes of the CoT steps' hidden states under the starting model: round 1's
             Phase A, or Phase B (the M-step on the CoT's own codes; the round's codebook if round 1
             fitted one)
  sampled    the model's own constrained samples: Phase A of round t >= 2 on (x, c) from round
             t-1's final model; Phase B on x from this round's Phase A model
  posterior  Phase B: z ~ p_A(z | x, c), the Phase A model with the CoT in context
  best_of_k  k samples as `sampled`, the one that best predicts the answer kept (docs/variants.md)
  pause      the pause-token baseline: one abstract token repeated, as long as the random rule's trace
"""
from __future__ import annotations

import importlib

# name: module
TRACE_SOURCES = {"random": "random_rule", "cot_codes": "cot_codes", "sampled": "sampled", "posterior": "posterior",
                 "best_of_k": "best_of_k", "pause": "pause"}
ROUND1_SOURCES = ("random", "cot_codes")  # those that need no trained model
PHASE_B_SOURCES = ("sampled", "cot_codes", "posterior")  # variants.phase_b_traces
SELECTIONS = {"none": "sampled", "best_of_k": "best_of_k"}  # variants.trace_selection: its source


def trace_source(variants, t: int, phase: str) -> str:
    """The source of round t's Phase `phase` ("a" or "b") traces under the configured variants."""
    if variants.trace_source == "pause":
        return "pause"
    if variants.curriculum == "stepwise":
        return "cot_codes"  # the curriculum's codes (its only phase is B)
    if phase == "a":
        return variants.round1_traces if t == 1 else SELECTIONS[variants.trace_selection]
    return SELECTIONS[variants.trace_selection] if variants.select_phase_b else variants.phase_b_traces


def uses_jax_devices(source: str, engine: str) -> bool:
    """Whether the source computes with JAX on the accelerators (else its process leaves them
    to an out-of-process engine): the JAX engine, and the sources that score or encode in JAX."""
    return source in ("cot_codes", "best_of_k") or (source in ("sampled", "posterior") and engine == "jax")


def make_traces(source: str, ctx, examples, *, t: int, phase: str, out) -> dict:
    module = importlib.import_module(f"{__name__}.{TRACE_SOURCES[source]}")
    return module.make_traces(ctx, examples, t=t, phase=phase, out=out)
