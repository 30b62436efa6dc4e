"""HF <-> JAX conversion: parity with transformers (PyTorch CPU), exact round trips, Orbax, CLIs, errors."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for safetensors' numpy reader)
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from abscot_jax.checkpoint import (
    convert_hf_to_checkpoint, export_checkpoint_to_hf, iter_hf_tensors, load_checkpoint,
    load_hf, save_checkpoint, save_hf,
)
from abscot_jax.checkpoint.safetensors_io import SafetensorsDir, SequentialWriter
from abscot_jax.errors import CheckpointError
from abscot_jax.fixtures import make_checkpoint

REPO = Path(__file__).resolve().parent.parent
TEXT = "Let <think>x</think> sum 12 + 7 = 19 \\boxed{19}<|im_end|>"


# ---- helpers ----------------------------------------------------------------------------------
def tokens(vocab: int, batch: int = 2, length: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


@nnx.jit
def _forward(model, toks, positions, segments):
    return model(toks, positions, segments, jnp.zeros_like(toks))


def jax_logits(model, toks: np.ndarray, positions: np.ndarray | None = None, segments: np.ndarray | None = None):
    toks = jnp.asarray(toks)
    positions = jnp.broadcast_to(jnp.arange(toks.shape[1]), toks.shape) if positions is None else jnp.asarray(positions)
    segments = jnp.ones_like(toks) if segments is None else jnp.asarray(segments)
    return np.asarray(_forward(model, toks, positions, segments), np.float32)


def hf_model(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager").eval()


def hf_logits(model, toks: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(toks)).logits.float().numpy()


def hf_tensors_of(path) -> dict[str, np.ndarray]:
    reader = SafetensorsDir(path)
    out = {}
    for name, (file, *_rest) in reader.tensors.items():
        with safe_open(file, framework="numpy") as f:
            out[name] = f.get_tensor(name)
    return out


def assert_bit_exact(src, out):
    a, b = hf_tensors_of(src), hf_tensors_of(out)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def run_cli(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"convert/{script}", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def leftovers(parent: Path, name: str) -> list[str]:
    """Temporary directories a writer left beside its output."""
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.tmp")]


# ---- checkpoints of several shapes ------------------------------------------------------------
PARITY_SHAPES = {
    # Together: tied and untied; kv heads 1, 2 and = heads; head_dim != hidden / heads.
    "tied_kv2": None,  # conftest's tiny_hf_dir: 4 heads, 2 kv heads, head_dim 16 = 64 / 4
    "untied_kv1_hd24": None,  # conftest's tiny_untied_sharded_hf_dir: 1 kv head, head_dim 24, sharded
    "untied_mha": dict(tie_word_embeddings=False, num_key_value_heads=4, seed=2),
    "tied_hd32_6heads": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=32,
                             num_hidden_layers=3, seed=3),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, tiny_hf_dir, tiny_untied_sharded_hf_dir):
    made = {"tied_kv2": tiny_hf_dir, "untied_kv1_hd24": tiny_untied_sharded_hf_dir}
    for name, kwargs in PARITY_SHAPES.items():
        if kwargs is not None:
            made[name] = make_checkpoint(tmp_path_factory.mktemp(name), **kwargs)
    return made


@pytest.fixture(scope="module")
def bf16_sharded_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bf16"), dtype="bfloat16", tie_word_embeddings=False,
                           max_shard_size="60KB", seed=4)


# ---- parity with transformers -----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("shape", list(PARITY_SHAPES))
def test_fp32_logits_match_transformers(hf_dirs, shape):
    path = hf_dirs[shape]
    model = load_hf(path)
    toks = tokens(model.config.vocab_size)
    diff = np.abs(jax_logits(model, toks) - hf_logits(hf_model(path), toks)).max()
    assert diff <= 1e-4, f"{shape}: max abs diff {diff}"


def test_bf16_logits_match_transformers(bf16_sharded_dir):
    # bf16 keeps 8 significant bits (relative rounding 2^-8 ~ 0.004 per operation) and the errors add
    # up over layers, so two bf16 implementations cannot agree to 1e-4. The fair yardstick is the
    # reference's own bf16 error: both are measured against the same weights run in fp32, and ours
    # may be at most twice transformers' (plus a hair for a tiny reference error); the bf16 logits
    # themselves must agree to a few bf16 steps of the logit scale and pick the same top token.
    toks = tokens(640, length=24)
    ours = jax_logits(load_hf(bf16_sharded_dir, param_dtype="bfloat16"), toks)
    theirs = hf_logits(hf_model(bf16_sharded_dir, torch.bfloat16), toks)
    exact = hf_logits(hf_model(bf16_sharded_dir, torch.float32), toks)
    our_err, their_err = np.abs(ours - exact).max(), np.abs(theirs - exact).max()
    scale = np.abs(exact).max()
    assert our_err <= 2 * their_err + 1e-3 * scale, (our_err, their_err)
    assert np.abs(ours - theirs).max() <= 4 * 2**-8 * scale
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9


def test_packed_row_equals_sequences_alone(tiny_untied_sharded_hf_dir):
    model = load_hf(tiny_untied_sharded_hf_dir)
    a, b = tokens(600, 1, 7, seed=1), tokens(600, 1, 9, seed=2)
    packed = jax_logits(
        model, np.concatenate([a, b], 1),
        positions=np.concatenate([np.arange(7), np.arange(9)])[None],  # positions restart per sequence
        segments=np.array([[1] * 7 + [2] * 9]),
    )

    def alone(seq):  # the same row length (one compilation), the rest padding (segment 0)
        n = seq.shape[1]
        row = np.concatenate([seq, np.zeros((1, 16 - n), seq.dtype)], 1)
        return jax_logits(model, row, segments=np.array([[1] * n + [0] * (16 - n)]))[:, :n]

    np.testing.assert_allclose(packed[:, :7], alone(a), atol=1e-5)
    np.testing.assert_allclose(packed[:, 7:], alone(b), atol=1e-5)


# ---- HF -> JAX -> HF --------------------------------------------------------------------------
CONFIG_FIELDS = (
    "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings",
    "max_position_embeddings", "eos_token_id", "pad_token_id", "bos_token_id", "hidden_act", "attention_bias",
)


def assert_same_config_and_tokenizer(src, out):
    a, b = AutoConfig.from_pretrained(str(src)), AutoConfig.from_pretrained(str(out))
    for field in CONFIG_FIELDS:
        assert getattr(a, field) == getattr(b, field), field
    assert a.rope_parameters["rope_theta"] == b.rope_parameters["rope_theta"]
    ta, tb = AutoTokenizer.from_pretrained(str(src)), AutoTokenizer.from_pretrained(str(out))
    assert ta(TEXT)["input_ids"] == tb(TEXT)["input_ids"]
    chat = [{"role": "user", "content": "1 + 1?"}]
    assert (ta.apply_chat_template(chat, add_generation_prompt=True, enable_thinking=False)
            == tb.apply_chat_template(chat, add_generation_prompt=True, enable_thinking=False))
    assert json.loads((Path(out) / "generation_config.json").read_text())["eos_token_id"] == a.eos_token_id


@pytest.mark.parametrize("source, param_dtype, dtype", [
    ("tied_kv2", "float32", "float32"),  # single file
    ("untied_kv1_hd24", "float32", "float32"),  # sharded
    ("bf16", "float32", "bfloat16"),  # bf16 weights kept in fp32 params, written back as bf16
    ("bf16", "bfloat16", "bfloat16"),
])
def test_hf_round_trip_is_bit_exact(hf_dirs, bf16_sharded_dir, tmp_path, source, param_dtype, dtype):
    src = bf16_sharded_dir if source == "bf16" else hf_dirs[source]
    out = save_hf(load_hf(src, param_dtype=param_dtype), tmp_path / "out", tokenizer_dir=src, dtype=dtype,
                  max_shard_size="100KB", base_config=json.loads((src / "config.json").read_text()))
    assert_bit_exact(src, out)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in hf_tensors_of(out).values())
    assert_same_config_and_tokenizer(src, out)
    toks = tokens(600)
    assert np.array_equal(hf_logits(hf_model(out), toks), hf_logits(hf_model(src), toks))


def test_export_keeps_vocab_in_step_with_embedding(tiny_hf_dir, tmp_path):
    model = load_hf(tiny_hf_dir)
    rows = model.embed.shape[0]
    model.config = model.config.replace(vocab_size=rows - 5)  # e.g. rows added without updating the config
    out = save_hf(model, tmp_path / "out", tokenizer_dir=tiny_hf_dir)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    assert AutoModelForCausalLM.from_pretrained(str(out)).get_input_embeddings().weight.shape[0] == rows


@pytest.mark.parametrize("direct", [True, False])
def test_sequential_writer_writes_exactly_the_bytes_given(tmp_path, monkeypatch, direct):
    """Through its buffer, across buffer boundaries, with an unaligned tail; O_DIRECT or not."""
    if not direct:
        monkeypatch.delattr("os.O_DIRECT", raising=False)
    rng = np.random.default_rng(0)
    size = SequentialWriter.BUFFER_BYTES
    sizes = [5, size - 5, 4096, size + 1, *rng.integers(1, 1 << 20, 8)]
    chunks = [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in sizes]
    with SequentialWriter(tmp_path / "f") as f:
        for chunk in chunks:
            f.write(chunk)
    assert (tmp_path / "f").read_bytes() == b"".join(chunks)


def test_tensor_stream_seam_and_failed_write_leaves_nothing(tiny_hf_dir, tmp_path):
    model = load_hf(tiny_hf_dir)
    # The LoRA seam: a wrapped stream of (name, array) replaces the model's own tensors.
    doubled = ((n, 2 * t if n == "model.norm.weight" else t) for n, t in iter_hf_tensors(model))
    out = save_hf(model, tmp_path / "out", dtype="float32", tensors=doubled)
    np.testing.assert_array_equal(hf_tensors_of(out)["model.norm.weight"],
                                  2 * hf_tensors_of(tiny_hf_dir)["model.norm.weight"])

    def broken():
        for i, item in enumerate(iter_hf_tensors(model)):
            if i == 5:
                raise RuntimeError("disk full")
            yield item

    with pytest.raises(RuntimeError):
        save_hf(model, tmp_path / "broken", tensors=broken())
    assert not (tmp_path / "broken").exists() and leftovers(tmp_path, "broken") == []


# ---- Orbax ------------------------------------------------------------------------------------
def test_orbax_round_trip_same_logits(tiny_untied_sharded_hf_dir, tmp_path):
    model = load_hf(tiny_untied_sharded_hf_dir)
    toks = tokens(600)
    want = jax_logits(model, toks)
    save_checkpoint(model, tmp_path / "saved", tiny_untied_sharded_hf_dir)
    convert_hf_to_checkpoint(tiny_untied_sharded_hf_dir, tmp_path / "converted")
    for ckpt in ("saved", "converted"):
        restored = load_checkpoint(tmp_path / ckpt)
        assert np.array_equal(jax_logits(restored, toks), want), ckpt
        assert (tmp_path / ckpt / "tokenizer.json").is_file()
    bf16 = load_checkpoint(tmp_path / "saved", param_dtype="bfloat16")
    assert bf16.q_proj[...].dtype == jnp.bfloat16
    out = export_checkpoint_to_hf(tmp_path / "converted", tmp_path / "hf", dtype="float32")
    assert_bit_exact(tiny_untied_sharded_hf_dir, out)


@pytest.mark.slow
def test_loads_into_target_shardings(tiny_untied_sharded_hf_dir, tmp_path):
    mesh = jax.make_mesh((4,), ("tensor",), devices=jax.devices()[:4], axis_types=(jax.sharding.AxisType.Auto,))
    P = jax.sharding.PartitionSpec
    # Column-parallel kernels (split outputs), row-parallel o/down (split inputs), vocab-split
    # embedding, replicated norms: every kind of slice of an HF tensor gets read.
    row_parallel = P(None, "tensor", None)
    specs = {"embed": P("tensor", None), "lm_head": P(None, "tensor"), "final_norm": P(None),
             "o_proj": row_parallel, "down_proj": row_parallel}

    def sharding(name):
        default = P(None, None, "tensor") if name.endswith("proj") else P()
        return jax.sharding.NamedSharding(mesh, specs.get(name, default))

    plain = load_hf(tiny_untied_sharded_hf_dir)
    sharded = load_hf(tiny_untied_sharded_hf_dir, shardings=sharding)
    assert sharded.gate_proj[...].sharding.spec == P(None, None, "tensor")
    assert sharded.down_proj[...].sharding.spec == row_parallel
    assert len(sharded.gate_proj[...].addressable_shards) == 4
    want = nnx.state(plain, nnx.Param).to_pure_dict()
    for name, value in nnx.state(sharded, nnx.Param).to_pure_dict().items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want[name]), err_msg=name)
    save_checkpoint(plain, tmp_path / "ckpt")
    restored = load_checkpoint(tmp_path / "ckpt", shardings=sharding)
    assert restored.lm_head[...].sharding.spec == P(None, "tensor")
    toks = tokens(600)
    np.testing.assert_allclose(jax_logits(restored, toks), jax_logits(plain, toks), atol=1e-5)


# ---- command line -----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("source", ["fp32", "bf16"])
def test_cli_round_trip_with_default_flags_is_bit_exact(hf_dirs, bf16_sharded_dir, tmp_path, source):
    """HF -> checkpoint -> HF with no dtype flags keeps the weights' dtype: every tensor bit-identical."""
    src, dtype = (bf16_sharded_dir, "bfloat16") if source == "bf16" else (hf_dirs["untied_kv1_hd24"], "float32")
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    done = run_cli("hf_to_flax.py", "--hf-dir", src, "--out", ckpt)
    assert done.returncode == 0, done.stderr
    done = run_cli("flax_to_hf.py", "--ckpt", ckpt, "--out", out, "--max-shard-size", "50KB")
    assert done.returncode == 0, done.stderr
    assert_bit_exact(src, out)  # dtypes included
    assert_same_config_and_tokenizer(src, out)
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype


