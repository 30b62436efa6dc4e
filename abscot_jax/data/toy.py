"""A synthetic task where the verbal CoT matters: running sums mod 10.

A problem lists n digits; the CoT writes the running sum mod 10 after each digit, one per line;
the answer is the last one, boxed. Without the CoT a small model must add n digits in one go
(near chance, 10%); with it each line is a one-step update. Files are written in the Dolci-Think
schema (training) and the MATH-500 schema (evaluation), so the demo runs the real loaders.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from abscot_jax.files import replace_jsonl


QUESTION_PREFIX = "Running sum mod 10 of: "


def running_sum_problem(rng: np.random.Generator, min_digits: int, max_digits: int) -> dict:
    digits = rng.integers(0, 10, size=int(rng.integers(min_digits, max_digits + 1)))
    sums = np.cumsum(digits) % 10
    return {
        "question": QUESTION_PREFIX + " ".join(map(str, digits)),
        "cot": "\n".join(map(str, sums)),
        "answer": str(sums[-1]),
    }


def partial_sums(question: str) -> list[int]:
    """The running sums mod 10 of a problem, from its question text (the CoT's lines, as ints)."""
    if not question.startswith(QUESTION_PREFIX):
        raise ValueError(f"not a running-sum question: {question[:60]!r}")
    return [int(s) for s in np.cumsum([int(d) for d in question[len(QUESTION_PREFIX):].split()]) % 10]


def write_toy_data(out_dir: str | Path, *, train_size: int, eval_size: int, min_digits: int = 12,
                   max_digits: int = 12, seed: int = 0) -> tuple[Path, Path]:
    """Write `train.jsonl` (Dolci schema) and `eval.jsonl` (MATH-500 schema); disjoint by seed stream."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train = [running_sum_problem(rng, min_digits, max_digits) for _ in range(train_size)]
    held_out = [running_sum_problem(rng, min_digits, max_digits) for _ in range(eval_size)]
    train_path, eval_path = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    replace_jsonl(train_path, (
        {"id": f"toy-{i}", "dataset_source": "toy_running_sum",
         "messages": [{"role": "user", "content": p["question"]},
                      {"role": "assistant", "content": f"<think>\n{p['cot']}\n</think>\n\n\\boxed{{{p['answer']}}}"}]}
        for i, p in enumerate(train)))
    replace_jsonl(eval_path, (
        {"problem": p["question"], "solution": p["cot"].replace("\n", ", ") + f". \\boxed{{{p['answer']}}}",
         "answer": p["answer"], "subject": "Running sums", "level": 1, "unique_id": f"toy-eval-{i}"}
        for i, p in enumerate(held_out)))
    return train_path, eval_path
