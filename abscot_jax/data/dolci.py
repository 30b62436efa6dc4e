"""Dolci-Think SFT rows -> (prompt messages, CoT, answer) examples.

A row of `allenai/Dolci-Think-SFT-7B` has `id`, `dataset_source` and `messages`, a list of
`{role, content}`; the last assistant turn holds `<think>COT</think>ANSWER`, with whitespace
that varies between sources. The hub id and local JSONL / JSON / parquet files go through the
same `datasets.load_dataset` call, so the tests exercise the real code path on a small file.

Choices (each bad row is skipped and counted under one reason, never raised):
- The example is the conversation up to its final assistant turn: every message before it is
  the prompt (system messages included, multi-turn conversations supported). Earlier assistant
  turns lose their think blocks, as Qwen3's chat template does for history, so only the final
  turn carries a CoT. `multi_turn=False` skips rows with more than one user turn instead.
- The final assistant content must be exactly one `<think>…</think>` block (only whitespace
  before it) and then the answer. A missing, doubled or out-of-order tag makes the split
  ambiguous, so such rows are skipped rather than guessed at.
- CoT and answer are stripped of surrounding whitespace (and CRLF line ends become LF); the
  sequence builder puts the whitespace around them back in one canonical form.
- Text containing one of Qwen3's added tokens (`<|im_end|>`, `<tool_call>`, `<|fim_pad|>`, ...) or
  an abstract-vocabulary token (`<beginabstract>`, ...) would be tokenised as that token and
  corrupt the layout: skipped. `<think>`/`</think>` are allowed only in assistant turns, where
  they are the think block's own tags (checked by `split_think`).
"""
from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from abscot_jax.progress import quiet_datasets
from abscot_jax.qwen3_tokenizer import QWEN3_ADDED_TOKENS
from abscot_jax.vocab import ABSTRACT_TOKENS, BEGIN_ABSTRACT, END_ABSTRACT

HUB_ID = "allenai/Dolci-Think-SFT-7B"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
PROMPT_ROLES = ("system", "user", "assistant")
# Strings the tokenizer turns into control tokens: in data text they would forge turns, tool calls,
# think blocks or traces.
RESERVED_STRINGS = (*(text for text, _ in QWEN3_ADDED_TOKENS), BEGIN_ABSTRACT, END_ABSTRACT, *ABSTRACT_TOKENS)
_RESERVED_RE = re.compile("|".join(re.escape(s) for s in RESERVED_STRINGS))
_RESERVED_IN_ASSISTANT_RE = re.compile(
    "|".join(re.escape(s) for s in RESERVED_STRINGS if s not in (THINK_OPEN, THINK_CLOSE)))
_THINK_BLOCK_RE = re.compile(re.escape(THINK_OPEN) + r".*?" + re.escape(THINK_CLOSE), re.DOTALL)
_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}

# Every skip reason, in report order.
SKIP_REASONS = (
    "bad_messages", "non_string_content", "unsupported_role", "no_final_assistant", "no_user_turn",
    "multi_turn", "reserved_token_in_text", "no_think_block", "malformed_think_tags", "empty_cot",
    "empty_answer", "too_long", "duplicate_id",
)


class DataError(ValueError):
    """Data that cannot be loaded at all (missing file, unknown format); the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class DolciExample:
    id: str
    prompt_messages: tuple[dict, ...]  # ({"role": ..., "content": str}, ...) before the final assistant turn
    cot: str  # inside the think block, stripped
    answer: str  # after the think block, stripped
    source: str = ""  # dataset_source


def split_think(content: str) -> tuple[str, str] | str:
    """`<think>COT</think>ANSWER` -> (cot, answer), both stripped; or a skip reason."""
    opens, closes = content.count(THINK_OPEN), content.count(THINK_CLOSE)
    if opens == 0 and closes == 0:
        return "no_think_block"
    if opens != 1 or closes != 1:
        return "malformed_think_tags"
    before, rest = content.split(THINK_OPEN)
    if before.strip() or THINK_CLOSE not in rest:  # text before the block, or </think> before <think>
        return "malformed_think_tags"
    cot, answer = rest.split(THINK_CLOSE)
    cot, answer = cot.replace("\r\n", "\n").strip(), answer.replace("\r\n", "\n").strip()
    if not cot:
        return "empty_cot"
    if not answer:
        return "empty_answer"
    return cot, answer


def parse_row(row: Mapping, *, multi_turn: bool = True, max_chars: int | None = None) -> DolciExample | str:
    """One dataset row -> a `DolciExample`, or the reason (one of SKIP_REASONS) to skip it."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "bad_messages"
    if not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in messages):
        return "bad_messages"
    if not all(isinstance(m["content"], str) for m in messages):
        return "non_string_content"
    if any(m["role"] not in PROMPT_ROLES for m in messages):
        return "unsupported_role"
    if messages[-1]["role"] != "assistant":
        return "no_final_assistant"
    prompt = messages[:-1]
    users = sum(m["role"] == "user" for m in prompt)
    if users == 0:
        return "no_user_turn"
    if users > 1 and not multi_turn:
        return "multi_turn"
    if any((_RESERVED_IN_ASSISTANT_RE if m["role"] == "assistant" else _RESERVED_RE).search(m["content"])
           for m in messages):
        return "reserved_token_in_text"
    parts = split_think(messages[-1]["content"])
    if isinstance(parts, str):
        return parts
    cot, answer = parts
    prompt_messages = tuple(
        {"role": m["role"], "content": _THINK_BLOCK_RE.sub("", m["content"]).strip() if m["role"] == "assistant" else m["content"]}
        for m in prompt
    )
    if max_chars is not None and sum(len(m["content"]) for m in prompt_messages) + len(cot) + len(answer) > max_chars:
        return "too_long"
    row_id = row.get("id")
    return DolciExample("" if row_id is None else str(row_id), prompt_messages, cot, answer,
                        str(row.get("dataset_source") or ""))


