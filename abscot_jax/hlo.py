"""Reading a compiled executable's HLO text: which collectives XLA chose, on which buffers."""
from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
               "u32": 4, "f64": 8, "s64": 8, "u64": 8}

# `%name = <shape or (tuple of shapes)> all-gather(` (async forms end in -start)
_INSTRUCTION = re.compile(r"=\s+(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVE_KINDS) + r")(?:-start)?\(")
_ARRAY = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, dims) of each result buffer

    @property
    def bytes(self) -> int:
        return sum(DTYPE_BYTES.get(dtype, 4) * math.prod(dims) for dtype, dims in self.shapes)


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective instruction of the HLO module text (`compiled.as_text()`), with the shapes
    of its results. The result of an async `-start` also holds its operands: its shapes are
    listed as written."""
    found = []
    for match in _INSTRUCTION.finditer(hlo_text):
        shapes = tuple((dtype, tuple(int(d) for d in dims.split(",") if d))
                       for dtype, dims in _ARRAY.findall(match.group(1)))
        found.append(Collective(match.group(2), shapes))
    return found


def summarize(found: list[Collective]) -> dict[str, dict[str, int]]:
    """{kind: {"count": n, "bytes": total result bytes}}, for reports."""
    out: dict[str, dict[str, int]] = {}
    for c in found:
        entry = out.setdefault(c.kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += c.bytes
    return out
