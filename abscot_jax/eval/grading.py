"""Grading of MATH-style answers: the last ``\\boxed{}`` of a response against the gold answer.

``is_correct`` is the contract the evaluation relies on: it never raises, and it works in
worker threads as well as in the main thread.

Two layers:
  1. a normalised string comparison (formatting-only differences: spaces, ``\\left``/``\\right``,
     ``\\!``, ``^\\circ``, ``\\text{}`` wrappers, ``\\dfrac``, a trailing period). Identical
     strings after this are the same answer, so a match is accepted outright; it is also
     what grades answers math-verify cannot parse.
  2. math-verify (``parse`` + ``verify``) for mathematical equivalence (``\\frac12`` = ``0.5``,
     ``2\\sqrt3`` = ``\\sqrt{12}``, interval unions, matrices, sets, equations, ...).

math-verify behaviours worth knowing (math-verify 0.9.0, pinned by tests/test_grading.py):
  - ``(1,2)`` as gold is parsed as an open interval, and a prediction ``(1,2)`` likewise, so
    ordered pairs still compare equal to themselves; ``(2,1)`` vs ``(1,2)`` is False.
  - percentages are lenient both ways: gold ``10\\%`` accepts ``10`` and ``0.1``; gold ``10``
    accepts ``10\\%``.
  - degrees and units are dropped: gold ``30^\\circ`` accepts ``30``; ``5\\text{ cm}`` = ``5``.
  - text answers are case-insensitive: ``\\text{Evelyn}`` = ``\\text{evelyn}``, and a bare
    word ``Monday`` (parsed as a product of symbols) still matches ``\\text{Monday}``.
  - ``\\pi`` vs ``3.14159`` is False (compared to 6 decimals), which is mathematically right.
  - its timeouts use ``signal.alarm``, which only works in the main thread (elsewhere it
    raises ValueError). In other threads we pass ``None`` (no timeout; math-verify logs one
    warning about it). Without a timeout some answers run for minutes, and big-integer ones
    hold the GIL and freeze the whole process, so answers of those shapes (``_COSTLY_RE``)
    and very long ones are graded by string comparison only. That guard is a heuristic:
    e.g. ``(x+y+z)^{60}`` still runs unbounded in a thread. Grade in the main thread when
    answers are untrusted and a hang matters.
"""

from __future__ import annotations

import re
import threading

from math_verify import parse, verify
from math_verify.errors import TimeoutException

# Seconds per parse / comparison when running in the main thread (signal-based).
TIMEOUT_S = 5
# No MATH-500 answer comes close to this; longer boxed contents (runaway generations) are
# graded by string comparison only, which spares sympy a slow parse (a 40-deep \frac nest
# runs for minutes).
MAX_ANSWER_CHARS = 500

# Answers whose evaluation can run for minutes: large exponents, power towers, factorials
# and binomials of large or compound operands. Some of these hold the GIL inside big-integer
# arithmetic, so in a worker thread (no signal timeout) they would freeze the whole process.
# No MATH-500 answer has this shape; such answers are graded by string comparison only.
_COSTLY_RE = re.compile(
    r"\^\s*(?:\{[^{}]*?)?(?<![.\d])\d{3,}"  # exponent with a 3+ digit integer: (x+1)^{1000}
    r"|\^\s*\{[^{}]*\^"  # power tower: 10^{10^{10}}
    r"|(?:\d{4,}|[)}!])\s*!"  # factorial of a big number or an expression: 10000!, (10^{100})!, 100!!
    r"|\\[dt]?binom\s*\{[^{}]*(?:\d{4,}|\^)"  # \binom{10^6}{...}, \binom{1000000}{...}
)
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BRACE_RE = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped char (skipped) or a brace


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed x`` in ``text``.

    Braces are matched with escaped ones (``\\{``, ``\\}``) ignored. Returns None when there is
    no box, or when the last box is unbalanced (a truncated generation gets no credit from an
    earlier box).
    """
    if not isinstance(text, str):
        return None
    last = None
    for last in _BOX_RE.finditer(text):
        pass
    if last is None:
        return None
    start = last.end()
    while start < len(text) and text[start].isspace():
        start += 1
    if start < len(text) and text[start] == "{":
        depth = 0
        for m in _BRACE_RE.finditer(text, start):
            tok = m.group()
            if tok == "{":
                depth += 1
            elif tok == "}":
                depth -= 1
                if depth == 0:
                    return text[start + 1 : m.start()]
        return None
    # ``\boxed 5$`` (MATH-dataset style): the content runs to the closing ``$`` or line end.
    content = re.split(r"[$\n]", text[start:], maxsplit=1)[0].strip()
    return content or None


def _unwrap_text(s: str) -> str:
    # \text{abc}, \textbf{abc}, \mathrm{abc}, ... -> abc (innermost first, so nesting works)
    pattern = re.compile(r"\\(?:text(?:bf|rm|it|normal)?|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
    prev = None
    while prev != s:
        prev, s = s, pattern.sub(r"\1", s)
    return s


def normalise(s: str) -> str:
    """Formatting-only normalisation of a LaTeX answer, for exact comparison."""
    s = _unwrap_text(s.strip())
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[!,;:]", "", s)  # thin/medium/negative spaces
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)  # 30^\circ, 30^{\circ}
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\s+", "", s)
    s = s.strip("$")
    return s.rstrip(".")


def _math_verify_equal(pred: str, gold: str) -> bool:
    # signal.alarm only works in the main thread: elsewhere run without math-verify timeouts.
    in_main = threading.current_thread() is threading.main_thread()
    t = TIMEOUT_S if in_main else None
    # Both sides go through the same \boxed{} extraction path, so they are parsed alike.
    gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=t)
    pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=t)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=t))


def is_correct(response: str, gold: str) -> bool:
    """Whether the last ``\\boxed{}`` of ``response`` equals the gold answer. Never raises."""
    try:
        if not isinstance(response, str) or not isinstance(gold, str):
            return False
        pred = last_boxed(response)
        if pred is None or not pred.strip() or not gold.strip():
            return False
        norm_gold = normalise(gold)
        if norm_gold and normalise(pred) == norm_gold:
            return True
        if len(pred) > MAX_ANSWER_CHARS or _COSTLY_RE.search(pred):
            return False
        return _math_verify_equal(pred, gold)
    except (Exception, TimeoutException):  # TimeoutException derives from BaseException
        return False
