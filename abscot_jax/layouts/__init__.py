"""Bottleneck layouts: how a Phase A example and its trace become training sequences, chosen by
name (variants.bottleneck). Each layout is a module here with one entry point,
`phase_a(builder, example, trace) -> list[SequenceExample]` ([] when the example does not fit):
  paper     one sequence [x; c; z; y], the paper's mask (the answer attends to z, not to c)
  two_pass  two packed sequences, [x; c; z] with loss on z and [x; z; y] with loss on y
Phase B has one layout, [x; z; y] (SequenceBuilder.phase_b).
"""
from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

LAYOUTS = ("paper", "two_pass")  # each the name of its module here


def build_phase_examples(builder, examples, phase: str, traces: Mapping[str, Sequence[int]], variants,
                         candidates_path: Path | None = None) -> list:
    """The training examples of one phase ("A" or "B"): Phase A in the configured layout. With
    `variants.weight_by_score` and a candidates file (written by best-of-k selection), every
    candidate trace is trained, its loss mask scaled by its weight; else each example's trace."""
    from abscot_jax.variants import weighted_candidates  # the config imports this module: keep it light

    if phase == "A":
        layout = importlib.import_module(f"{__name__}.{variants.bottleneck}").phase_a
    else:
        def layout(builder, example, trace):
            built = builder.phase_b(example, trace)
            return [] if built is None else [built]
    weighted = variants.weight_by_score and candidates_path is not None and Path(candidates_path).exists()
    options = (weighted_candidates(json.loads(Path(candidates_path).read_text())) if weighted
               else {e.id: [(traces.get(e.id), 1.0)] for e in examples})
    out = []
    for example in examples:
        for trace, weight in options.get(example.id, ()):
            built = layout(builder, example, trace)
            if weight != 1.0:
                for ex in built:
                    ex.loss_mask *= np.float32(weight)
            out.extend(built)
    return out
