"""Phase A and Phase B training sequences: token ids, roles, next-token targets and loss mask.

Layout (token pieces; `|` separates the roles PROMPT | COT | ABSTRACT | ANSWER):

    x  = render_prompt(messages)  ... <|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n
    c  = <think>\\n COT \\n</think>\\n\\n
    z  = <beginabstract> z_1 .. z_m <endabstract>
    y  = ANSWER <|im_end|>

    Phase A:  x | c | z | y        Phase B (and evaluation):  x | z | y

Why x keeps the pre-filled empty think block. Qwen3's chat template with thinking off
(`enable_thinking=False`) ends the generation prompt with an empty `<think>\\n\\n</think>\\n\\n`.
The evaluation prompts the model exactly so (thinking off), and Phase B trains on the same
prompt, so x must end with that block in every phase. Phase A therefore keeps it too and puts
the real CoT after it as a second, filled think block. The alternative (render x with thinking
on and let c replace the empty block) makes the Phase A prefix x differ from the Phase B /
evaluation prompt by exactly those tokens, and the answer positions, which see x and z but
never c, would be trained on a prompt they never meet at test time. With this layout the
tokens that ANSWER positions may attend to in Phase A (x, z, earlier y) are, token for token,
the Phase B / evaluation sequence; only their position ids differ, by |c|.

Every boundary between pieces touches a special or added token (`<think>`, `<beginabstract>`,
`<endabstract>`, `<|im_end|>`), so tokenising the pieces separately gives the same ids as
tokenising the whole text, and `render_prompt` + the sampler's generated ids reproduce the
training sequences exactly.

Targets and loss. `targets[i] = tokens[i + 1]` within the example (0 at its last token);
`loss_mask[i] = 1` when that target is an ABSTRACT (delimiters included) or ANSWER token, so the
position before `<beginabstract>` (the end of c, or of x) learns to open the trace and the last
token (`<|im_end|>`) predicts nothing. `loss_on_trace=False` zeroes the ABSTRACT targets. The
shift happens here, per example, so packing never shifts across examples.

Round-1 traces follow the paper's per-step rule: each CoT step l (a non-blank line of the CoT,
|l| >= 1 tokens: those of the CoT's tokenisation that start in that line) contributes
rand(1, max(1, |l| // 2)) tokens drawn uniformly from the 64 abstract ids, the whole trace
capped at m_max. The generator is seeded by (seed, example id), so a trace does not depend on
the order in which examples are built. Steps are taken from the full CoT, before any cut.

Length budget (Phase A). The CoT is the only piece ever cut; x, the think tags, the trace and y
never are. The cut is decided as if the trace had its maximum length m_max (+2 delimiters), so
it does not depend on the trace actually drawn: `condition_ids` (x; c, what a round >= 2 trace
sampler conditions on) is then exactly the prefix of the training sequence built afterwards
with the sampled trace. Policies: `drop` the example, keep the `head` of the CoT, or keep
`head_tail` (default): the first half and the last half of the budget. The default keeps both
the CoT's set-up and its conclusion (the result the answer restates), which is what a trace
meant to summarise the reasoning most needs; `head` would lose the conclusion of every long
CoT. An example is dropped when x, the tags, a maximal trace and y alone leave no room for a
single CoT token (or when a Phase B example does not fit at all).
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from abscot_jax.data.roles import Role
from abscot_jax.vocab import AbstractVocab, abstract_vocab

EVAL_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
END_OF_TURN = "<|im_end|>"
COT_OPEN = "<think>\n"
COT_CLOSE = "\n</think>\n\n"
CUT_POLICIES = ("drop", "head", "head_tail")


# ---- prompts ----------------------------------------------------------------------------------

def render_prompt(tokenizer, messages: Sequence[Mapping], system: str | None = None) -> str:
    """The prompt text x: chat template, generation prompt, thinking off.

    `system` replaces any leading system message (None keeps the messages as they are). Training
    and evaluation both call this, so their prompts match exactly."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system is not None:
        if messages and messages[0]["role"] == "system":
            messages = messages[1:]
        messages = [{"role": "system", "content": system}, *messages]
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)


def encode_prompt(tokenizer, messages: Sequence[Mapping], system: str | None = None) -> list[int]:
    """Token ids of `render_prompt` (the template already holds every special token)."""
    return tokenizer.encode(render_prompt(tokenizer, messages, system), add_special_tokens=False)


# ---- round-1 random traces --------------------------------------------------------------------

