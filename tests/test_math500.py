"""Tests for abscot_jax.data.math500 on local files (no network)."""

import json
import os

# No network in tests: datasets and the hub client read these at import time.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from abscot_jax.data.math500 import LoadReport, MathProblem, load_math500, print_summary  # noqa: E402
from abscot_jax.eval.grading import is_correct  # noqa: E402

FIXTURE = Path(__file__).parent / "data" / "math500_fixture.jsonl"
FIELDS = ("problem", "solution", "answer", "subject", "level", "unique_id")


def good_row(i: int, answer: str = "\\frac{1}{2}") -> dict:
    return {
        "problem": f"Problem {i}?",
        "solution": f"So $\\boxed{{{answer}}}$.",
        "answer": answer,
        "subject": "Algebra",
        "level": 2,
        "unique_id": f"test/algebra/{i}.json",
    }


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "hf_cache")  # keep datasets' Arrow cache out of ~/.cache


def test_fixture_loads(cache_dir):
    problems, report = load_math500(str(FIXTURE), cache_dir=cache_dir)
    raw = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    assert len(problems) == len(raw) == 23
    assert report.loaded == report.rows_read == 23 and not report.skipped
    assert all(isinstance(p, MathProblem) for p in problems)
    # every field comes through unchanged, in file order
    assert [tuple(getattr(p, f) for f in FIELDS) for p in problems] == [tuple(r[f] for f in FIELDS) for r in raw]
    assert len({p.unique_id for p in problems}) == 23
    with pytest.raises(AttributeError):  # frozen
        problems[0].answer = "0"


def test_fixture_has_varied_answer_forms():
    answers = [json.loads(line)["answer"] for line in FIXTURE.read_text().splitlines()]
    markers = ["\\frac", "\\sqrt", "\\pi", "\\cup", "[", "\\text{(", "\\text{F", "\\begin{pmatrix}", "&",
               "^\\circ", "\\text{ cm}", "\\%", "\\$", "y =", "_5"]
    for marker in markers:
        assert any(marker in a for a in answers), marker


def test_every_fixture_solution_grades_correct(cache_dir):
    problems, _ = load_math500(str(FIXTURE), cache_dir=cache_dir)
    for p in problems:
        assert is_correct(p.solution, p.answer), p.unique_id


def test_fixture_solutions_do_not_match_other_answers(cache_dir):
    # the grader is not trivially True: each solution against the next problem's answer
    problems, _ = load_math500(str(FIXTURE), cache_dir=cache_dir)
    for p, q in zip(problems, problems[1:] + problems[:1]):
        assert not is_correct(p.solution, q.answer), (p.unique_id, q.answer)


def test_limit_keeps_first_valid_problems(cache_dir):
    problems, report = load_math500(str(FIXTURE), limit=5, cache_dir=cache_dir)
    first_ids = [json.loads(line)["unique_id"] for line in FIXTURE.read_text().splitlines()[:5]]
    assert [p.unique_id for p in problems] == first_ids
    assert report.loaded == 5


def test_malformed_rows_are_skipped_and_counted(tmp_path, cache_dir):
    rows = [
        good_row(0),
        {k: v for k, v in good_row(1).items() if k != "answer"},  # missing answer
        {k: v for k, v in good_row(2).items() if k != "problem"},  # missing problem
        dict(good_row(3), problem=None),  # null problem
        dict(good_row(4), answer="   "),  # empty answer
        good_row(5, answer="(2,3]"),
        dict(good_row(6), unique_id="test/algebra/0.json"),  # duplicate id
        dict(good_row(7), level="Level 4"),  # original MATH style level: kept
        good_row(8, answer="\\text{Friday}"),
    ]
    problems, report = load_math500(str(write_jsonl(tmp_path / "bad.jsonl", rows)), cache_dir=cache_dir)
    assert [p.unique_id for p in problems] == [f"test/algebra/{i}.json" for i in (0, 5, 7, 8)]
    assert [p.answer for p in problems] == ["\\frac{1}{2}", "(2,3]", "\\frac{1}{2}", "\\text{Friday}"]
    assert [p.level for p in problems] == [2, 2, 4, 2]
    assert report.rows_read == 9 and report.loaded == 4
    assert report.skipped == {
        "missing answer": 1,
        "missing problem": 2,
        "empty answer": 1,
        "duplicate unique_id": 1,
    }
    line = report.summary()
    assert "\n" not in line
    assert line.startswith(f"MATH-500 {tmp_path / 'bad.jsonl'}: 4 problems from 9 rows, skipped 5 (")
    assert "missing problem: 2" in line


