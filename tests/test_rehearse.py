"""scripts/rehearse_qwen3_4b.py's bad-input stage on a tiny sharded checkpoint: a missing shard, a
truncated one, an index naming an absent file and a config that disagrees with a tensor's shape each
give the converter's one `error:` line, exit 2 and nothing written (the stage raises otherwise)."""
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import rehearse_qwen3_4b as rehearse  # noqa: E402


def test_bad_inputs_give_one_error_line_each_and_no_output(tiny_untied_sharded_hf_dir, tmp_path):
    shutil.copytree(tiny_untied_sharded_hf_dir, tmp_path / "source")
    driver = rehearse.Driver(rehearse.parse_args(["--out", str(tmp_path)]))
    rehearse.check_bad_inputs(driver)
    assert sorted(driver.records) == ["bad_config_disagrees", "bad_index_names_absent_file", "bad_missing_shard",
                                      "bad_truncated_shard"]
    assert not (tmp_path / "bad_input").exists()