def example_rng(seed: int, example_id: str) -> np.random.Generator:
    """A generator that depends only on (seed, id): stable across runs, processes and orderings."""
    digest = int.from_bytes(hashlib.sha256(example_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def random_trace(step_lengths: Sequence[int], abstract_ids: Sequence[int], rng: np.random.Generator,
                 m_max: int = 128) -> list[int]:
    """The paper's round-1 trace: per step of |l| tokens, rand(1, max(1, |l| // 2)) uniform abstract
    ids (both bounds included), all steps' tokens concatenated and capped at m_max."""
    per_step = rng.integers(1, np.maximum(1, np.asarray(step_lengths, np.int64) // 2) + 1)  # one draw per step
    n = min(int(per_step.sum()), m_max)
    return [int(i) for i in rng.choice(np.asarray(abstract_ids), size=n)]


# ---- examples ---------------------------------------------------------------------------------

@dataclasses.dataclass
class SequenceExample:
    """One training example before packing (positions are derived when packing)."""

    tokens: np.ndarray  # int32 [L]
    roles: np.ndarray  # int32 [L], Role values
    targets: np.ndarray  # int32 [L]: the next token of this example, 0 at the last
    loss_mask: np.ndarray  # float32 [L]: weight of the prediction at this position
    id: str
    phase: str  # "A" or "B"
    trace: tuple[int, ...] = ()  # the abstract ids of z, without delimiters
    cot_tokens: int = 0  # CoT tokens kept (Phase A)
    cot_tokens_total: int = 0  # CoT tokens before the cut (Phase A)

    def __len__(self) -> int:
        return len(self.tokens)


def make_example(pieces: Sequence[tuple[Sequence[int], Role]], *, example_id: str, phase: str,
                 loss_on_trace: bool = True, **metadata) -> SequenceExample:
    """Concatenate (ids, role) pieces and derive targets and the loss mask."""
    tokens = np.concatenate([np.asarray(ids, np.int32) for ids, _ in pieces])
    roles = np.concatenate([np.full(len(ids), int(role), np.int32) for ids, role in pieces])
    targets = np.zeros_like(tokens)
    targets[:-1] = tokens[1:]
    trained = roles[1:] == Role.ANSWER
    if loss_on_trace:
        trained |= roles[1:] == Role.ABSTRACT
    loss_mask = np.zeros(len(tokens), np.float32)
    loss_mask[:-1] = trained
    return SequenceExample(tokens, roles, targets, loss_mask, example_id, phase, **metadata)


@dataclasses.dataclass
class BuildConfig:
    seq_len: int = 4096
    m_max: int = 128
    cut_policy: str = "head_tail"  # drop | head | head_tail
    loss_on_trace: bool = True
    system: str | None = None  # system line of the training prompt; None: the row's own messages
    seed: int = 0  # round-1 trace seed

    def __post_init__(self):
        if self.cut_policy not in CUT_POLICIES:
            raise ValueError(f"cut_policy={self.cut_policy!r}; expected one of {', '.join(CUT_POLICIES)}")
        if self.m_max < 1 or self.seq_len < 1:
            raise ValueError(f"m_max ({self.m_max}) and seq_len ({self.seq_len}) must be positive")


@dataclasses.dataclass
class BuildReport:
    built: int = 0
    cut: int = 0  # built Phase A examples whose CoT was cut
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # reason -> n
    cot_tokens_total: int = 0  # over built Phase A examples, before cutting
    cot_tokens_kept: int = 0

    @property
    def cot_kept_fraction(self) -> float:
        """CoT tokens kept / CoT tokens of the built Phase A examples (1.0 when none)."""
        return self.cot_tokens_kept / self.cot_tokens_total if self.cot_tokens_total else 1.0

    def __str__(self) -> str:
        drops = ", ".join(f"{r}={n}" for r, n in sorted(self.dropped.items())) or "none"
        return (f"built {self.built}, cut {self.cut}, dropped {sum(self.dropped.values())} ({drops}), "
                f"CoT tokens kept {self.cot_kept_fraction:.3f}")


def cut_cot(cot_ids: Sequence[int], budget: int, policy: str) -> list[int]:
    """Keep `budget` (< len) CoT tokens: the head, or head and tail halves (head gets the odd one)."""
    if policy == "head":
        return list(cot_ids[:budget])
    head = (budget + 1) // 2
    return list(cot_ids[:head]) + list(cot_ids[len(cot_ids) - (budget - head):])


class CotPieces(NamedTuple):
    """c = `<think>\\n COT \\n</think>\\n\\n` tokenised once, in its three parts, and its steps."""
    open: list[int]  # [<think>]
    cot: list[int]  # "\n" COT "\n"
    close: list[int]  # [</think>, "\n\n"]
    step_spans: list[tuple[int, int]]  # each CoT step's tokens [start, end) in open + cot + close

    @property
    def step_lengths(self) -> list[int]:
        return [end - start for start, end in self.step_spans]


class SequenceBuilder:
    """Builds Phase A / Phase B examples from `DolciExample`-like records (`id`, `prompt_messages`,
    `cot`, `answer`) and keeps a `BuildReport` of what it built, cut and dropped."""

    def __init__(self, tokenizer, config: BuildConfig | None = None, vocab: AbstractVocab | None = None):
        self.tokenizer = tokenizer
        self.config = config or BuildConfig()
        self.vocab = vocab or abstract_vocab(tokenizer)
        self.report = BuildReport()
        self._abstract = frozenset(self.vocab.abstract_ids)
        self._think_open, self._think_close = (tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>"))
        self._end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        if None in (self._think_open, self._think_close, self._end_of_turn):
            raise ValueError("tokenizer lacks <think>, </think> or <|im_end|>: not a Qwen3 tokenizer")

    # -- pieces --
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, example) -> list[int]:
        return encode_prompt(self.tokenizer, example.prompt_messages, self.config.system)

    def answer_ids(self, example) -> list[int]:
        return self._encode(example.answer) + [self._end_of_turn]

    def cot_pieces(self, example) -> CotPieces:
        """c tokenised once as one text, and its steps (a step: a non-blank line). A step's tokens
        are those that start inside its line, at least one: the same count as tokenising the line
        alone, except that the rare token spanning a line end (".\\n") counts for the line it
        starts in; and the CoT is tokenised once, not twice."""
        enc = self.tokenizer(COT_OPEN + example.cot + COT_CLOSE, add_special_tokens=False, return_offsets_mapping=True)
        ids, starts = list(enc["input_ids"]), [start for start, _ in enc["offset_mapping"]]
        close = ids.index(self._think_close)
        spans, pos = [], len(COT_OPEN)
        for line in example.cot.split("\n"):
            if line.strip():
                first = bisect.bisect_left(starts, pos)
                spans.append((first, max(first + 1, bisect.bisect_left(starts, pos + len(line)))))
            pos += len(line) + 1
        return CotPieces(ids[:1], ids[1:close], ids[close:], spans)

    def random_trace(self, example, step_lengths: Sequence[int] | None = None) -> list[int]:
        """The round-1 trace of this example (the same whenever and wherever it is drawn)."""
        if step_lengths is None:
            step_lengths = self.cot_pieces(example).step_lengths
        return random_trace(step_lengths, self.vocab.abstract_ids, example_rng(self.config.seed, example.id),
                            self.config.m_max)

    def _trace_ids(self, example, trace, step_lengths=None) -> list[int]:
        if trace is None:
            trace = self.random_trace(example, step_lengths)
        trace = [int(t) for t in trace]
        if len(trace) > self.config.m_max or not self._abstract.issuperset(trace):
            raise ValueError(f"example {example.id}: a trace must be at most m_max={self.config.m_max} abstract ids "
                             f"(no delimiters); got {len(trace)} ids")
        return trace

    def _cot_budget(self, x, tags, y) -> int:
        """CoT tokens that fit next to x, the think tags, a maximal trace and y."""
        return self.config.seq_len - len(x) - tags - (self.config.m_max + 2) - len(y)

    def _fit_cot(self, pieces: CotPieces, x, y) -> tuple[list[int] | None, str]:
        """(the CoT ids kept, cut to fit if the policy allows, ""), or (None, why it is dropped)."""
        cot = pieces.cot
        budget = self._cot_budget(x, len(pieces.open) + len(pieces.close), y)
        if len(cot) <= budget:
            return cot, ""
        if budget < 1:
            return None, "too_long"
        if self.config.cut_policy == "drop":
            return None, "cut_policy_drop"
        return cut_cot(cot, budget, self.config.cut_policy), ""

    # -- public --
    def condition_ids(self, example) -> np.ndarray | None:
        """x; c (cut as Phase A will cut it): what a round >= 2 trace sampler conditions on,
        followed by `<beginabstract>`. None when the example would be dropped."""
        x, y = self.prompt_ids(example), self.answer_ids(example)
        pieces = self.cot_pieces(example)
        cot, _ = self._fit_cot(pieces, x, y)
        if cot is None:
            return None
        return np.asarray(x + pieces.open + cot + pieces.close + [self.vocab.begin_id], np.int32)

    def phase_a(self, example, trace: Sequence[int] | None = None) -> SequenceExample | None:
        """`[x; c; <beginabstract> z <endabstract>; y]`; trace None draws the round-1 random trace.
        Returns None (and counts why) when the example is dropped."""
        x, y = self.prompt_ids(example), self.answer_ids(example)
        pieces = self.cot_pieces(example)
        z = self._trace_ids(example, trace, pieces.step_lengths)
        cot, dropped = self._fit_cot(pieces, x, y)
        if cot is None:
            self.report.dropped[dropped] += 1
            return None
        open_, close, total = pieces.open, pieces.close, len(pieces.cot)
        self.report.built += 1
        self.report.cut += len(cot) < total
        self.report.cot_tokens_total += total
        self.report.cot_tokens_kept += len(cot)
        return make_example(
            [(x, Role.PROMPT), (open_ + cot + close, Role.COT), (self._delimit(z), Role.ABSTRACT), (y, Role.ANSWER)],
            example_id=example.id, phase="A", loss_on_trace=self.config.loss_on_trace,
            trace=tuple(z), cot_tokens=len(cot), cot_tokens_total=total)

    def phase_b(self, example, trace: Sequence[int] | None = None) -> SequenceExample | None:
        """`[x; <beginabstract> z <endabstract>; y]` (z normally sampled from the Phase A model;
        None draws the round-1 rule, for tests and demos). None when it does not fit in seq_len."""
        x, y = self.prompt_ids(example), self.answer_ids(example)
        z = self._delimit(self._trace_ids(example, trace))
        if len(x) + len(z) + len(y) > self.config.seq_len:
            self.report.dropped["too_long"] += 1
            return None
        self.report.built += 1
        return make_example([(x, Role.PROMPT), (z, Role.ABSTRACT), (y, Role.ANSWER)],
                            example_id=example.id, phase="B", loss_on_trace=self.config.loss_on_trace,
                            trace=tuple(z[1:-1]))

    def curriculum(self, example, step_codes: Sequence[Sequence[int]], k: int) -> SequenceExample | None:
        """The stepwise curriculum's sequence with the first k CoT steps internalised:
        `[x; <beginabstract> codes of steps 1..k <endabstract>; <think> steps k+1.. </think>; y]`, the
        rest of the CoT trained with the answer (plain causal, as the verbal CoT). `step_codes[i]` are
        step i's codes ([] for every step: the steps are removed). With every step replaced it is
        Phase B's `[x; z; y]`. None (counted) when it does not fit seq_len or its CoT has no step."""
        x, y = self.prompt_ids(example), self.answer_ids(example)
        pieces = self.cot_pieces(example)
        if not pieces.step_spans:
            self.report.dropped["no_cot_steps"] += 1
            return None
        k = min(k, len(pieces.step_spans))
        z = self._delimit([int(code) for codes in step_codes[:k] for code in codes][:self.config.m_max])
        c = pieces.open + pieces.cot + pieces.close
        rest = [] if k == len(pieces.step_spans) else pieces.open + c[pieces.step_spans[k - 1][1] if k else 1:]
        if len(x) + len(z) + len(rest) + len(y) > self.config.seq_len:
            self.report.dropped["too_long"] += 1
            return None
        self.report.built += 1
        return make_example([(x, Role.PROMPT), (z, Role.ABSTRACT), (rest + y, Role.ANSWER)], example_id=example.id,
                            phase="B", loss_on_trace=self.config.loss_on_trace, trace=tuple(z[1:-1]))

    def _delimit(self, trace: list[int]) -> list[int]:
        return [self.vocab.begin_id, *trace, self.vocab.end_id]

    def build_all(self, examples, phase: str = "A", traces: Mapping[str, Sequence[int]] | None = None,
                  ) -> list[SequenceExample]:
        """Build every example of one phase (traces by example id; a missing id draws the round-1
        rule in Phase A and raises in Phase B when `traces` is given). Dropped ones are left out."""
        if phase not in ("A", "B"):
            raise ValueError(f"phase={phase!r}; expected 'A' or 'B'")
        out = []
        for example in examples:
            trace = None if traces is None else traces.get(example.id)
            if phase == "B" and traces is not None and trace is None:
                raise ValueError(f"no trace for example {example.id!r}: sample Phase B traces for every example first")
            built = self.phase_a(example, trace) if phase == "A" else self.phase_b(example, trace)
            if built is not None:
                out.append(built)
        return out
