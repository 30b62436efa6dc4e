"""abscot_jax.files: a file is replaced whole or not at all, and two writers never share a temporary."""
import json

import pytest

from abscot_jax.files import replace_json, replace_jsonl, replaced


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "rows.jsonl"
    replace_jsonl(path, [{"a": 1}, {"b": "é"}])
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with replaced(path) as f:
            f.write("half a row")
            raise RuntimeError("stopped mid-write")
    assert path.read_bytes() == before
    assert [json.loads(line) for line in before.decode().splitlines()] == [{"a": 1}, {"b": "é"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_two_open_writers_of_one_path_do_not_share_a_temporary(tmp_path):
    """Two writes in flight at once (two processes of one study): each completes, the last wins."""
    path = tmp_path / "state.json"
    with replaced(path) as first, replaced(path) as second:
        assert first.name != second.name
        first.write(json.dumps({"writer": 1}))
        second.write(json.dumps({"writer": 2}))
    assert json.loads(path.read_text()) == {"writer": 1}  # the outer block ends last
    replace_json(path, {"writer": 3})
    assert json.loads(path.read_text()) == {"writer": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