def test_non_string_answers_are_skipped(tmp_path, cache_dir):
    # Answers that are not valid JSON text stay strings even in a mixed-type column.
    rows = [
        good_row(0),
        dict(good_row(1), answer=5),
        dict(good_row(2), answer=["1"]),
        good_row(3, answer="x \\in [2,5)"),
    ]
    problems, report = load_math500(str(write_jsonl(tmp_path / "mixed.jsonl", rows)), cache_dir=cache_dir)
    assert [p.unique_id for p in problems] == ["test/algebra/0.json", "test/algebra/3.json"]
    assert report.skipped == {"non-string answer": 2}
    assert len(report.warnings) == 1 and "'answer'" in report.warnings[0]


def test_mixed_column_decodes_numeric_strings(tmp_path, cache_dir):
    # Pins the datasets quirk described in the module docstring: next to one numeric answer,
    # the string "42" comes back as the number 42 and its row is skipped; the warning says why.
    rows = [good_row(0, answer="42"), dict(good_row(1), answer=7), good_row(2)]
    problems, report = load_math500(str(write_jsonl(tmp_path / "quirk.jsonl", rows)), cache_dir=cache_dir)
    assert [p.unique_id for p in problems] == ["test/algebra/2.json"]
    assert report.skipped == {"non-string answer": 2}
    assert "write every answer as a JSON string" in report.summary()


def test_clean_numeric_strings_stay_strings(tmp_path, cache_dir):
    rows = [good_row(0, answer="42"), good_row(1, answer="-50"), good_row(2, answer="[-2,7]")]
    problems, report = load_math500(str(write_jsonl(tmp_path / "clean.jsonl", rows)), cache_dir=cache_dir)
    assert [p.answer for p in problems] == ["42", "-50", "[-2,7]"]
    assert not report.skipped and not report.warnings


def test_missing_ids_get_row_ids(tmp_path, cache_dir):
    rows = [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": "4"}]
    problems, _ = load_math500(str(write_jsonl(tmp_path / "noid.jsonl", rows)), cache_dir=cache_dir)
    assert [(p.unique_id, p.solution, p.subject, p.level) for p in problems] == [
        ("row-1", "", "", None),
        ("row-2", "", "", None),
    ]


def test_json_array_and_parquet_go_through_the_same_path(tmp_path, cache_dir):
    rows = [good_row(i) for i in range(3)]
    json_path = tmp_path / "rows.json"
    json_path.write_text(json.dumps(rows))
    from_json, _ = load_math500(str(json_path), cache_dir=cache_dir)
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    parquet_path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet_path)
    from_parquet, _ = load_math500(str(parquet_path), cache_dir=cache_dir)
    expected = [MathProblem(**r) for r in rows]
    assert from_json == expected
    assert from_parquet == expected


def test_missing_file_gives_one_clear_line(tmp_path):
    missing = tmp_path / "nope" / "math500.jsonl"
    with pytest.raises(FileNotFoundError) as info:
        load_math500(str(missing))
    message = str(info.value)
    assert "\n" not in message
    assert str(missing) in message


def test_unsupported_and_unreadable_files(tmp_path, cache_dir):
    csv = tmp_path / "math500.csv"
    csv.write_text("problem,answer\n1+1,2\n")
    with pytest.raises(ValueError, match="unsupported type .csv"):
        load_math500(str(csv), cache_dir=cache_dir)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_math500(str(empty), cache_dir=cache_dir)
    # a line that is not JSON makes pyarrow reject the whole file: one line naming it
    broken = write_jsonl(tmp_path / "broken.jsonl", [good_row(0), "{not json"])
    with pytest.raises(ValueError) as info:
        load_math500(str(broken), cache_dir=cache_dir)
    assert str(broken) in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).endswith("in row 2)")  # the second line, counting from 1


def test_unknown_hub_id_offline_gives_one_clear_line(cache_dir):
    with pytest.raises(ValueError) as info:
        load_math500("no-such-org/no-such-dataset", cache_dir=cache_dir)
    assert "no-such-org/no-such-dataset" in str(info.value) and "\n" not in str(info.value)


def test_print_summary(capsys):
    report = LoadReport(source="x.jsonl", rows_read=3, loaded=2)
    report.skipped["missing answer"] += 1
    print_summary(report)
    assert capsys.readouterr().err == "MATH-500 x.jsonl: 2 problems from 3 rows, skipped 1 (missing answer: 1)\n"
