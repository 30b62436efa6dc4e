"""scripts/rehearse_qwen3_4b.py's bad-input stage on a tiny sharded checkpoint: a missing shard, a
truncated one, an index naming an absent file and a config that disagrees with a tensor's shape each
give the converter's one `error:` line, exit 2 and nothing written (the stage raises otherwise)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
# The stage runs in a small process of its own, as in the script: a child's peak RSS (which the
# stage checks) counts its parent's memory at the fork, and pytest's process is large.
CHECK = f"""
import json, sys
sys.path.insert(0, {str(SCRIPTS)!r})
import rehearse_qwen3_4b as rehearse
driver = rehearse.Driver(rehearse.parse_args(["--out", sys.argv[1]]))
rehearse.check_bad_inputs(driver)
print(json.dumps(sorted(driver.records)))
"""


@pytest.mark.slow
def test_bad_inputs_give_one_error_line_each_and_no_output(tiny_untied_sharded_hf_dir, tmp_path):
    shutil.copytree(tiny_untied_sharded_hf_dir, tmp_path / "source")
    done = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [
        "bad_config_disagrees", "bad_index_names_absent_file", "bad_missing_shard", "bad_truncated_shard"]
    assert not (tmp_path / "bad_input").exists()
