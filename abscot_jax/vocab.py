"""The abstract vocabulary: 64 trace tokens and two delimiters, added as special tokens.

Two explicit steps, never a side effect of conversion:

1. `add_abstract_tokens(tokenizer)` adds the 66 tokens right after the original vocabulary
   (ids `len(tokenizer)` .. `len(tokenizer) + 65`). Idempotent.
2. `init_new_rows(model, vocab)` sets the embedding rows (and untied head columns) of those ids
   to the mean of the trained rows plus N(0, sigma) noise, growing the model when it has no
   spare rows. Each row's noise depends only on (seed, id), so running it twice equals once.

`prepare_model_vocab(model, tokenizer)` runs both, once. "Already done" is read from the
tokenizer: the tokenizer is saved beside every checkpoint we write, and the only way our code
extends it is this function, which initialises the rows in the same call. So a tokenizer that
already has the abstract tokens belongs to a model whose rows were initialised (and perhaps
trained since): those rows are left alone.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import string

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, SingleDeviceSharding

_LETTERS = string.ascii_uppercase
# <TOKEN_A> .. <TOKEN_Z>, <TOKEN_AA> .. <TOKEN_AZ>, <TOKEN_BA> .. <TOKEN_BL>: 26 + 26 + 12 = 64.
ABSTRACT_TOKENS: tuple[str, ...] = tuple(
    f"<TOKEN_{name}>" for name in [*_LETTERS, *("A" + c for c in _LETTERS), *("B" + c for c in _LETTERS[:12])]
)
BEGIN_ABSTRACT = "<beginabstract>"
END_ABSTRACT = "<endabstract>"
assert len(ABSTRACT_TOKENS) == 64

# In id order: the 64 trace tokens, then the two delimiters.
NEW_TOKENS: tuple[str, ...] = (*ABSTRACT_TOKENS, BEGIN_ABSTRACT, END_ABSTRACT)

MISSING_TOKENS_MESSAGE = (
    "tokenizer has no abstract tokens; run add_abstract_tokens "
    "(train does it when model.add_abstract_vocab is set)"
)


class VocabError(ValueError):
    """A tokenizer or model that cannot carry the abstract vocabulary; the message says why."""


@dataclasses.dataclass(frozen=True)
class AbstractVocab:
    abstract_ids: tuple[int, ...]  # 64 ids, in ABSTRACT_TOKENS order
    begin_id: int
    end_id: int
    original_size: int  # tokenizer size before the abstract tokens (= the first abstract id)

    @property
    def all_new_ids(self) -> tuple[int, ...]:
        """The 66 new ids in NEW_TOKENS order: trace tokens, begin, end."""
        return (*self.abstract_ids, self.begin_id, self.end_id)

    @property
    def rows_needed(self) -> int:
        """Embedding rows a model needs to hold every new id."""
        return max(self.all_new_ids) + 1


# ---- tokenizer --------------------------------------------------------------------------------

def _lookup(tokenizer) -> dict[str, int]:
    """The ids of those NEW_TOKENS the tokenizer knows. `get_vocab()` includes added tokens and,
    unlike `convert_tokens_to_ids`, never maps an unknown token to unk (or None, in transformers 5)."""
    vocab = tokenizer.get_vocab()
    return {name: vocab[name] for name in NEW_TOKENS if name in vocab}


def has_abstract_tokens(tokenizer) -> bool:
    """Whether the tokenizer has the abstract tokens; a tokenizer with only some of them is an error."""
    known = _lookup(tokenizer)
    if known and len(known) != len(NEW_TOKENS):
        missing = [name for name in NEW_TOKENS if name not in known]
        raise VocabError(
            f"tokenizer has {len(known)} of the {len(NEW_TOKENS)} abstract tokens (missing e.g. {missing[0]}); "
            "start again from the base model's tokenizer"
        )
    return bool(known)


def abstract_vocab(tokenizer) -> AbstractVocab:
    """The abstract ids of an already extended tokenizer."""
    if not has_abstract_tokens(tokenizer):
        raise VocabError(MISSING_TOKENS_MESSAGE)
    known = _lookup(tokenizer)  # once: it reads the whole vocabulary (151k entries for Qwen3)
    ids = [known[name] for name in NEW_TOKENS]
    # Contiguous right after the original vocabulary is what lets `original_size` (= first id)
    # tell the trained rows from the new ones.
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise VocabError(
            f"the abstract tokens have ids {ids[0]}..{max(ids)} but are not contiguous in order; "
            "start again from the base model's tokenizer"
        )
    return AbstractVocab(tuple(ids[:64]), ids[64], ids[65], original_size=ids[0])


def add_abstract_tokens(tokenizer) -> AbstractVocab:
    """Add the 64 trace tokens and both delimiters as special tokens, with the ids right after the
    tokenizer's current vocabulary. Existing special tokens are kept. A tokenizer that already has
    them is left unchanged and its ids are returned."""
    if has_abstract_tokens(tokenizer):
        return abstract_vocab(tokenizer)
    original_size = len(tokenizer)
    # transformers 5 renamed additional_special_tokens to extra_special_tokens; replace=False keeps
    # the special tokens already registered. Strings become AddedToken(special=True, normalized=False,
    # no strip), so each is matched verbatim as one id and survives decoding.
    params = inspect.signature(tokenizer.add_special_tokens).parameters
    key = "extra_special_tokens" if "replace_extra_special_tokens" in params else "additional_special_tokens"
    tokenizer.add_special_tokens({key: list(NEW_TOKENS)}, **{f"replace_{key}": False})
    vocab = abstract_vocab(tokenizer)
    if vocab.original_size != original_size:
        raise VocabError(
            f"the abstract tokens got ids from {vocab.original_size}, expected {original_size} = len(tokenizer): "
            "the tokenizer's vocabulary has holes"
        )
    return vocab


# ---- model rows -------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("original_size", "rows", "axis"))
def _init_rows(table, ids, key, sigma, *, original_size: int, rows: int, axis: int):
    """`table` with `rows` entries along `axis` (zero-padded if it had fewer), the entries `ids`
    set to mean(trained entries) + sigma * N(0, 1). Mean and noise are computed in fp32."""
    if table.shape[axis] < rows:
        pad = [(0, 0)] * table.ndim
        pad[axis] = (0, rows - table.shape[axis])
        table = jnp.pad(table, pad)
    trained = jax.lax.slice_in_dim(table, 0, original_size, axis=axis)
    mean = jnp.mean(trained.astype(jnp.float32), axis=axis)  # [hidden]
    # Noise keyed by (seed, id), not by position in `ids`: a row's value does not depend on which
    # other rows are initialised in the same call (so growing, then re-running, changes nothing).
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), mean.shape, jnp.float32))(ids)
    new = (mean + sigma * noise).astype(table.dtype)  # [len(ids), hidden]
    return table.at[ids].set(new) if axis == 0 else table.at[:, ids].set(new.T)


def _vocab_shards(array: jax.Array, axis: int) -> int:
    """How many pieces the array's sharding cuts the vocabulary axis into."""
    return array.shape[axis] // array.sharding.shard_shape(array.shape)[axis]


