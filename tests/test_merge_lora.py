"""convert/flax_to_hf.py --merge-lora: a LoRA phase checkpoint written by the runner, exported with
its adapters and new-token rows merged, gives transformers the unmerged JAX model's logits."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM

from abscot_jax.checkpoint import load_hf
from abscot_jax.config import load_config
from abscot_jax.data.roles import Role
from abscot_jax.data.sequences import make_example
from abscot_jax.model.lora import LoRAConfig, apply_lora
from abscot_jax.sharding import MeshConfig, make_mesh
from abscot_jax.train.runner import run_phase

REPO = Path(__file__).resolve().parent.parent
NEW_TOKENS = 66


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "convert/flax_to_hf.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@nnx.jit
def _forward(model, toks):
    positions = jnp.broadcast_to(jnp.arange(toks.shape[1]), toks.shape)
    return model(toks, positions, jnp.ones_like(toks), jnp.zeros_like(toks))


def hf_logits(hf_dir, toks) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model.eval()(torch.as_tensor(toks)).logits.numpy()


@pytest.fixture(scope="module")
def lora_phase(tmp_path_factory, tiny_untied_sharded_hf_dir):
    """A LoRA phase trained for two steps (untied: the head's new-token rows train too) from the
    untied tiny checkpoint: (phase dir, the trained unmerged model, its new-token start)."""
    phase_dir = tmp_path_factory.mktemp("lora_phase") / "phase_a"
    model = load_hf(tiny_untied_sharded_hf_dir)
    start = model.embed.shape[0] - NEW_TOKENS - 8  # inside the spare rows, as the abstract tokens are
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj")),
               new_token_start=start, num_new_tokens=NEW_TOKENS)
    rng = np.random.default_rng(0)
    examples = []
    for i in range(8):  # abstract pieces use the new tokens, so their rows get gradients
        pieces = [(rng.integers(0, start, 6), Role.PROMPT), (rng.integers(0, start, 6), Role.COT),
                  (rng.integers(start, start + NEW_TOKENS, 5), Role.ABSTRACT), (rng.integers(0, start, 4), Role.ANSWER)]
        examples.append(make_example(pieces, example_id=str(i), phase="A"))
    cfg = load_config(None, ["train.mode=lora", "train.seq_len=32", "train.batch_size=2", "train.max_steps=2",
                             "train.checkpoint_every=1", "optim.learning_rate=5e-2", "optim.warmup_ratio=0"])
    trained, _ = run_phase(model, examples, cfg, phase_dir, make_mesh(MeshConfig(), jax.devices()[:1]),
                           progress=False, base_dir=tiny_untied_sharded_hf_dir)
    return phase_dir, trained, start


@pytest.mark.slow
def test_merged_export_matches_unmerged_jax_logits(lora_phase, tiny_untied_sharded_hf_dir, tmp_path):
    phase_dir, trained, start = lora_phase
    # The adapters and new rows really trained: the merge has something to get right.
    moved = [trained.lora[name].b for name in ("q_proj", "v_proj", "down_proj")]
    for param in (*moved, trained.embed_delta, trained.head_delta):
        assert np.abs(np.asarray(param[...])).max() > 1e-3
    out = tmp_path / "merged"
    done = run_cli("--ckpt", phase_dir, "--out", out, "--merge-lora", "--dtype", "float32")
    assert done.returncode == 0, done.stderr

    toks = np.random.default_rng(1).integers(0, start + NEW_TOKENS, (2, 24))
    toks[:, 5:10] = np.arange(start, start + 5)  # new-token rows on the input side as well
    expected = np.asarray(_forward(trained, jnp.asarray(toks)), np.float32)
    got = hf_logits(out, toks)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    base = hf_logits(tiny_untied_sharded_hf_dir, toks)
    assert np.abs(base - expected).max() > 100 * 1e-4  # the merge changed the model, measurably
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == trained.embed.shape[0] and config["tie_word_embeddings"] is False
    assert (out / "tokenizer.json").is_file()  # the base's tokenizer travels with the export


@pytest.mark.slow
def test_one_step_of_a_phase_exports(lora_phase, tmp_path):
    phase_dir, _, _ = lora_phase
    step_1 = phase_dir / "checkpoints" / "1"
    merged_1, merged_2 = tmp_path / "step1", tmp_path / "step2"
    assert run_cli("--ckpt", step_1, "--out", merged_1, "--merge-lora", "--dtype", "float32").returncode == 0
    assert run_cli("--ckpt", phase_dir, "--out", merged_2, "--merge-lora", "--dtype", "float32").returncode == 0
    toks = np.arange(24)[None]
    assert np.abs(hf_logits(merged_1, toks) - hf_logits(merged_2, toks)).max() > 1e-4  # step 1 != latest (2)


@pytest.mark.slow
def test_lora_checkpoint_errors_are_one_line(lora_phase, tiny_hf_dir, tmp_path):
    phase_dir, _, _ = lora_phase
    out = tmp_path / "out"
    cases = [
        (("--ckpt", phase_dir, "--out", out), "--merge-lora"),  # adapters need merging: say so
        (("--ckpt", phase_dir, "--out", out, "--merge-lora", "--base-dir", tiny_hf_dir),  # another base
         "the phase trained a model with"),
    ]
    for args, needle in cases:
        done = run_cli(*args)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], done.stderr
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    moved = tmp_path / "moved"  # the recorded base is gone: the error names --base-dir
    shutil.copytree(phase_dir, moved)
    meta = json.loads((moved / "phase.json").read_text())
    (moved / "phase.json").write_text(json.dumps({**meta, "base_dir": str(tmp_path / "gone")}))
    done = run_cli("--ckpt", moved, "--out", out, "--merge-lora")
    assert done.returncode == 2 and "--base-dir" in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_full_fine_tuning_phase_exports_without_a_base(tmp_path):
    """Full mode saves every parameter: the export needs no base and no --merge-lora."""
    from abscot_jax.model.config import Qwen3Config
    from abscot_jax.model.qwen3 import Qwen3

    model = Qwen3(Qwen3Config(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False),
                  rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    examples = [make_example([(rng.integers(0, 160, 6), role) for role in (Role.PROMPT, Role.COT, Role.ABSTRACT,
                                                                           Role.ANSWER)], example_id=str(i), phase="A")
                for i in range(4)]
    cfg = load_config(None, ["train.mode=full", "train.seq_len=32", "train.batch_size=2", "train.max_steps=1",
                             "optim.learning_rate=1e-2", "optim.warmup_ratio=0"])
    trained, _ = run_phase(model, examples, cfg, tmp_path / "phase", make_mesh(MeshConfig(), jax.devices()[:1]),
                           progress=False)
    done = run_cli("--ckpt", tmp_path / "phase", "--out", tmp_path / "hf", "--dtype", "float32")
    assert done.returncode == 0, done.stderr
    toks = rng.integers(0, 160, (2, 12))
    np.testing.assert_allclose(hf_logits(tmp_path / "hf", toks), np.asarray(_forward(trained, jnp.asarray(toks))),
                               atol=1e-4, rtol=0)
