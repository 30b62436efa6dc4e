"""The role of each token in a training sequence: the sequence builders assign it, the attention
mask and the loss read it."""
from __future__ import annotations

import enum


class Role(enum.IntEnum):
    """Role of each token in a training sequence. Padding has segment id 0 (its role is ignored)."""

    PROMPT = 0
    COT = 1
    ABSTRACT = 2  # the trace and both delimiters
    ANSWER = 3