def _place_like(new: jax.Array, old: jax.Array) -> jax.Array:
    """`new` with the sharding of `old`. jit leaves the output layout to the compiler; put it back.
    A NamedSharding does not depend on the shape, so a grown array keeps its mesh axes too. An
    unsharded array is left where jit put it (with its inputs), committed or not as they were."""
    sharding = old.sharding
    if isinstance(sharding, SingleDeviceSharding):
        return new
    if isinstance(sharding, NamedSharding) or new.shape == old.shape:
        return jax.device_put(new, sharding)
    return new


def init_new_rows(model, vocab: AbstractVocab, *, sigma: float = 0.02, seed: int = 0,
                  pad_to_multiple_of: int | None = None):
    """Initialise the new ids' rows of `model.embed` ([V, D]) and columns of an untied
    `model.lm_head` ([D, V]) to mean(rows < vocab.original_size) + N(0, sigma); every other row
    keeps its bits. A model with fewer rows than `vocab.rows_needed` is grown (to a multiple of
    `pad_to_multiple_of` and of the vocabulary shards, so the original sharding still fits; the
    extra padding rows get the same initialisation) and `model.config.vocab_size` follows.
    Deterministic in (seed, id): running it twice gives the same model as once. Returns `model`."""
    embed = model.embed[...]
    old_rows = embed.shape[0]
    if old_rows < vocab.original_size:
        raise VocabError(
            f"the model has {old_rows} embedding rows but the tokenizer had {vocab.original_size} tokens "
            "before the abstract ones: this tokenizer does not belong to this model"
        )
    heads = [] if model.lm_head is None else [model.lm_head[...]]
    rows = old_rows
    if vocab.rows_needed > old_rows:
        multiple = math.lcm(pad_to_multiple_of or 1, _vocab_shards(embed, 0), *(_vocab_shards(h, 1) for h in heads))
        rows = -(-vocab.rows_needed // multiple) * multiple
    ids = jnp.asarray(sorted(set(vocab.all_new_ids) | set(range(old_rows, rows))), jnp.int32)

    embed_key, head_key = jax.random.split(jax.random.key(seed))
    model.embed.set_value(_place_like(
        _init_rows(embed, ids, embed_key, sigma, original_size=vocab.original_size, rows=rows, axis=0), embed))
    for head in heads:
        model.lm_head.set_value(_place_like(
            _init_rows(head, ids, head_key, sigma, original_size=vocab.original_size, rows=rows, axis=1), head))
    if rows != model.config.vocab_size:
        model.config = model.config.replace(vocab_size=rows)
    return model


def prepare_model_vocab(model, tokenizer, *, sigma: float = 0.02, seed: int = 0,
                        pad_to_multiple_of: int | None = None) -> tuple[AbstractVocab, bool]:
    """Extend the tokenizer and initialise the model's new rows, once. Returns the vocabulary and
    whether rows were initialised now. A tokenizer that already has the abstract tokens marks a
    model already prepared (see the module docstring): nothing changes then, so rows trained since
    are kept. Save the tokenizer with the model."""
    if has_abstract_tokens(tokenizer):
        vocab = abstract_vocab(tokenizer)
        rows = model.embed[...].shape[0]
        if rows < vocab.rows_needed:
            raise VocabError(
                f"the tokenizer already has the abstract tokens (ids up to {vocab.rows_needed - 1}) but the model "
                f"has only {rows} embedding rows: load the tokenizer saved with this model, or the base model's "
                "tokenizer for a base model"
            )
        return vocab, False
    # Check before touching the tokenizer, so a failure leaves both as they were.
    if model.embed[...].shape[0] < len(tokenizer):
        raise VocabError(
            f"the model has {model.embed[...].shape[0]} embedding rows but the tokenizer {len(tokenizer)} tokens: "
            "this tokenizer does not belong to this model"
        )
    vocab = add_abstract_tokens(tokenizer)
    init_new_rows(model, vocab, sigma=sigma, seed=seed, pad_to_multiple_of=pad_to_multiple_of)
    return vocab, True