def _break_missing_shard(d: Path):
    sorted(d.glob("model-*.safetensors"))[1].unlink()


def _break_truncated(d: Path):
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


def _break_architecture(d: Path):
    config = json.loads((d / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (d / "config.json").write_text(json.dumps(config))


def _break_shape(d: Path):
    config = json.loads((d / "config.json").read_text())
    config["intermediate_size"] = 96  # the weights are 128 wide
    (d / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("breakage, source, expect", [
    (_break_missing_shard, "sharded", "model-00002-of-"),
    (_break_truncated, "single", "truncated"),
    (_break_architecture, "single", "LlamaForCausalLM"),
    (_break_shape, "single", "has shape [128, 64] but"),
])
@pytest.mark.slow
def test_bad_input_one_error_line_no_output(tiny_hf_dir, tiny_untied_sharded_hf_dir, tmp_path, breakage, source,
                                            expect):
    src = tmp_path / "src"
    shutil.copytree(tiny_untied_sharded_hf_dir if source == "sharded" else tiny_hf_dir, src)
    breakage(src)
    done = run_cli("hf_to_flax.py", "--hf-dir", src, "--out", tmp_path / "ckpt")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert expect in lines[0]
    assert not (tmp_path / "ckpt").exists() and leftovers(tmp_path, "ckpt") == []
    with pytest.raises((CheckpointError, ValueError)):  # the same error through the library
        load_hf(src)


@pytest.mark.slow
def test_existing_output_is_an_error(tiny_hf_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert run_cli("hf_to_flax.py", "--hf-dir", tiny_hf_dir, "--out", ckpt).returncode == 0
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for done in (run_cli("hf_to_flax.py", "--hf-dir", tiny_hf_dir, "--out", ckpt),
                 run_cli("flax_to_hf.py", "--ckpt", ckpt, "--out", out)):
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), done.stderr
        assert "already exists" in lines[0] and "--overwrite" in lines[0]
    assert (out / "keep.txt").read_text() == "mine" and leftovers(tmp_path, "hf") == []
    done = run_cli("flax_to_hf.py", "--ckpt", ckpt, "--out", out, "--overwrite", "--dtype", "float32")
    assert done.returncode == 0, done.stderr
    assert not (out / "keep.txt").exists()
    assert_bit_exact(tiny_hf_dir, out)
