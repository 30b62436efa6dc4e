"""The memory plan against XLA's own accounting of the compiled train step, and its command line."""
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from abscot_jax.config import load_config
from abscot_jax.model.config import REMAT_POLICIES, Qwen3Config
from abscot_jax.model.lora import apply_lora
from abscot_jax.model.qwen3 import Qwen3
from abscot_jax.plan import GiB, PRESETS, memory_plan
from abscot_jax.plan.__main__ import main
from abscot_jax.sharding import make_mesh
from abscot_jax.train.step import BATCH_KEYS, TrainStep
from abscot_jax.vocab import NEW_TOKENS

# Small enough to compile in seconds, large enough that activations are much of the peak
# (46-92% of the planned total).
SMALL = Qwen3Config(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)
SMALL_RUN = ["train.batch_size=2", "train.seq_len=512", "train.loss_chunk=1024", "lora.rank=8", "lora.alpha=16",
             "model.attention_impl=xla"]  # explicit: the plan counts "auto" as pallas (its GPU choice)


def compiled_peak_bytes(model_cfg: Qwen3Config, run) -> int:
    """Peak bytes of the real jitted train step on one CPU device, from XLA's buffer assignment:
    arguments + outputs + temporaries, minus the outputs that reuse donated argument buffers."""
    model = Qwen3(model_cfg.replace(remat=run.model.remat, attention_impl=run.model.attention_impl), rngs=nnx.Rngs(0))
    if run.train.mode == "lora":
        n = len(NEW_TOKENS)
        apply_lora(model, run.lora, new_token_start=model_cfg.vocab_size - n, num_new_tokens=n)
    trainer = TrainStep.create(model, run.optim, run.train, total_steps=10,
                               mesh=make_mesh(run.mesh, jax.devices()[:1]))
    shape = (run.train.grad_accum, run.train.batch_size, run.train.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32) for k in BATCH_KEYS}
    # LLVM's optimisation level changes the machine code, not XLA's buffer assignment; level 0
    # compiles about a third faster.
    compiled = trainer.step_fn.lower(trainer.state, batch).compile({"xla_backend_optimization_level": 0})
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


@pytest.mark.slow
@pytest.mark.parametrize("remat", REMAT_POLICIES)
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_plan_within_15_percent_of_compiled_peak(mode, remat):
    run = load_config(None, [*SMALL_RUN, f"train.mode={mode}", f"model.remat={remat}"])
    plan = memory_plan(SMALL, run, num_devices=1)
    measured = compiled_peak_bytes(SMALL, run)
    assert plan.activations > 0.4 * plan.total  # activations matter in this config
    assert abs(plan.total - measured) <= 0.15 * measured, (plan.total / 2**20, measured / 2**20)


@pytest.mark.slow
def test_plan_parameters_match_the_sharded_state():
    """Parameters + optimizer state per device equal what the partition rules put on device 0
    (LoRA: frozen base, adapters, new-token rows and their AdamW state, on fsdp 2 x tensor 4)."""
    devices = jax.devices()[:8]
    run = load_config(None, [*SMALL_RUN, "train.mode=lora", "mesh.fsdp=2", "mesh.tensor=4"])
    model = Qwen3(SMALL, rngs=nnx.Rngs(0))
    apply_lora(model, run.lora, new_token_start=4096 - 66, num_new_tokens=66)
    trainer = TrainStep.create(model, run.optim, run.train, 10, make_mesh(run.mesh, devices))
    on_device0 = sum(shard.data.nbytes for leaf in jax.tree.leaves(trainer.state) if leaf.ndim > 0
                     for shard in leaf.addressable_shards if shard.device == devices[0])
    plan = memory_plan(SMALL, run, num_devices=8)
    assert plan.mesh == (1, 2, 4)
    assert plan.frozen_params + plan.trainable_params + plan.optimizer == on_device0


