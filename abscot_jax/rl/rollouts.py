"""Rollouts: the sampling requests of one step, and finished rollouts as packed training rows.

A rollout is trained as the sequence it was sampled as: `[x; <beginabstract> z <endabstract> y]`
(abstract mode; roles PROMPT | ABSTRACT | ANSWER, the Phase B layout, plain causal mask) or
`[x; c y]` (verbal mode; the generated tokens are ANSWER, the warm-up's layout). Every sampled token
is weighted, the stop token included; forced tokens are not (see grpo.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

from abscot_jax.data.roles import Role
from abscot_jax.data.sequences import SequenceExample, make_example
from abscot_jax.rl.grpo import FREE, TRACE_ONLY, TRACE_OR_END
from abscot_jax.sampling.protocol import SamplingRequest, SamplingResult
from abscot_jax.variants import packed_batches


def rollout_seed(seed: int, step: int, slot: int, prompt_id: str, k: int) -> int:
    """The sampling seed of rollout k of the prompt in slot `slot` of step `step` (from 0): the same
    in every run, so a resumed run samples the rollouts the interrupted one did."""
    digest = hashlib.sha256(f"{seed}/{step}/{slot}/{prompt_id}/{k}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def rollout_requests(prompts: Sequence, step: int, cfg) -> list[SamplingRequest]:
    """K requests per prompt (prompt-major), at rl.temperature for trace and answer alike; the
    trace bounded as in the evaluation (eval.m_min, data.m_max)."""
    rl = cfg.rl
    mode = "trace_answer" if rl.mode == "abstract" else "verbal"
    return [SamplingRequest(id=f"{step}/{slot}/{k}", prompt_ids=list(prompt.prompt_ids), mode=mode,
                            max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                            seed=rollout_seed(cfg.train.seed, step, slot, prompt.id, k),
                            m_min=cfg.eval.m_min, m_max=cfg.data.m_max)
            for slot, prompt in enumerate(prompts) for k in range(rl.rollouts_per_prompt)]


@dataclasses.dataclass
class Rollout:
    example: SequenceExample  # tokens, roles, targets; loss_mask = the weight of each sampled token
    allowed: np.ndarray  # int32 [L]: what the policy could emit at each position (FREE / TRACE_*)
    advantage: float


def rollout_example(prompt_ids: Sequence[int], result: SamplingResult, *, abstract: bool, m_min: int, m_max: int,
                    example_id: str) -> tuple[SequenceExample, np.ndarray]:
    """The training sequence of one finished rollout and what was allowed at each of its positions."""
    prompt, generated = list(prompt_ids), list(result.token_ids)
    if not abstract:
        example = make_example([(prompt, Role.PROMPT), (generated, Role.ANSWER)], example_id=example_id, phase="rl")
        return example, np.full(len(example), FREE, np.int32)
    # In the trace only abstract tokens and `<endabstract>` can follow: a token after them closed it.
    closed = len(generated) > 1 + result.trace_length
    trace_end = 1 + result.trace_length + closed
    example = make_example([(prompt, Role.PROMPT), (generated[:trace_end], Role.ABSTRACT),
                            (generated[trace_end:], Role.ANSWER)], example_id=example_id, phase="rl")
    allowed = np.full(len(example), FREE, np.int32)
    before_first = len(prompt) - 1  # predicts `<beginabstract>`: forced
    example.loss_mask[before_first] = 0.0
    for j in range(1, trace_end):  # the position predicting generated[j], with j - 1 trace tokens before it
        position, trace_so_far = before_first + j, j - 1
        if trace_so_far >= m_max:  # `<endabstract>` forced
            example.loss_mask[position] = 0.0
        else:
            allowed[position] = TRACE_OR_END if trace_so_far >= m_min else TRACE_ONLY
    return example, allowed


def packed_rollouts(rollouts: Sequence[Rollout], seq_len: int, rows: int) -> list[dict[str, np.ndarray]]:
    """Fixed-shape [rows, seq_len] batches of the rollouts packed first-fit decreasing, with the
    per-position `weights`, `allowed` and `advantages` the loss reads."""
    batches = []
    for batch, placements in packed_batches([r.example for r in rollouts], seq_len, rows):
        allowed = np.zeros_like(batch["tokens"])
        advantages = np.zeros(batch["tokens"].shape, np.float32)
        for i, row, start in placements:
            span = slice(start, start + len(rollouts[i].example))
            allowed[row, span] = rollouts[i].allowed
            advantages[row, span] = rollouts[i].advantage
        batch["weights"] = batch.pop("loss_mask")
        batches.append({**batch, "allowed": allowed, "advantages": advantages})
    return batches