def parse_rows(rows: Iterable[Mapping], *, multi_turn: bool = True, max_chars: int | None = None,
               ) -> tuple[list[DolciExample], collections.Counter]:
    """Parse rows, skipping bad ones. Returns the examples and a Counter of skip reasons.

    A row without an id gets `row<N>`, N its position counting from 1; a repeated id is skipped
    (ids key the per-example trace seed and the trace files of later rounds, so they must be unique)."""
    examples, skipped, seen = [], collections.Counter(), set()
    for index, row in enumerate(rows):
        result = parse_row(row, multi_turn=multi_turn, max_chars=max_chars)
        if isinstance(result, str):
            skipped[result] += 1
            continue
        if not result.id:
            result = dataclasses.replace(result, id=f"row{index + 1}")
        if result.id in seen:
            skipped["duplicate_id"] += 1
            continue
        seen.add(result.id)
        examples.append(result)
    return examples, skipped


def format_counts(name: str, kept: int, skipped: collections.Counter) -> str:
    """One line: `dolci: kept 22 of 30 rows; skipped 8 (empty_cot=1, ...)`."""
    total = kept + sum(skipped.values())
    if not skipped:
        return f"{name}: kept {kept} of {total} rows"
    order = {reason: i for i, reason in enumerate(SKIP_REASONS)}
    detail = ", ".join(f"{r}={n}" for r, n in sorted(skipped.items(), key=lambda kv: order.get(kv[0], 99)))
    return f"{name}: kept {kept} of {total} rows; skipped {sum(skipped.values())} ({detail})"


def load_rows(source: str | Path | list, *, split: str = "train", streaming: bool = False):
    """A `datasets` dataset from a hub id, a local .jsonl/.json/.parquet file, a folder of them,
    or a list of such files."""
    import datasets

    files = _local_files(source)
    try:
        if files is None:
            return datasets.load_dataset(str(source), split=split, streaming=streaming)
        with quiet_datasets():
            return datasets.load_dataset(files[0], data_files=files[1], split="train", streaming=streaming)
    except Exception as e:  # noqa: BLE001 - many failure types; the user needs one line
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if e.__cause__ is not None and str(e.__cause__).strip():  # pyarrow's reason, e.g. the bad row
            first_line += f" ({str(e.__cause__).strip().splitlines()[0]})"
        first_line = re.sub(r"\bin row (\d+)", lambda m: f"in row {int(m[1]) + 1}", first_line)  # pyarrow counts from 0
        raise DataError(f"cannot load {source!r}: {first_line}") from e


def _local_files(source) -> tuple[str, list[str]] | None:
    """(datasets builder name, files) for a local source; None for a hub id."""
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
    else:
        path = Path(source)
        looks_local = path.suffix in _LOCAL_BUILDERS or str(source).startswith((".", "/", "~"))
        if not path.exists():
            if looks_local:
                raise DataError(f"{source}: no such file; give a hub id (e.g. {HUB_ID}) or an existing file")
            return None
        paths = sorted(p for p in path.iterdir() if p.suffix in _LOCAL_BUILDERS) if path.is_dir() else [path]
    if not paths:
        raise DataError(f"{source}: no .jsonl, .json or .parquet files there")
    suffixes = {p.suffix for p in paths}
    if not suffixes <= set(_LOCAL_BUILDERS) or len({_LOCAL_BUILDERS[s] for s in suffixes}) != 1:
        raise DataError(f"{source}: expected files of one format, .jsonl/.json or .parquet; got {sorted(suffixes)}")
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: no such file")
    return _LOCAL_BUILDERS[paths[0].suffix], [str(p) for p in paths]


def load_dolci(source: str | Path | list = HUB_ID, *, split: str = "train", limit: int | None = None,
               multi_turn: bool = True, max_chars: int | None = None, streaming: bool = False,
               verbose: bool = True) -> tuple[list[DolciExample], collections.Counter]:
    """Load and parse Dolci-Think rows (hub id or local files, same code path).

    `limit` reads only the first rows (handy with `streaming=True` on the 2M-row hub set).
    Returns (examples, skip counts) and prints the counts as one line unless `verbose=False`."""
    rows = load_rows(source, split=split, streaming=streaming)
    if limit is not None:
        rows = rows.take(limit) if streaming else rows.select(range(min(limit, len(rows))))
    examples, skipped = parse_rows(rows, multi_turn=multi_turn, max_chars=max_chars)
    if verbose:
        print(format_counts("dolci", len(examples), skipped), flush=True)
    return examples, skipped
