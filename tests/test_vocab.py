"""Abstract vocabulary: tokenizer extension and new-row initialisation (issue 2, item 4)."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from abscot_jax.data.roles import Role
from abscot_jax.fixtures import QWEN_SPECIAL_TOKENS, make_tokenizer
from abscot_jax.model.config import Qwen3Config
from abscot_jax.model.qwen3 import Qwen3
from abscot_jax.vocab import (
    ABSTRACT_TOKENS, BEGIN_ABSTRACT, END_ABSTRACT, NEW_TOKENS, AbstractVocab, VocabError, abstract_vocab,
    add_abstract_tokens, init_new_rows, prepare_model_vocab,
)

N0 = 512  # make_tokenizer's default size: the original vocabulary
HIDDEN = 64


@pytest.fixture(scope="module")
def base_tokenizer():
    return make_tokenizer()


@pytest.fixture
def tok(base_tokenizer):
    # A fresh copy per test, as the tests extend it (the session `tiny_tokenizer` must not change).
    tokenizer = copy.deepcopy(base_tokenizer)
    assert len(tokenizer) == N0
    return tokenizer


def make_model(vocab_size: int, tied: bool, param_dtype: str = "float32") -> Qwen3:
    cfg = Qwen3Config(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied,
        param_dtype=param_dtype,
    )
    return Qwen3(cfg, rngs=nnx.Rngs(0))


def rows_of(model) -> tuple[np.ndarray, np.ndarray | None]:
    """Host copies of the embedding [V, D] and the untied head as rows [V, D]."""
    head = None if model.lm_head is None else np.asarray(model.lm_head[...]).T
    return np.asarray(model.embed[...]), head


def forward(model, tokens):
    tokens = jnp.asarray([tokens], jnp.int32)
    t = tokens.shape[1]
    return model(tokens, jnp.arange(t)[None], jnp.ones((1, t), jnp.int32), jnp.full((1, t), Role.ABSTRACT))


# ---- tokenizer ---------------------------------------------------------------------------------

def test_new_ids_contiguous_after_original_vocabulary(tok):
    special_before = {name: tok.get_vocab()[name] for name in QWEN_SPECIAL_TOKENS}
    vocab = add_abstract_tokens(tok)
    assert vocab == AbstractVocab(tuple(range(512, 576)), begin_id=576, end_id=577, original_size=512)
    assert vocab.all_new_ids == tuple(range(512, 578))
    assert vocab.rows_needed == 578
    assert len(tok) == 578
    # Existing tokens keep their ids, and the existing special tokens stay registered.
    assert {name: tok.get_vocab()[name] for name in QWEN_SPECIAL_TOKENS} == special_before
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert {"<|im_end|>", "<|endoftext|>", "<TOKEN_A>", BEGIN_ABSTRACT} <= set(tok.all_special_tokens)


def test_each_new_token_is_one_id_and_decodes_back(tok):
    vocab = add_abstract_tokens(tok)
    assert len(NEW_TOKENS) == 66 and NEW_TOKENS[:64] == ABSTRACT_TOKENS
    for name, token_id in zip(NEW_TOKENS, vocab.all_new_ids):
        assert tok.encode(name, add_special_tokens=False) == [token_id], name
        assert tok.decode([token_id]) == name
    assert tok.encode(BEGIN_ABSTRACT, add_special_tokens=False) == [576]
    assert tok.encode(END_ABSTRACT, add_special_tokens=False) == [577]


def test_trace_text_tokenizes_to_exactly_its_ids(tok):
    add_abstract_tokens(tok)
    trace = "<beginabstract><TOKEN_A><TOKEN_BL><endabstract>"
    # <TOKEN_A> is the first abstract id (512), <TOKEN_BL> the 64th (575).
    assert tok.encode(trace, add_special_tokens=False) == [576, 512, 575, 577]
    # Inside text, the text around it tokenizes as it would alone.
    text = "so the sum is" + trace + " 7"
    expected = tok.encode("so the sum is", add_special_tokens=False) + [576, 512, 575, 577] \
        + tok.encode(" 7", add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=False) == expected
    assert tok.decode(expected) == text


def test_adding_twice_changes_nothing(tok):
    first = add_abstract_tokens(tok)
    state = tok.backend_tokenizer.to_str()  # the whole tokenizer.json
    special = list(tok.all_special_tokens)
    second = add_abstract_tokens(tok)
    assert second == first
    assert len(tok) == 578
    assert abstract_vocab(tok) == first
    assert tok.backend_tokenizer.to_str() == state
    assert list(tok.all_special_tokens) == special


def test_save_load_round_trips_the_ids(tok, tmp_path):
    from transformers import AutoTokenizer

    vocab = add_abstract_tokens(tok)
    tok.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(loaded) == 578
    assert abstract_vocab(loaded) == vocab  # original_size read back as the first abstract id: 512
    assert loaded.encode("<beginabstract><TOKEN_A><TOKEN_BL><endabstract>", add_special_tokens=False) == [576, 512, 575, 577]
    assert add_abstract_tokens(loaded) == vocab and len(loaded) == 578


def test_missing_tokens_give_a_clear_error(tok):
    with pytest.raises(VocabError, match=r"^tokenizer has no abstract tokens; run add_abstract_tokens "
                                         r"\(train does it when model.add_abstract_vocab is set\)$"):
        abstract_vocab(tok)


def test_partially_extended_tokenizer_is_refused(tok):
    tok.add_tokens(["<TOKEN_A>"], special_tokens=True)
    with pytest.raises(VocabError, match="1 of the 66 abstract tokens"):
        add_abstract_tokens(tok)


# ---- model rows --------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_spare_rows_are_reinitialised_in_place_and_others_untouched(tok, tied):
    vocab = add_abstract_tokens(tok)
    model = make_model(N0 + 128, tied)  # 128 spare rows, like Qwen3-4B's 267
    embed0, head0 = rows_of(model)
    init_new_rows(model, vocab, sigma=0.02, seed=0)
    embed1, head1 = rows_of(model)

    assert model.config.vocab_size == 640 and embed1.shape == (640, HIDDEN)
    new = np.zeros(640, bool)
    new[512:578] = True
    for before, after in [(embed0, embed1)] + ([] if tied else [(head0, head1)]):
        # Every other row, including the spare rows 578..639 beyond the new ids, keeps its bits.
        np.testing.assert_array_equal(after[~new], before[~new])
        # New rows: the mean of the 512 trained rows plus N(0, 0.02). 66 x 64 = 4224 draws: the
        # sample std is within ~1% of sigma and the sample mean within ~3e-4 of 0 (1 sd).
        residual = after[new] - before[:512].astype(np.float64).mean(axis=0)
        assert abs(residual.std() - 0.02) < 0.02 * 0.05
        assert abs(residual.mean()) < 0.02 * 4 / np.sqrt(residual.size)
    if not tied:
        assert model.lm_head[...].shape == (HIDDEN, 640)
        assert not np.allclose(embed1[new], head1[new])  # independent noise for the head


@pytest.mark.parametrize("tied", [True, False])
def test_new_rows_are_the_mean_of_trained_rows_only(tok, tied):
    vocab = add_abstract_tokens(tok)
    model = make_model(N0 + 128, tied)
    # Hand-made weights: trained row r is all r, spare rows all -1000. The mean of rows 0..511 is
    # 255.5; a mean that leaked into the spare rows would be far off.
    table = np.where(np.arange(640)[:, None] < 512, np.arange(640)[:, None], -1000.0) * np.ones((1, HIDDEN))
    model.embed.set_value(jnp.asarray(table, jnp.float32))
    if not tied:
        model.lm_head.set_value(jnp.asarray(2 * table.T, jnp.float32))
    init_new_rows(model, vocab, sigma=0.0)
    embed, head = rows_of(model)
    np.testing.assert_array_equal(embed[512:578], np.full((66, HIDDEN), 255.5, np.float32))
    np.testing.assert_array_equal(embed[578:], np.full((62, HIDDEN), -1000.0, np.float32))
    if not tied:
        np.testing.assert_array_equal(head[512:578], np.full((66, HIDDEN), 511.0, np.float32))


def test_seed_and_sigma_are_honoured(tok):
    vocab = add_abstract_tokens(tok)
    a, b, c = (make_model(N0 + 128, True) for _ in range(3))
    init_new_rows(a, vocab, sigma=0.1, seed=0)
    init_new_rows(b, vocab, sigma=0.1, seed=1)
    init_new_rows(c, vocab, sigma=0.1, seed=0)
    ea, eb, ec = (rows_of(m)[0][512:578] for m in (a, b, c))
    np.testing.assert_array_equal(ea, ec)
    assert not np.allclose(ea, eb)
    assert abs((ea - ea.mean(axis=0)).std() - 0.1) < 0.1 * 0.05


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False])
def test_model_without_spare_rows_is_grown(tok, tied):
    vocab = add_abstract_tokens(tok)
    model = make_model(N0, tied)  # no spare rows: ids 512..577 do not fit
    embed0, head0 = rows_of(model)
    old_tokens = tok.encode("so the sum is 7", add_special_tokens=False)
    logits0 = np.asarray(forward(model, old_tokens))

    init_new_rows(model, vocab, sigma=0.02)
    embed1, head1 = rows_of(model)
    assert model.config.vocab_size == 578
    assert embed1.shape == (578, HIDDEN)
    np.testing.assert_array_equal(embed1[:512], embed0)
    assert abs((embed1[512:] - embed0.mean(axis=0)).std() - 0.02) < 0.02 * 0.05
    if not tied:
        assert model.lm_head[...].shape == (HIDDEN, 578)
        np.testing.assert_array_equal(head1[:512], head0)
        assert abs((head1[512:] - head0.mean(axis=0)).std() - 0.02) < 0.02 * 0.05

    # The forward takes the new ids and scores all 578 tokens; old tokens score as before.
    trace = tok.encode("<beginabstract><TOKEN_A><TOKEN_BL><endabstract>", add_special_tokens=False)
    logits = np.asarray(forward(model, old_tokens + trace))
    assert logits.shape == (1, len(old_tokens) + 4, 578) and np.isfinite(logits).all()
    np.testing.assert_allclose(logits[0, :len(old_tokens), :512], logits0[0], rtol=1e-5, atol=1e-5)


def test_growth_pads_to_a_multiple_and_initialises_the_padding(tok):
    vocab = add_abstract_tokens(tok)
    model = make_model(N0, tied=False)
    embed0, _ = rows_of(model)
    init_new_rows(model, vocab, sigma=0.0, pad_to_multiple_of=64)
    embed1, head1 = rows_of(model)
    assert model.config.vocab_size == 640 and embed1.shape == (640, HIDDEN) and head1.shape == (640, HIDDEN)
    np.testing.assert_array_equal(embed1[:512], embed0)
    # The 62 padding rows (never produced by the tokenizer) get the same mean, not zeros.
    np.testing.assert_allclose(embed1[512:], np.broadcast_to(embed0.mean(axis=0), (128, HIDDEN)), atol=1e-7)


@pytest.mark.slow
def test_sharding_is_kept_in_place_and_when_growing(tok):
    vocab = add_abstract_tokens(tok)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tensor"))
    embed_sharding = NamedSharding(mesh, P("tensor", "fsdp"))
    head_sharding = NamedSharding(mesh, P("fsdp", "tensor"))
    for vocab_size, expected_rows in [(N0 + 128, 640), (N0 + 8, 580)]:
        # 520 rows: 578 are needed, rounded up to a multiple of the 4 vocabulary shards.
        model = make_model(vocab_size, tied=False)
        model.embed.set_value(jax.device_put(model.embed[...], embed_sharding))
        model.lm_head.set_value(jax.device_put(model.lm_head[...], head_sharding))
        embed0, _ = rows_of(model)
        init_new_rows(model, vocab)
        assert model.config.vocab_size == expected_rows
        assert model.embed[...].shape == (expected_rows, HIDDEN)
        assert model.embed[...].sharding == embed_sharding
        assert model.lm_head[...].sharding == head_sharding
        np.testing.assert_array_equal(rows_of(model)[0][:512], embed0[:512])


@pytest.mark.slow
def test_bf16_params_stay_bf16(tok):
    vocab = add_abstract_tokens(tok)
    model = make_model(N0 + 128, tied=True, param_dtype="bfloat16")
    before = rows_of(model)[0]
    init_new_rows(model, vocab, sigma=0.0)
    after = model.embed[...]
    assert after.dtype == jnp.bfloat16
    mean = jnp.asarray(before[:512].astype(np.float32).mean(axis=0)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(after[512:578]), np.broadcast_to(np.asarray(mean), (66, HIDDEN)))
    np.testing.assert_array_equal(np.asarray(after[578:]), before[578:])


@pytest.mark.parametrize("vocab_size", [N0 + 128, N0])
def test_init_rows_twice_equals_once(tok, vocab_size):
    vocab = add_abstract_tokens(tok)
    once, twice = make_model(vocab_size, tied=False), make_model(vocab_size, tied=False)
    init_new_rows(once, vocab, pad_to_multiple_of=64)
    init_new_rows(twice, vocab, pad_to_multiple_of=64)
    init_new_rows(twice, vocab, pad_to_multiple_of=64)
    assert twice.config == once.config
    for a, b in zip(rows_of(once), rows_of(twice)):
        np.testing.assert_array_equal(a, b)


def test_prepare_model_vocab_runs_once(tok):
    model = make_model(N0, tied=True)
    vocab, initialised = prepare_model_vocab(model, tok, sigma=0.02, seed=0)
    assert initialised and vocab.original_size == 512 and model.config.vocab_size == 578
    # "Training" moves the abstract rows; preparing again (e.g. the next round, with the
    # tokenizer saved beside the model) must keep them.
    trained = model.embed[...].at[512:578].add(1.0)
    model.embed.set_value(trained)
    again, initialised = prepare_model_vocab(model, tok, sigma=0.02, seed=0)
    assert again == vocab and not initialised
    assert len(tok) == 578 and model.config.vocab_size == 578
    np.testing.assert_array_equal(np.asarray(model.embed[...]), np.asarray(trained))


def test_prepare_refuses_a_tokenizer_from_another_model(tok, base_tokenizer):
    add_abstract_tokens(tok)
    with pytest.raises(VocabError, match="only 512 embedding rows"):
        prepare_model_vocab(make_model(N0, tied=True), tok)
    fresh = copy.deepcopy(base_tokenizer)
    with pytest.raises(VocabError, match="model has 500 embedding rows but the tokenizer 512 tokens"):
        prepare_model_vocab(make_model(500, tied=True), fresh)
    assert len(fresh) == 512  # left as it was
