"""Dolci-Think parsing on a fixture shaped like the real rows (tests/data/dolci_fixture.jsonl)."""
import collections
import json

import pytest
from conftest import DATA_DIR

from abscot_jax.data.dolci import DataError, load_dolci, parse_row, split_think

FIXTURE = DATA_DIR / "dolci_fixture.jsonl"

# Hand-counted from the fixture: one reason per skipped row (19 of 33).
EXPECTED_SKIPS = {
    "malformed_think_tags": 5,  # missing <think>, missing </think>, doubled, text before, reversed
    "non_string_content": 3,  # list of parts, null, a number
    "no_think_block": 2,
    "empty_cot": 2,  # "<think>\n\n</think>", "<think></think>"
    "empty_answer": 1,
    "no_final_assistant": 1,
    "no_user_turn": 1,
    "bad_messages": 1,  # empty list
    "unsupported_role": 1,  # a tool message
    "reserved_token_in_text": 1,  # <|im_end|> inside the answer
    "duplicate_id": 1,  # a second "k01"
}
EXPECTED_IDS = ["k01", "k02", "k03", "k04", "k05", "k06", "k07", "row8", "k09", "k10", "k11", "k12", "k13", "k14"]


@pytest.fixture(scope="module")
def loaded():
    return load_dolci(FIXTURE, verbose=False)


def test_fixture_counts_and_kept_ids(loaded, capsys):
    examples, skipped = loaded
    assert skipped == collections.Counter(EXPECTED_SKIPS)
    assert [e.id for e in examples] == EXPECTED_IDS
    assert len(examples) + sum(skipped.values()) == sum(1 for _ in open(FIXTURE))

    load_dolci(FIXTURE)  # verbose: the counts as one line
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert out[0].startswith("dolci: kept 14 of 33 rows; skipped 19 (")
    assert "malformed_think_tags=5" in out[0] and "duplicate_id=1" in out[0]


def test_fixture_examples(loaded):
    ex = {e.id: e for e in loaded[0]}
    assert ex["k01"].prompt_messages == ({"role": "user", "content": "What is 2 + 2?"},)
    assert ex["k01"].cot == "I add the two numbers.\n2 + 2 = 4."
    assert ex["k01"].answer == "The answer is \\boxed{4}."
    assert ex["k01"].source == "tulu_math"
    # Odd whitespace around and inside the tags, no newline after </think>.
    assert (ex["k02"].cot, ex["k02"].answer) == ("Primes above 10: 11 is prime.", "11")
    # CRLF line ends become LF.
    assert (ex["k03"].cot, ex["k03"].answer) == ("step one: 3\nstep two: 3 + 4 = 7", "Final: 7")
    assert ex["k04"].prompt_messages[0] == {"role": "system", "content": "You are a careful math tutor."}
    # Multi-turn: everything before the final assistant turn; history loses its think block.
    assert ex["k05"].prompt_messages == (
        {"role": "user", "content": "Let x = 3."},
        {"role": "assistant", "content": "OK, x = 3."},
        {"role": "user", "content": "What is x squared?"},
    )
    assert (ex["k05"].cot, ex["k05"].answer) == ("x = 3 so x^2 = 9.", "9")
    assert ex["k06"].prompt_messages[1] == {"role": "assistant", "content": "Hello! How can I help?"}
    assert ex["k07"].cot == "First 1 + 2 = 3.\n\n\n\tThen 3 + 3 = 6.\n\n\tThen 6 + 4 = 10."
    assert ex["row8"].cot == "10 / 2 = 5"  # no id: named by its position, counting from 1
    assert ex["k09"].answer == "$\\boxed{\\frac{5}{6}}$"
    assert ex["k11"].source == ""  # null dataset_source
    assert ex["k12"].answer.startswith("```python\ndef double(x):\n    return 2 * x")
    assert ex["k13"].prompt_messages == ({"role": "user", "content": "What is 5 - 3?"},)  # extra keys dropped
    assert ex["k14"].prompt_messages[0] == {"role": "system", "content": ""}


def test_multi_turn_can_be_skipped():
    examples, skipped = load_dolci(FIXTURE, multi_turn=False, verbose=False)
    assert skipped["multi_turn"] == 2
    assert [e.id for e in examples] == [i for i in EXPECTED_IDS if i not in ("k05", "k06")]


