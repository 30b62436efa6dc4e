"""Phase A / B sequences: layout, targets and loss mask, round-1 traces, the length budget."""
import collections

import numpy as np
import pytest
from conftest import TOKENIZER_DIRS

from abscot_jax.data.dolci import DolciExample
from abscot_jax.data.roles import Role
from abscot_jax.data.sequences import (
    EVAL_SYSTEM_PROMPT, BuildConfig, SequenceBuilder, encode_prompt, example_rng, random_trace, render_prompt,
)
from abscot_jax.vocab import add_abstract_tokens

MESSAGES = ({"role": "user", "content": "What is 2 + 3 + 4?"},)
COT = "First 2 + 3 = 5.\n\nThen 5 + 4 = 9.\nSo the sum is 9."
EXAMPLE = DolciExample("ex0", MESSAGES, COT, "The answer is \\boxed{9}.")


@pytest.fixture(scope="module")
def tok(request):
    from transformers import AutoTokenizer

    # Our own copy (we extend it) of the fixture tokenizer, or of the one a test names (TOKENIZER_DIRS).
    source = request.getfixturevalue(getattr(request, "param", "tiny_hf_dir"))
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    add_abstract_tokens(tokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def vocab(tok):
    return add_abstract_tokens(tok)


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def pieces(example, roles):
    """The maximal runs of each role, in order: [(role, start, end), ...]."""
    runs, start = [], 0
    for i in range(1, len(roles) + 1):
        if i == len(roles) or roles[i] != roles[start]:
            runs.append((Role(roles[start]), start, i))
            start = i
    return runs


@pytest.mark.parametrize("tok", TOKENIZER_DIRS, indirect=True)
def test_phase_a_layout(tok, vocab):
    trace = list(vocab.abstract_ids[:5])
    ex = SequenceBuilder(tok, BuildConfig(seq_len=512)).phase_a(EXAMPLE, trace)
    runs = pieces(ex, ex.roles)
    assert [r for r, _, _ in runs] == [Role.PROMPT, Role.COT, Role.ABSTRACT, Role.ANSWER]
    (_, p0, p1), (_, c0, c1), (_, z0, z1), (_, y0, y1) = runs
    x_text = "<|im_start|>user\nWhat is 2 + 3 + 4?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert tok.decode(ex.tokens[p0:p1]) == x_text
    assert tok.decode(ex.tokens[c0:c1]) == f"<think>\n{COT}\n</think>\n\n"
    assert list(ex.tokens[z0:z1]) == [vocab.begin_id, *trace, vocab.end_id]
    assert tok.decode(ex.tokens[y0:y1]) == "The answer is \\boxed{9}.<|im_end|>"
    # Every piece boundary touches a special token: the pieces tokenise like the whole text.
    assert list(ex.tokens) == enc(tok, tok.decode(ex.tokens))
    assert ex.tokens.dtype == ex.roles.dtype == ex.targets.dtype == np.int32 and ex.loss_mask.dtype == np.float32


def test_prompt_is_the_same_in_phase_a_phase_b_and_evaluation(tok, vocab):
    trace = list(vocab.abstract_ids[3:9])
    for system in (None, EVAL_SYSTEM_PROMPT):
        builder = SequenceBuilder(tok, BuildConfig(seq_len=512, system=system))
        a, b = builder.phase_a(EXAMPLE, trace), builder.phase_b(EXAMPLE, trace)
        x = encode_prompt(tok, MESSAGES, system)
        assert list(a.tokens[a.roles == Role.PROMPT]) == x == list(b.tokens[b.roles == Role.PROMPT])
        # What Phase A's answer may see (everything but c) is the Phase B sequence, token for token.
        assert list(a.tokens[a.roles != Role.COT]) == list(b.tokens)
        assert list(a.roles[a.roles != Role.COT]) == list(b.roles)
    text = render_prompt(tok, MESSAGES, EVAL_SYSTEM_PROMPT)
    assert text.startswith(f"<|im_start|>system\n{EVAL_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # A system line replaces the conversation's own.
    own = ({"role": "system", "content": "Be brief."}, *MESSAGES)
    assert render_prompt(tok, own, EVAL_SYSTEM_PROMPT) == text
    assert "Be brief." in render_prompt(tok, own)


@pytest.mark.parametrize("loss_on_trace", [True, False])
def test_targets_and_loss_mask(tok, vocab, loss_on_trace):
    trace = list(vocab.abstract_ids[10:17])
    builder = SequenceBuilder(tok, BuildConfig(seq_len=512, loss_on_trace=loss_on_trace))
    for ex in (builder.phase_a(EXAMPLE, trace), builder.phase_b(EXAMPLE, trace)):
        n = len(ex)
        assert list(ex.targets) == list(ex.tokens[1:]) + [0]
        trained_roles = {Role.ABSTRACT, Role.ANSWER} if loss_on_trace else {Role.ANSWER}
        expected = [i for i in range(n - 1) if ex.roles[i + 1] in trained_roles]
        assert list(np.flatnonzero(ex.loss_mask)) == expected
        assert set(np.unique(ex.loss_mask)) <= {0.0, 1.0} and ex.loss_mask[-1] == 0
        # Counted by hand: trace + 2 delimiters, and the answer (text + <|im_end|>).
        answer_len = len(enc(tok, EXAMPLE.answer)) + 1
        assert ex.loss_mask.sum() == answer_len + (len(trace) + 2 if loss_on_trace else 0)
        # The trained targets are exactly the tokens from <beginabstract> (or the answer) to the end.
        first = np.flatnonzero(ex.tokens == (vocab.begin_id if loss_on_trace else vocab.end_id))[0]
        first += 0 if loss_on_trace else 1
        assert list(ex.targets[ex.loss_mask == 1]) == list(ex.tokens[first:])


def test_random_trace_rule():
    ids = list(range(100, 164))
    # rand(1, |l| // 2), both bounds included, one draw per step; |l| = 1 still gives one token.
    counts = collections.Counter(len(random_trace([10], ids, np.random.default_rng(s))) for s in range(3000))
    assert sorted(counts) == [1, 2, 3, 4, 5]
    assert all(450 < c < 750 for c in counts.values())  # uniform: 600 each
    assert all(len(random_trace([1, 1, 1], ids, np.random.default_rng(s))) == 3 for s in range(50))
    assert all(len(random_trace([2, 3], ids, np.random.default_rng(s))) == 2 for s in range(50))
    lengths = [len(random_trace([8, 4, 6], ids, np.random.default_rng(s))) for s in range(500)]
    assert min(lengths) == 3 and max(lengths) == 4 + 2 + 3
    # Tokens uniform over the 64 ids.
    tokens = collections.Counter(t for s in range(400) for t in random_trace([40] * 20, ids, np.random.default_rng(s), m_max=10_000))
    assert sorted(tokens) == ids
    assert max(tokens.values()) / min(tokens.values()) < 1.5
    # Capped at m_max.
    assert all(len(random_trace([50] * 20, ids, np.random.default_rng(s), m_max=128)) == 128 for s in range(20))


def test_builder_traces_per_step_seeded_by_example(tok, vocab):
    word = "7"
    assert len(enc(tok, word)) == 1  # |l| = 1: rand(1, max(1, 0)) = exactly one trace token per step
    one_token_steps = DolciExample("steps", MESSAGES, "\n".join([word] * 7) + "\n\n\n", "9")
    builder = SequenceBuilder(tok, BuildConfig(seq_len=512, m_max=128, seed=3))
    ex = builder.phase_a(one_token_steps)
    assert len(ex.trace) == 7 and set(ex.trace) <= set(vocab.abstract_ids)
    assert list(ex.tokens[ex.roles == Role.ABSTRACT]) == [vocab.begin_id, *ex.trace, vocab.end_id]
    long = DolciExample("long", MESSAGES, "\n".join([word] * 300), "9")
    assert len(builder.phase_a(long).trace) == 128
    assert len(SequenceBuilder(tok, BuildConfig(seq_len=512, m_max=16)).phase_a(long).trace) == 16

    # Reproducible whatever the order; different ids and seeds give different traces.
    others = [DolciExample(f"e{i}", MESSAGES, COT * 3, "9") for i in range(6)]
    forward = {e.id: SequenceBuilder(tok, BuildConfig(seed=3)).phase_a(e).trace for e in others}
    fresh = SequenceBuilder(tok, BuildConfig(seed=3))
    backward = {e.id: fresh.phase_a(e).trace for e in reversed(others)}
    assert forward == backward
    assert len(set(forward.values())) == len(others)
    assert SequenceBuilder(tok, BuildConfig(seed=4)).phase_a(others[0]).trace != forward["e0"]
    assert example_rng(3, "e0").integers(1 << 30) == example_rng(3, "e0").integers(1 << 30)


def test_explicit_trace_used_as_is_and_checked(tok, vocab):
    builder = SequenceBuilder(tok, BuildConfig(seq_len=512, m_max=8))
    trace = [vocab.abstract_ids[i] for i in (5, 5, 0, 63)]
    assert builder.phase_a(EXAMPLE, trace).trace == tuple(trace)
    assert builder.phase_b(EXAMPLE, []).trace == ()
    for bad in ([vocab.begin_id], [vocab.abstract_ids[0]] * 9, [3]):
        with pytest.raises(ValueError, match="at most m_max=8 abstract ids"):
            builder.phase_a(EXAMPLE, bad)


def _sizes(tok, example, m_max):
    """Lengths of x, the think tags, a maximal trace and y, computed independently of the builder."""
    x = len(encode_prompt(tok, example.prompt_messages))
    c = enc(tok, f"<think>\n{example.cot}\n</think>\n\n")
    close = c.index(tok.convert_tokens_to_ids("</think>"))
    inner = c[1:close]
    fixed = x + (len(c) - len(inner)) + m_max + 2 + len(enc(tok, example.answer)) + 1
    return fixed, inner


@pytest.mark.parametrize("tok", TOKENIZER_DIRS, indirect=True)
@pytest.mark.parametrize("policy", ["head", "head_tail", "drop"])
def test_cut_never_touches_question_trace_answer(tok, vocab, policy):
    m_max = 6
    long = DolciExample("long", MESSAGES, " ".join(["step"] * 10 + ["then"] * 40 + ["so"] * 10), "9")
    fixed, inner = _sizes(tok, long, m_max)
    trace = list(vocab.abstract_ids[:m_max])
    full = SequenceBuilder(tok, BuildConfig(seq_len=4096, m_max=m_max)).phase_a(long, trace)
    builder = SequenceBuilder(tok, BuildConfig(seq_len=fixed + 11, m_max=m_max, cut_policy=policy))
    cut = builder.phase_a(long, trace)
    if policy == "drop":
        assert cut is None and builder.report.dropped == {"cut_policy_drop": 1} and builder.report.built == 0
        return
    assert len(cut) == fixed + 11
    kept = inner[:11] if policy == "head" else inner[:6] + inner[-5:]
    think, close = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    assert list(cut.tokens[cut.roles == Role.COT]) == [think, *kept, close, *enc(tok, "\n\n")]
    for role in (Role.PROMPT, Role.ABSTRACT, Role.ANSWER):
        assert list(cut.tokens[cut.roles == role]) == list(full.tokens[full.roles == role])
    assert (cut.cot_tokens, cut.cot_tokens_total) == (11, len(inner))
    # What a round-2 sampler conditions on is the training prefix up to <beginabstract>.
    cond = builder.condition_ids(long)
    assert list(cond) == list(cut.tokens[: len(cond)]) and cond[-1] == vocab.begin_id


@pytest.mark.parametrize("tok", TOKENIZER_DIRS, indirect=True)
def test_build_report_counts_on_crafted_rows(tok, vocab):
    m_max = 4
    short = [DolciExample(f"s{i}", MESSAGES, "the", "9") for i in range(3)]
    longs = [DolciExample(f"l{i}", MESSAGES, " ".join(["the"] * (30 + 10 * i)), "9") for i in range(2)]
    huge_q = DolciExample("q", ({"role": "user", "content": "what is " * 60},), "the", "9")
    fixed, _ = _sizes(tok, longs[0], m_max)  # the same question and answer for shorts and longs
    seq_len = fixed + 20
    assert _sizes(tok, huge_q, m_max)[0] > seq_len  # question, tags, trace and answer alone overflow
    builder = SequenceBuilder(tok, BuildConfig(seq_len=seq_len, m_max=m_max))
    built = builder.build_all([*short, *longs, huge_q], phase="A")
    report = builder.report
    assert [e.id for e in built] == ["s0", "s1", "s2", "l0", "l1"]
    assert (report.built, report.cut, dict(report.dropped)) == (5, 2, {"too_long": 1})
    totals = [_sizes(tok, e, m_max)[1] for e in [*short, *longs]]
    kept = [len(t) for t in totals[:3]] + [20, 20]
    assert report.cot_tokens_total == sum(len(t) for t in totals)
    assert report.cot_kept_fraction == pytest.approx(sum(kept) / sum(len(t) for t in totals))
    assert all(len(e) <= seq_len for e in built)
    assert "cut 2, dropped 1 (too_long=1)" in str(report)

    # Phase B: dropped only when x, z and y do not fit; the long CoT does not matter.
    b = SequenceBuilder(tok, BuildConfig(seq_len=seq_len, m_max=m_max))
    traces = {e.id: list(vocab.abstract_ids[:m_max]) for e in [*short, *longs, huge_q]}
    assert [e.id for e in b.build_all([*short, *longs, huge_q], phase="B", traces=traces)] == ["s0", "s1", "s2", "l0", "l1"]
    assert dict(b.report.dropped) == {"too_long": 1}
    with pytest.raises(ValueError, match="no trace for example 'q'"):
        b.build_all([huge_q], phase="B", traces={})
