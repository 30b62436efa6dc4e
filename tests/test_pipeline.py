"""Packing pipeline and the bottleneck on real Phase A / B sequences through the tiny model."""
import collections
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TOKENIZER_DIRS
from flax import nnx

from abscot_jax.data.dolci import DolciExample
from abscot_jax.data.pipeline import (
    BATCH_KEYS, PackIterDataset, first_fit_decreasing, make_dataset, pack_row, packing_efficiency,
)
from abscot_jax.data.roles import Role
from abscot_jax.data.sequences import BuildConfig, SequenceBuilder, make_example
from abscot_jax.model.attention import reference_mask
from abscot_jax.model.config import Qwen3Config
from abscot_jax.model.qwen3 import Qwen3
from abscot_jax.vocab import add_abstract_tokens

QUESTIONS = ["What is 2 + 3?", "Find the sum of 4 and 5.", "Is 7 prime?", "Compute 6 * 7.", "What is 9 - 1?"]


@pytest.fixture(scope="module")
def tok(request):
    from transformers import AutoTokenizer

    # The fixture tokenizer, or the one a test names (TOKENIZER_DIRS).
    tokenizer = AutoTokenizer.from_pretrained(str(request.getfixturevalue(getattr(request, "param", "tiny_hf_dir"))))
    add_abstract_tokens(tokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def records():
    return [
        DolciExample(f"e{i}", ({"role": "user", "content": q},),
                     "\n".join(f"step {j}: the value is {i + j} then add {j}" for j in range(1 + i % 4)), f"\\boxed{{{i}}}")
        for i, q in enumerate(QUESTIONS * 2)
    ]


@pytest.fixture(scope="module")
def phase_a(tok, records):
    return SequenceBuilder(tok, BuildConfig(seq_len=256, m_max=12)).build_all(records, phase="A")


@pytest.fixture(scope="module")
def phase_b(tok, records):
    return SequenceBuilder(tok, BuildConfig(seq_len=256, m_max=12)).build_all(records, phase="B")


SEQ_LEN = 256  # every forward below uses rows of this length: few shapes, few compilations


def tiny_model(tok, layers):
    cfg = Qwen3Config(vocab_size=len(tok) + 6, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    model = Qwen3(cfg, rngs=nnx.Rngs(0))
    jitted = nnx.jit(lambda m, b: m(b["tokens"], b["positions"], b["segment_ids"], b["roles"]))
    keys = ("tokens", "positions", "segment_ids", "roles")
    return lambda batch: np.asarray(jitted(model, {k: jnp.asarray(batch[k]) for k in keys}))


@pytest.fixture(scope="module")
def one_layer(tok):
    return tiny_model(tok, layers=1)


@pytest.fixture(scope="module")
def two_layers(tok):
    return tiny_model(tok, layers=2)


def single(ex):
    """One example alone in a [1, SEQ_LEN] batch (padding after it)."""
    return {k: v[None] for k, v in pack_row([ex], SEQ_LEN).items()}


def stack(rows):
    """Rows ([T] arrays) or batches ([B, T] arrays) -> one batch."""
    return {k: np.concatenate([np.atleast_2d(r[k]) for r in rows]) for k in rows[0]}


# ---- the bottleneck --------------------------------------------------------------------------

def cot_variants(ex, vocab_size, each=True, seed=0):
    """Row 0: the example; then one row per COT token replaced by another id (if `each`); last row:
    every COT token replaced."""
    rng = np.random.default_rng(seed)
    base = single(ex)
    cot = np.flatnonzero(ex.roles == Role.COT)
    rows = [base]
    for j in (list(cot) if each else []) + [None]:
        changed = {k: v.copy() for k, v in base.items()}
        where = cot if j is None else [j]
        changed["tokens"][0, where] = (changed["tokens"][0, where] + rng.integers(1, vocab_size, len(where))) % vocab_size
        rows.append(changed)
    return stack(rows)


def test_answer_never_sees_cot(tok, phase_a, one_layer):
    """One layer: ANSWER logits are bit-identical whatever the CoT; ABSTRACT logits do change."""
    ex = phase_a[3]
    logits = one_layer(cot_variants(ex, len(tok)))[:, : len(ex)]
    answer, abstract = ex.roles == Role.ANSWER, ex.roles == Role.ABSTRACT
    assert answer.sum() > 2 and (ex.roles == Role.COT).sum() > 10
    for row in range(1, len(logits)):
        assert np.array_equal(logits[row][answer], logits[0][answer]), row  # bit for bit
        assert not np.allclose(logits[row][abstract], logits[0][abstract], atol=1e-6), row
    # The prompt is before the CoT: untouched too (causality), the CoT itself changes.
    prompt = ex.roles == Role.PROMPT
    assert np.array_equal(logits[-1][prompt], logits[0][prompt])


def test_cot_reaches_answer_through_trace_states_from_layer_two(tok, phase_a, two_layers):
    """The paper's single-pass mask is a continuous bottleneck (DESIGN.md): from the second layer
    the answer reads the trace positions' hidden states, which saw the CoT."""
    ex = phase_a[3]
    logits = two_layers(cot_variants(ex, len(tok), each=False))[:, : len(ex)]
    answer = ex.roles == Role.ANSWER
    assert not np.allclose(logits[1][answer], logits[0][answer], atol=1e-7)


def test_nothing_crosses_segments(tok, phase_a, phase_b, two_layers):
    first, second = phase_a[1], phase_b[4]
    row = pack_row([first, second], SEQ_LEN)
    changed = {k: v.copy() for k, v in row.items()}
    n = len(first)
    changed["tokens"][:n] = (changed["tokens"][:n] + 7) % len(tok)  # every token of segment 1
    logits = two_layers(stack([row, changed]))
    seg2 = row["segment_ids"] == 2
    assert np.array_equal(logits[0][seg2], logits[1][seg2])
    assert not np.allclose(logits[0][:n], logits[1][:n], atol=1e-6)
    # And segment 2 packed behind another example computes what it computes alone.
    alone = two_layers(stack([single(second), single(first)]))[0, : len(second)]
    np.testing.assert_allclose(logits[0][seg2], alone, rtol=1e-5, atol=1e-5)


def test_phase_b_is_plain_causal(phase_a, phase_b):
    batch = stack([pack_row(phase_b[i:i + 3], SEQ_LEN) for i in (0, 3, 6)])
    assert not np.any(batch["roles"][batch["segment_ids"] > 0] == Role.COT)
    mask = np.asarray(reference_mask(jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["roles"])))
    seg = batch["segment_ids"]
    t = seg.shape[1]
    causal = np.tril(np.ones((t, t), bool)) & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    assert np.array_equal(mask, causal)
    # Phase A is not: its answer rows exclude the CoT columns.
    a = stack([pack_row(phase_a[:2], SEQ_LEN)])
    mask_a = np.asarray(reference_mask(jnp.asarray(a["segment_ids"]), jnp.asarray(a["roles"])))[0]
    answer, cot = a["roles"][0] == Role.ANSWER, a["roles"][0] == Role.COT
    assert not mask_a[np.ix_(answer, cot)].any()
    assert mask_a[np.ix_(a["roles"][0] == Role.ABSTRACT, cot)].any()


# ---- packing ---------------------------------------------------------------------------------

def test_first_fit_decreasing_by_hand():
    # Sorted 5,4,3,3,2,1 into bins of 8: 5->b0, 4->b1, 3->b0 (full), 3->b1, 2->b2, 1->b1 (full).
    assert first_fit_decreasing([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    assert first_fit_decreasing([8, 8], 8) == [[0], [1]]
    assert first_fit_decreasing([], 8) == []


def synthetic(n, seed=0, max_len=60):
    """n examples of random lengths in [4, max_len): prompt, trace, answer."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(4, max_len))
        toks = rng.integers(1, 500, k)
        a, b = k // 2, k // 2 + k // 4
        out.append(make_example([(toks[:a], Role.PROMPT), (toks[a:b], Role.ABSTRACT), (toks[b:], Role.ANSWER)],
                                example_id=f"s{i}", phase="A"))
    return out


def segments(batch):
    """Every packed example of a batch as (tokens, roles, targets, loss_mask) tuples, checking the
    per-segment contract on the way."""
    found = []
    for r in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][r]
        pad = seg == 0
        assert not np.any(batch["tokens"][r][pad]) and not np.any(batch["targets"][r][pad])
        assert not np.any(batch["loss_mask"][r][pad]) and np.all(batch["roles"][r][pad] == Role.PROMPT)
        ids = [s for s in np.unique(seg) if s]
        assert ids == list(range(1, len(ids) + 1))
        for s in ids:
            where = np.flatnonzero(seg == s)
            assert np.array_equal(where, np.arange(where[0], where[0] + len(where)))  # contiguous
            assert np.array_equal(batch["positions"][r][where], np.arange(len(where)))
            found.append(tuple(tuple(batch[k][r][where].tolist()) for k in ("tokens", "roles", "targets", "loss_mask")))
    return found


def key(ex):
    return tuple(tuple(a.tolist()) for a in (ex.tokens, ex.roles, ex.targets, ex.loss_mask))


def test_batches_follow_the_contract_and_hold_each_example_once():
    examples = synthetic(57)
    ds = make_dataset(examples, batch_size=1, seq_len=64, window=16, num_epochs=1, shard_index=0, shard_count=1)
    batches = list(ds)
    for b in batches:
        assert set(b) == set(BATCH_KEYS) and all(v.shape == (1, 64) for v in b.values())
        assert b["loss_mask"].dtype == np.float32 and all(b[k].dtype == np.int32 for k in BATCH_KEYS if k != "loss_mask")
    found = [s for b in batches for s in segments(b)]
    assert collections.Counter(found) == collections.Counter(key(e) for e in examples)
    tokens = sum(len(e) for e in examples)
    assert np.mean([packing_efficiency(b) for b in batches]) == pytest.approx(tokens / (64 * len(batches)))
    assert packing_efficiency({"segment_ids": np.array([[1, 1, 2, 0]])}) == 0.75


def test_packed_loss_equals_unpacked_token_mean(phase_a, phase_b, two_layers):
    examples = phase_a + phase_b
    ds = make_dataset(examples, batch_size=2, seq_len=SEQ_LEN, window=64, num_epochs=1, shard_index=0, shard_count=1)
    batches = list(ds)
    assert sum(len(segments(b)) for b in batches) == len(examples)  # none dropped at the end

    def weighted_ce(batch):
        """Per row: (sum of loss_mask-weighted cross entropy, sum of loss_mask)."""
        ce = optax.softmax_cross_entropy_with_integer_labels(two_layers(batch), batch["targets"])
        return np.stack([np.sum(ce * batch["loss_mask"], axis=1), np.sum(batch["loss_mask"], axis=1)], axis=1)

    empty = {k: np.zeros_like(v[:1]) for k, v in batches[0].items()}  # all padding: no loss
    rows = 2 * len(batches)
    assert rows <= len(examples)
    packed = weighted_ce(stack(batches + [empty] * (len(examples) - rows)))  # same shape as below: one compile
    alone = weighted_ce(stack([single(e) for e in examples]))
    assert packed[:, 1].sum() == alone[:, 1].sum() > 0
    packed_loss = packed[:, 0].sum() / packed[:, 1].sum()
    unpacked_loss = alone[:, 0].sum() / alone[:, 1].sum()
    assert packed_loss == pytest.approx(unpacked_loss, rel=1e-6)
    # The loss of the first batch alone equals the token mean over exactly its examples.
    index = {key(e): i for i, e in enumerate(examples)}
    members = [index[s] for s in segments(batches[0])]
    first = packed[:2].sum(axis=0)
    assert first[0] / first[1] == pytest.approx(alone[members, 0].sum() / alone[members, 1].sum(), rel=1e-6)


@pytest.mark.parametrize("tok", TOKENIZER_DIRS, indirect=True)
def test_built_examples_pack_whole(tok, phase_a, phase_b):
    """Phase A and B sequences with each tokenizer's token counts: every one packed once, whole."""
    examples = phase_a + phase_b
    batches = list(make_dataset(examples, batch_size=1, seq_len=SEQ_LEN, window=64, num_epochs=1,
                                shard_index=0, shard_count=1))
    assert collections.Counter(s for b in batches for s in segments(b)) == collections.Counter(map(key, examples))
    tokens = sum(len(e) for e in examples)
    assert np.mean([packing_efficiency(b) for b in batches]) == pytest.approx(tokens / (SEQ_LEN * len(batches)))
    assert len(batches) < len(examples)  # rows hold several examples


def take(it, n):
    return [next(it) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_iterator_resumes_exactly_from_saved_state():
    examples = synthetic(23, seed=1)
    ds = make_dataset(examples, batch_size=2, seq_len=64, window=5, seed=7, shard_index=0, shard_count=1)
    reference = take(iter(ds), 30)  # several windows and epochs
    for k in (0, 1, 3, 4, 11, 17):
        it = iter(ds)
        take(it, k)
        state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
        following = take(it, 8)
        assert same(following, reference[k:k + 8])
        restored = iter(ds)
        restored.set_state(state)
        assert same(take(restored, 8), following), k


def test_exhausted_stays_exhausted():
    examples = synthetic(30, seed=4)
    it = iter(PackIterDataset(grain.MapDataset.source(examples).to_iter_dataset(), seq_len=64, window=8))
    rows = []
    with pytest.raises(StopIteration):
        while True:
            rows.append(next(it))
    for _ in range(3):
        with pytest.raises(StopIteration):
            next(it)
    assert collections.Counter(s for r in rows for s in segments(stack([r]))) == collections.Counter(map(key, examples))
    # The same through make_dataset, whose last partial batch is dropped.
    make = lambda b: iter(make_dataset(examples, batch_size=b, seq_len=64, window=8, num_epochs=1,
                                       shard_index=0, shard_count=1))
    it = make(4)
    batches = list(it)
    assert len(batches) == len(list(make(1))) // 4
    with pytest.raises(StopIteration):
        next(it)


def test_deterministic_under_seed_and_reshuffled_each_epoch():
    examples = synthetic(20, seed=2)
    make = lambda seed: make_dataset(examples, batch_size=1, seq_len=64, window=1, seed=seed,
                                     num_epochs=2, shard_index=0, shard_count=1)
    assert same(list(make(3)), list(make(3)))
    assert not same(list(make(3)), list(make(4)))
    order = [segments(b)[0] for b in make(3)]  # window 1: one example per row
    first, second = order[:20], order[20:]
    assert sorted(first) == sorted(second) == sorted(key(e) for e in examples)
    assert first != second


def test_shards_are_disjoint_equal_and_cover():
    examples = synthetic(21, seed=3)
    shards = [
        [s for b in make_dataset(examples, batch_size=1, seq_len=64, window=4, num_epochs=1, shard_index=i,
                                 shard_count=2) for s in segments(b)]
        for i in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 10  # 21 // 2 each, one left over
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) <= {key(e) for e in examples}
    with pytest.raises(ValueError, match="shard_index=2"):
        make_dataset(examples, batch_size=1, seq_len=64, shard_index=2, shard_count=2)
    # Without explicit shards: this process of jax.process_count().
    assert jax.process_count() == 1
    assert len(list(make_dataset(examples, batch_size=1, seq_len=64, window=1, num_epochs=1))) == 21


def test_example_longer_than_seq_len_is_a_clear_error():
    examples = synthetic(3, max_len=20) + [make_example([(np.arange(1, 41), Role.ANSWER)], example_id="long", phase="A")]
    with pytest.raises(ValueError, match="example 'long' .40 tokens. does not fit in seq_len=32"):
        list(make_dataset(examples, batch_size=1, seq_len=32, num_epochs=1, shard_index=0, shard_count=1))