def test_qwen3_4b_parameter_bytes():
    cfg = Qwen3Config.from_hf_dict(PRESETS["qwen3-4b"])
    params, norms = 4_022_468_096, 36 * (2 * 2560 + 2 * 128) + 2560  # Qwen3-4B (tied); norms are 1-D
    full = memory_plan(cfg, load_config(None, ["train.mode=full"]), num_devices=2)
    # fp32, fsdp splits every matrix in two (the norms stay replicated); AdamW keeps two more copies.
    assert full.trainable_params == ((params - norms) // 2 + norms) * 4
    assert full.optimizer == 2 * full.trainable_params and full.gradients == full.trainable_params
    assert full.frozen_params == 0

    lora = memory_plan(cfg, load_config(None, ["train.mode=lora", "model.param_dtype=bfloat16"]), num_devices=1)
    shapes = [(2560, 4096), (2560, 1024), (2560, 1024), (4096, 2560), (2560, 9728), (2560, 9728), (9728, 2560)]
    adapters = 36 * 32 * sum(fan_in + fan_out for fan_in, fan_out in shapes)  # rank 32, all 7 projections
    assert lora.frozen_params == params * 2  # the bf16 base
    assert lora.trainable_params == (adapters + 66 * 2560) * 4  # fp32 adapters + the new tokens' rows
    assert lora.optimizer == 2 * lora.trainable_params


def test_cli_qwen3_4b_full_prints_a_table_and_a_verdict(capsys):
    code = main(["--hf-config", "qwen3-4b", "--set", "train.mode=full", "--set", "train.seq_len=8192",
                 "--devices", "2", "--device-memory", "80GB"])
    out = capsys.readouterr().out
    assert code == 0
    for row in ("parameters: trainable", "gradients", "optimizer state", "activations", "total"):
        assert row in out
    total_line = next(line for line in out.splitlines() if line.startswith("total"))
    assert float(total_line.split()[-1]) > 80  # GiB: remat none at 8k tokens cannot fit
    assert out.strip().splitlines()[-1].startswith("does not fit:")

    code = main(["--hf-config", "qwen3-4b", "--set", "train.mode=lora", "--set", "train.seq_len=8192",
                 "--set", "model.remat=layer", "--set", "model.param_dtype=bfloat16",
                 "--set", "model.compute_dtype=bfloat16", "--set", "train.batch_size=2", "--devices", "2"])
    assert code == 0 and capsys.readouterr().out.strip().splitlines()[-1].startswith("fits:")


def test_cli_user_errors_give_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  seq_lenn: 8192\n")
    cases = {  # arguments -> what the one line must name
        ("--config", str(bad), "--hf-config", "qwen3-4b"): "train.seq_lenn",
        ("--hf-config", "qwen3-400b"): "qwen3-400b",
        ("--config", str(tmp_path / "missing.yaml"), "--hf-config", "qwen3-4b"): "missing.yaml",
        ("--hf-config", "qwen3-4b", "--set", "mesh.tensor=3", "--devices", "2"): "mesh",
    }
    cases.update({
        # The shipped config's placeholder model.hf_dir: the line says what to pass instead.
        ("--config", str(REPO / "configs/qwen3_4b_full.yaml")): "--hf-config qwen3-4b",
        ("--config", str(REPO / "configs/qwen3_4b_full.yaml"), "--hf-config", "qwen3-4b", "--devices", "4"):
            "mesh.fsdp=-1",
        ("--hf-config", "qwen3-4b", "--device-memory", "lots"): "h100",
    })
    for args, named in cases.items():
        assert main(list(args)) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], captured.err
        assert captured.out == ""
    # The module entry point itself: exit status 2 and one line, no traceback.
    proc = subprocess.run([sys.executable, "-m", "abscot_jax.plan", "--config", str(bad), "--hf-config", "qwen3-4b"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown config key 'train.seq_lenn'; did you mean 'train.seq_len'?"]


REPO = Path(__file__).resolve().parents[1]


def verdict_budget_gib(out: str) -> float:
    """The per-device budget the verdict line states ("fits: X of B GiB per device ...")."""
    return float(re.search(r"^(?:fits|does not fit): [\d.]+ of ([\d.]+) GiB per device", out, re.M).group(1))


@pytest.mark.slow
def test_cli_sizes_devices_this_machine_does_not_have():
    """`--devices 2 --device-memory 80GB` in a process that sees one device: the plan of the real
    config for a 2-device mesh, judged against 80 GiB per device."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, not the tests' 8
    proc = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"],
                          capture_output=True, text=True, env=env, check=True)
    assert proc.stdout.strip() == "1"
    args = ["--config", "configs/qwen3_4b_full.yaml", "--hf-config", "qwen3-4b", "--devices", "2",
            "--device-memory", "80GB"]
    proc = subprocess.run([sys.executable, "-m", "abscot_jax.plan", *args], capture_output=True, text=True,
                          env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    run = load_config(str(REPO / "configs/qwen3_4b_full.yaml"), [])
    plan = memory_plan(Qwen3Config.from_hf_dict(PRESETS["qwen3-4b"]), run, num_devices=2)
    assert "mesh: data 1 x fsdp 2 x tensor 1 = 2 devices" in proc.stdout
    total_line = next(line for line in proc.stdout.splitlines() if line.startswith("total"))
    assert float(total_line.split()[-1]) == round(plan.total / GiB, 2)
    assert verdict_budget_gib(proc.stdout) == round(run.train.device_memory_fraction * 80, 1)


def test_cli_device_memory_by_kind_or_size(capsys):
    base = ["--hf-config", "qwen3-4b", "--devices", "2"]
    for memory, gib in [("h200", 143771 / 1024), ("a100-80gb", 80), ("141GiB", 141), ("40", 40)]:
        assert main([*base, "--device-memory", memory]) == 0
        assert verdict_budget_gib(capsys.readouterr().out) == round(0.92 * gib, 1)  # the default fraction


def test_cli_devices_default_to_the_configs_mesh(capsys):
    """Without --devices the plan sizes the mesh the config names (2 for the Qwen3-4B configs)."""
    assert main(["--config", str(REPO / "configs/qwen3_4b_full.yaml"), "--hf-config", "qwen3-4b"]) == 0
    assert "= 2 devices" in capsys.readouterr().out


def test_help_shows_defaults_and_says_what_each_option_is(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: h100)" in text and "need not exist here" in text and "override a config value" in text
