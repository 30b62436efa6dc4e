"""The offline fixtures (abscot_jax/fixtures.py): the demo's tiny tokenizer and random Qwen3 are
written without torch (test_checkpoint.py checks transformers' logits on them against ours)."""
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parent.parent

WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # any import of torch fails
from abscot_jax.demo import TINY_MODEL
from abscot_jax.fixtures import make_checkpoint
make_checkpoint(sys.argv[1], seed=int(sys.argv[2]), **TINY_MODEL)
assert "torch" not in {m.split(".")[0] for m, mod in sys.modules.items() if mod is not None}
"""


def build_without_torch(out: Path, seed: int) -> Path:
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(out), str(seed)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_the_demo_model_is_built_without_torch_as_transformers_initialises_qwen3(tmp_path):
    from abscot_jax.demo import TINY_MODEL

    out = build_without_torch(tmp_path / "a", seed=0)
    config = json.loads((out / "config.json").read_text())
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    n_tokens = len(tokenizer["model"]["vocab"])  # the special tokens are in the BPE vocabulary too
    assert config["vocab_size"] == n_tokens + 128  # spare rows, as Qwen3's checkpoints have
    assert {k: config[k] for k in TINY_MODEL} == TINY_MODEL
    weights = load_file(out / "model.safetensors")
    embed = weights["model.embed_tokens.weight"]
    assert embed.shape == (config["vocab_size"], TINY_MODEL["hidden_size"])
    pad = config["pad_token_id"]
    assert not embed[pad].any()  # nn.Embedding(padding_idx=pad) starts that row at zero
    rest = np.delete(embed, pad, axis=0)
    assert abs(rest.std() - 0.02) < 0.001 and abs(rest.mean()) < 0.001  # normal(0, initializer_range)
    norms = np.concatenate([w for name, w in weights.items() if name.endswith("norm.weight")])
    assert abs(norms.mean() - 1) < 0.02 and abs(norms.std() - 0.1) < 0.02
    assert "lm_head.weight" in weights  # untied, as the demo asks

    # The same seed gives the same weights; another seed others.
    again = load_file(build_without_torch(tmp_path / "b", seed=0) / "model.safetensors")
    other = load_file(build_without_torch(tmp_path / "c", seed=1) / "model.safetensors")
    assert all(np.array_equal(weights[k], again[k]) for k in weights)
    assert not np.array_equal(weights["lm_head.weight"], other["lm_head.weight"])



@pytest.mark.slow
def test_the_demo_runs_where_torch_is_not_installed(tmp_path):
    """The demo, small, in an environment of this one's packages less torch (and peft, which needs
    it): it runs to its report and summary line."""
    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not re.match(r"(torch|functorch|torchgen|peft)([-_.]|$)", entry.name) and not (site / entry.name).exists():
            (site / entry.name).symlink_to(entry)
    python = str(venv / "bin" / "python")
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0
    assert subprocess.run([python, "-c", "import abscot_jax, jax, transformers"], capture_output=True).returncode == 0
    sizes = ["run_dir=" + str(tmp_path / "runs"), "name=small", "rounds=1", "data.warmup_examples=64",
             "data.examples_per_phase=32", "eval.limit=6", "train.epochs=1"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as the demo's mesh says
    done = subprocess.run([python, "-m", "abscot_jax.demo", *[a for s in sizes for a in ("--set", s)]], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "small" / "report.md").is_file()
    assert any(line.startswith("[small] done: ") for line in done.stdout.splitlines())