def test_too_long_by_chars():
    examples, skipped = load_dolci(FIXTURE, max_chars=200, verbose=False)
    assert skipped["too_long"] == 1  # only k10 (about 700 characters) is longer
    assert "k10" not in [e.id for e in examples]
    assert load_dolci(FIXTURE, limit=3, verbose=False)[0][-1].id == "k03"


@pytest.mark.parametrize("content, expected", [
    ("<think>a</think>b", ("a", "b")),
    ("\n <think>\n\n a \n b \n</think>\n\n\n c \n", ("a \n b", "c")),
    ("no tags", "no_think_block"),
    ("a</think>b", "malformed_think_tags"),
    ("<think>a b", "malformed_think_tags"),
    ("<think>a</think><think>b</think>c", "malformed_think_tags"),
    ("x<think>a</think>b", "malformed_think_tags"),
    ("</think>a<think>b", "malformed_think_tags"),
    ("<think> \n </think>b", "empty_cot"),
    ("<think>a</think> \n ", "empty_answer"),
])
def test_split_think(content, expected):
    assert split_think(content) == expected


def test_parse_row_reasons():
    user = {"role": "user", "content": "q"}
    good = {"role": "assistant", "content": "<think>c</think>a"}
    assert parse_row({"messages": None}) == "bad_messages"
    assert parse_row({"messages": [{"role": "user"}, good]}) == "bad_messages"
    assert parse_row({"messages": [user, {"role": "assistant", "content": ["x"]}]}) == "non_string_content"
    assert parse_row({"messages": [{"role": "system", "content": "s"}, user, user, good]}, multi_turn=False) == "multi_turn"
    assert parse_row({"messages": [{"role": "user", "content": "<beginabstract>"}, good]}) == "reserved_token_in_text"
    ok = parse_row({"id": 7, "messages": [user, good]})
    assert (ok.id, ok.cot, ok.answer, ok.prompt_messages) == ("7", "c", "a", (user,))


def test_every_qwen3_added_token_in_text_skips_the_row(qwen3_tokenizer_dir):
    """Each string Qwen3's tokenizer turns into one added token (ids from 151643) is reserved in any
    message; the think tags only outside assistant turns, where they are the row's format."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))
    added = sorted(t for t, i in tokenizer.get_added_vocab().items() if i >= 151643)
    assert len(added) == 26
    user = {"role": "user", "content": "q"}
    for token in added:
        assert tokenizer.convert_tokens_to_ids(token) in tokenizer.encode(f"see {token} here")
        row = {"messages": [{"role": "user", "content": f"see {token} here"},
                            {"role": "assistant", "content": "<think>c</think>a"}]}
        assert parse_row(row) == "reserved_token_in_text", token
        answer = {"role": "assistant", "content": f"<think>c</think>the answer {token}"}
        assert parse_row({"messages": [user, answer]}) == (
            "malformed_think_tags" if token in ("<think>", "</think>") else "reserved_token_in_text"), token


def test_parquet_goes_through_the_same_path(loaded, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Parquet needs one type per column: keep the rows whose contents are all strings.
    rows = [json.loads(line) for line in open(FIXTURE)]
    rows = [r for r in rows if r["messages"] and all(isinstance(m.get("content"), str) for m in r["messages"])]
    for r in rows:
        r["messages"] = [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part.parquet")
    examples, skipped = load_dolci(tmp_path, verbose=False)  # a folder of parquet files
    assert examples == loaded[0]
    assert skipped["non_string_content"] == 0
    assert sum(skipped.values()) == sum(loaded[1].values()) - EXPECTED_SKIPS["non_string_content"] - 1  # - the empty list


def test_missing_file_is_one_clear_line(tmp_path):
    with pytest.raises(DataError, match="no such file") as info:
        load_dolci(tmp_path / "nope.jsonl")
    assert "\n" not in str(info.value)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no .jsonl"):
        load_dolci(tmp_path)
    # A hub id goes to datasets.load_dataset; offline (as in every test) it fails in one line.
    with pytest.raises(DataError, match="cannot load 'nobody/no-such-dataset'") as info:
        load_dolci("nobody/no-such-dataset")
    assert "\n" not in str(info.value)
    # A line that is not JSON: the message names its row, counting from 1 (the third line here).
    good = FIXTURE.read_text().splitlines()[0]
    (tmp_path / "broken.jsonl").write_text(f"{good}\n{good}\n{{not json\n")
    with pytest.raises(DataError, match=r"in row 3\)$") as info:
        load_dolci(tmp_path / "broken.jsonl")
    assert "\n" not in str(info.value)
