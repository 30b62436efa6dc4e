"""Files written whole or not at all: each is written under a temporary sibling name, unique to
the process and the call (two writers of one path never share it), and renamed over the path
when complete; on an error the temporary is removed and the path keeps what it had.

Standard library only: the vLLM environment imports it through the sampling protocol."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO


def temporary_sibling(path: str | Path) -> Path:
    """`.NAME.tmp-PID-RANDOM` beside `path` (a crash leaves only such names, never a half `NAME`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def replaced(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; rename it to `path` when the block ends."""
    tmp = temporary_sibling(path)
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_text(path: str | Path, text: str) -> None:
    with replaced(path) as f:
        f.write(text)


def replace_json(path: str | Path, data) -> None:
    replace_text(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def replace_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """One JSON object a line."""
    with replaced(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
