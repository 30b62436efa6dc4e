"""RL prompts with gold answers, and the order they are drawn in.

Source: `rl.data` ("" = `data.train`), read by the project's loaders: `rl.data_format=dolci`
(Dolci-Think rows; the gold answer is the last `\\boxed{}` of the final assistant turn's answer)
or `math` (MATH-500-style rows: `problem`, `answer`). Skipped and counted, never fatal: the rows
the loader rejects (malformed), rows without a gold answer, prompts whose question is in the
evaluation set (`data.eval`: RL never trains on an evaluation problem), prompts the reward cannot
score (e.g. not a toy problem for `toy`) and prompts longer than `rl.max_prompt_tokens` or leaving
no room for `rl.max_new_tokens` within `train.seq_len`.
"""
from __future__ import annotations

import collections
import dataclasses

import numpy as np

from abscot_jax.data.dolci import format_counts, load_dolci
from abscot_jax.data.math500 import load_math500
from abscot_jax.data.sequences import encode_prompt
from abscot_jax.errors import RunError
from abscot_jax.eval.grading import last_boxed
from abscot_jax.progress import say


@dataclasses.dataclass(frozen=True)
class RLPrompt:
    id: str
    question: str  # the last user message: what the judge and the toy check read
    gold: str
    prompt_ids: tuple[int, ...]  # x, rendered as in training (chat template, thinking off, data.system)


def _question_key(text: str) -> str:
    return " ".join(text.split())


def _rows(cfg) -> tuple[list[tuple[str, tuple[dict, ...], str | None]], collections.Counter]:
    """(id, prompt messages, gold answer or None) per row the loader accepts, and the loader's skip counts."""
    source = cfg.rl.data or cfg.data.train
    if cfg.rl.data_format == "dolci":
        examples, skipped = load_dolci(source, limit=cfg.data.max_rows or None, verbose=False)
        return [(e.id, e.prompt_messages, last_boxed(e.answer)) for e in examples], skipped
    problems, report = load_math500(source, split="train", limit=cfg.data.max_rows or None)
    return ([(p.unique_id, ({"role": "user", "content": p.problem},), p.answer) for p in problems],
            collections.Counter(report.skipped))


def load_rl_prompts(cfg, tokenizer, reward) -> tuple[list[RLPrompt], collections.Counter]:
    """The RL prompts of the run's config and the skip counts (printed as one line)."""
    rows, skipped = _rows(cfg)
    held_out = {_question_key(p.problem) for p in load_math500(cfg.data.eval)[0]}
    system = cfg.build_config().system
    prompts = []
    for row_id, messages, gold in rows:
        question = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        if gold is None or not gold.strip():
            skipped["no_gold_answer"] += 1
            continue
        if _question_key(question) in held_out:
            skipped["in_eval_set"] += 1
            continue
        prompt = RLPrompt(row_id, question, gold.strip(), ())
        reason = reward.skip_reason(prompt)
        if reason is not None:
            skipped[reason] += 1
            continue
        ids = encode_prompt(tokenizer, messages, system)
        if len(ids) > cfg.rl_prompt_limit():
            skipped["too_long"] += 1
            continue
        prompts.append(dataclasses.replace(prompt, prompt_ids=tuple(ids)))
    say(format_counts("rl prompts", len(prompts), skipped))
    if len(prompts) < cfg.rl.prompts_per_step:
        raise RunError(f"{len(prompts)} usable RL prompts ({format_counts('rl prompts', len(prompts), skipped)}) "
                       f"but rl.prompts_per_step={cfg.rl.prompts_per_step}; add data or lower rl.prompts_per_step "
                       "(or raise rl.max_prompt_tokens, or train.seq_len above prompt + rl.max_new_tokens)")
    return prompts, skipped


class PromptStream:
    """Prompt indices in a seeded order, epoch after epoch (each epoch its own permutation). Its
    state is the number of prompts taken: a checkpoint holds the exact data position."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.taken = size, seed, 0

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def take(self, n: int) -> list[int]:
        out, epoch, order = [], None, None
        for _ in range(n):
            position_epoch, i = divmod(self.taken, self.size)
            if position_epoch != epoch:
                epoch, order = position_epoch, self.order(position_epoch)
            out.append(int(order[i]))
            self.taken += 1
        return out

    def get_state(self) -> dict:
        return {"prompts_taken": self.taken}

    def set_state(self, state: dict) -> None:
        self.taken = int(state["prompts_taken"])
