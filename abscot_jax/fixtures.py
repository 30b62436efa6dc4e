"""Offline fixtures: a byte-level BPE tokenizer with Qwen3's special tokens and chat template, and
random Qwen3 checkpoints of any shape, written without torch. Used by the tests and the demo
(no hub access anywhere)."""
from __future__ import annotations

import random
from pathlib import Path

INIT_STD = 0.02  # transformers' initializer_range for Qwen3
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen2/3's pre-tokenisation: single digits, words with an optional leading non-letter, ...
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A Qwen3-style chat template with the `enable_thinking` switch: thinking off pre-fills an empty
# think block in the generation prompt, as Qwen3's own template does.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

_WORDS = (
    "the a of to and is in that it for on with as are be this by what find how many sum total "
    "number value answer step first then next so therefore let we compute add subtract multiply "
    "divide equal equals result digits running mod modulo remainder problem solve question please "
    "reason put your final within boxed think prime square root fraction triangle circle area angle "
    "degrees length width height probability integer real positive negative even odd"
).split()
_SYMBOLS = list("0123456789+-*/=()[]{}^\\$.,:;!?<>|_'\"") + ["\\frac", "\\sqrt", "\\boxed", "\\pi", "\\cdot"]


def _corpus(lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(4, 20)
        parts = [rng.choice(_WORDS) if rng.random() < 0.6 else rng.choice(_SYMBOLS) for _ in range(n)]
        out.append(" ".join(parts) + rng.choice(["", "\n", "\n\n", "."]))
    return out


def qwen_pre_tokenizer():
    """Qwen2/3's pre-tokenisation: split by QWEN_SPLIT_PATTERN, then map bytes to the byte-level
    BPE characters."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def make_tokenizer(out_dir: str | Path | None = None, *, vocab_size: int = 512, seed: int = 0):
    """Train a byte-level BPE tokenizer offline; returns a `PreTrainedTokenizerFast` (saved if out_dir)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = qwen_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(3000, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    # <think> and </think> are ordinary (non-special) added tokens in Qwen3: they survive decoding.
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def make_checkpoint(
    out_dir: str | Path,
    *,
    vocab_size: int | None = None,
    tokenizer_vocab_size: int = 512,
    spare_rows: int = 128,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int | None = None,
    tie_word_embeddings: bool = True,
    rope_theta: float = 1_000_000.0,
    max_shard_size: str | None = None,
    dtype: str = "float32",
    seed: int = 0,
    with_tokenizer: bool = True,
) -> Path:
    """A random Qwen3 HF checkpoint (+ tokenizer) in `out_dir` (replaced if it exists), written by
    this package's own safetensors writer: no torch needed. Weights are drawn as transformers
    initialises Qwen3 (normal, std INIT_STD; the padding token's embedding row zero), norms as
    1 + 0.1 * normal (not all ones, so that a swapped or missed norm shows in the logits). The
    embedding has `spare_rows` rows beyond the tokenizer's vocabulary, as Qwen3's real
    checkpoints do, unless `vocab_size` is given. One `model.safetensors` unless `max_shard_size`
    asks for shards."""
    import numpy as np

    from abscot_jax.checkpoint.hf import write_hf_dir
    from abscot_jax.checkpoint.safetensors_io import INDEX_FILE, SINGLE_FILE
    from abscot_jax.model.config import Qwen3Config
    from abscot_jax.model.hf_names import hf_tensor_specs

    out_dir = Path(out_dir)
    tokenizer = make_tokenizer(vocab_size=tokenizer_vocab_size, seed=seed)
    if vocab_size is None:
        vocab_size = len(tokenizer) + spare_rows
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                      num_key_value_heads=num_key_value_heads, head_dim=head_dim or hidden_size // num_attention_heads,
                      tie_word_embeddings=tie_word_embeddings, rope_theta=rope_theta, max_position_embeddings=4096)
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = {"bos_token_id": None, "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"), "pad_token_id": pad_id}

    def tensors():
        for n, spec in enumerate(hf_tensor_specs(cfg)):
            rng = np.random.default_rng([seed, n])  # each tensor its own stream: any order gives the same weights
            if spec.param.endswith("norm"):
                yield spec.hf_name, 1.0 + 0.1 * rng.standard_normal(spec.shape, np.float32)
                continue
            value = INIT_STD * rng.standard_normal(spec.shape, np.float32)
            if spec.param == "embed":
                value[pad_id] = 0.0
            yield spec.hf_name, value

    write_hf_dir(cfg, tensors(), out_dir, dtype=dtype, max_shard_size=max_shard_size or "1TB",
                 base_config={**ids, "initializer_range": INIT_STD}, tokenizer=tokenizer if with_tokenizer else None,
                 overwrite=True)
    if max_shard_size is None:  # one file, as save_pretrained writes a small model
        (out_dir / INDEX_FILE).unlink()
        next(out_dir.glob("model-*.safetensors")).rename(out_dir / SINGLE_FILE)
    return out_dir
