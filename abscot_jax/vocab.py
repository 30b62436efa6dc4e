"""The abstract vocabulary: 64 trace tokens and two delimiters, added as special tokens."""
from __future__ import annotations

import string

_LETTERS = string.ascii_uppercase
# <TOKEN_A> .. <TOKEN_Z>, <TOKEN_AA> .. <TOKEN_AZ>, <TOKEN_BA> .. <TOKEN_BL>: 26 + 26 + 12 = 64.
ABSTRACT_TOKENS: tuple[str, ...] = tuple(
    f"<TOKEN_{name}>" for name in [*_LETTERS, *("A" + c for c in _LETTERS), *("B" + c for c in _LETTERS[:12])]
)
BEGIN_ABSTRACT = "<beginabstract>"
END_ABSTRACT = "<endabstract>"
assert len(ABSTRACT_TOKENS) == 64
