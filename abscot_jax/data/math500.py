"""MATH-500 loader (schema of ``HuggingFaceH4/MATH-500``).

A hub id and a local ``.jsonl``/``.json``/``.parquet`` file go through the same code path,
``datasets.load_dataset``, and the same row validation: rows without a usable problem or
answer are skipped and counted, never fatal.

A ``datasets`` quirk (5.x) to know about: when a JSON file mixes types in one column (say
one answer written as the number 5 among strings), the column is stored as JSON text, and
strings that happen to be valid JSON ("42", "[-2,7]") come back decoded as numbers or
lists. Such rows are then skipped as non-string; the report carries a warning naming the
column, and the fix is to write every answer as a JSON string.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from abscot_jax.progress import quiet_datasets

REQUIRED_FIELDS = ("problem", "answer")
_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class MathProblem:
    problem: str
    solution: str
    answer: str
    subject: str
    level: int | None
    unique_id: str


@dataclass
class LoadReport:
    source: str
    rows_read: int = 0
    loaded: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> rows
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: what was loaded, and what was skipped and why."""
        line = f"MATH-500 {self.source}: {self.loaded} problems from {self.rows_read} rows"
        n_skipped = sum(self.skipped.values())
        if n_skipped:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
            line += f", skipped {n_skipped} ({reasons})"
        for warning in self.warnings:
            line += f"; warning: {warning}"
        return line


def print_summary(report: LoadReport, file=None) -> None:
    print(report.summary(), file=file if file is not None else sys.stderr)


def _is_local(source: str) -> bool:
    return os.path.splitext(source)[1].lower() in _LOCAL_BUILDERS or os.path.exists(source)


def _parse_level(value: Any) -> int | None:
    # MATH-500 stores an int; the original MATH release writes "Level 3".
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(?:Level\s*)?(\d+)\s*", value)
        if m:
            return int(m.group(1))
    return None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _validate(row: dict, index: int) -> tuple[MathProblem | None, str | None]:
    """A problem, or None and the reason the row is skipped."""
    for name in REQUIRED_FIELDS:
        value = row.get(name)
        if value is None:
            return None, f"missing {name}"
        if not isinstance(value, str):
            return None, f"non-string {name}"
        if not value.strip():
            return None, f"empty {name}"
    unique_id = row.get("unique_id")
    if not isinstance(unique_id, str) or not unique_id:
        unique_id = f"row-{index + 1}"  # local files may lack ids; results are keyed by them (rows count from 1)
    problem = MathProblem(
        problem=row["problem"],
        solution=_text(row.get("solution")),
        answer=row["answer"],
        subject=_text(row.get("subject")),
        level=_parse_level(row.get("level")),
        unique_id=unique_id,
    )
    return problem, None


def _load_rows(source: str, split: str, cache_dir: str | None):
    import datasets  # imported here so that importing this module stays cheap

    if _is_local(source):
        ext = os.path.splitext(source)[1].lower()
        if not os.path.exists(source):
            raise FileNotFoundError(
                f"MATH-500 file not found: {source} (give a .jsonl/.json/.parquet file or a hub id)"
            )
        if not os.path.isfile(source):
            raise ValueError(f"MATH-500 source {source} is not a file; give a .jsonl/.json/.parquet file")
        if os.path.getsize(source) == 0:
            raise ValueError(f"MATH-500 file {source} is empty")
        if ext not in _LOCAL_BUILDERS:
            raise ValueError(
                f"MATH-500 file {source}: unsupported type {ext or '(none)'}; use .jsonl, .json or .parquet"
            )
        where = f"file {source}"
        args = (_LOCAL_BUILDERS[ext],)
        kwargs = dict(data_files=source, split="train")  # a data file is a single "train" split
    else:
        where = f"hub dataset {source!r} (split {split!r})"
        args = (source,)
        kwargs = dict(split=split)
    try:
        with quiet_datasets() if _is_local(source) else contextlib.nullcontext():
            return datasets.load_dataset(*args, cache_dir=cache_dir, **kwargs)
    except Exception as e:  # one clear line instead of a datasets/pyarrow traceback
        cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if e.__cause__ is not None and str(e.__cause__).strip():
            cause += f" ({str(e.__cause__).strip().splitlines()[0]})"
        cause = re.sub(r"\bin row (\d+)", lambda m: f"in row {int(m[1]) + 1}", cause)  # pyarrow counts from 0
        raise ValueError(f"could not load MATH-500 from {where}: {type(e).__name__}: {cause}") from e


def load_math500(
    source: str, *, split: str = "test", limit: int | None = None, cache_dir: str | None = None
) -> tuple[list[MathProblem], LoadReport]:
    """Load MATH-500 problems from a hub id or a local file; returns ``(problems, report)``.

    ``split`` applies to hub ids (a local file is one split). ``limit`` keeps the first
    ``limit`` valid problems. Rows with a missing, non-string or empty problem/answer, or a
    repeated ``unique_id``, are skipped and counted in the report.
    """
    ds = _load_rows(source, split, cache_dir)
    report = LoadReport(source=source)
    for name in REQUIRED_FIELDS:
        feature = ds.features.get(name)
        if feature is not None and type(feature).__name__ == "Json":
            report.warnings.append(
                f"column {name!r} mixes types; datasets decodes JSON-like strings in it (e.g. \"42\") "
                f"as non-strings, so write every {name} as a JSON string"
            )
    problems: list[MathProblem] = []
    seen_ids: set[str] = set()
    for index, row in enumerate(ds):
        if limit is not None and len(problems) >= limit:
            break
        report.rows_read += 1
        problem, reason = _validate(row, index)
        if problem is not None and problem.unique_id in seen_ids:
            problem, reason = None, "duplicate unique_id"
        if problem is None:
            report.skipped[reason] += 1
            continue
        seen_ids.add(problem.unique_id)
        problems.append(problem)
    report.loaded = len(problems)
    return problems, report
