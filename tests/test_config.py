from pathlib import Path

import pytest
import yaml

from abscot_jax.config import load_config, to_dict
from abscot_jax.data.sequences import BuildConfig
from abscot_jax.demo import demo_config
from abscot_jax.errors import ConfigError
from abscot_jax.model.lora import LoRAConfig
from abscot_jax.sharding import MeshConfig

CONFIGS = Path(__file__).parent.parent / "configs"


def test_overrides_and_yaml_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  seq_len: 512\noptim:\n  learning_rate: 3e-4\n")
    cfg = load_config(path, ["train.batch_size=8", "lora.targets=[q_proj, v_proj]"])
    assert (cfg.train.seq_len, cfg.train.batch_size, cfg.optim.learning_rate) == (512, 8, 3e-4)
    assert cfg.lora.targets == ("q_proj", "v_proj")


def test_lora_and_mesh_sections_are_the_library_configs(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora: {rank: 16, alpha: 32, dropout: 0.1, targets: [q_proj, k_proj, o_proj]}\n"
                    "mesh: {data: 2, fsdp: 1, tensor: 4}\n")
    cfg = load_config(path, ["lora.rank=8", "lora.targets=[q_proj,v_proj]", "mesh.fsdp=2"])
    assert cfg.lora == LoRAConfig(rank=8, alpha=32.0, dropout=0.1, targets=("q_proj", "v_proj"))
    assert cfg.mesh == MeshConfig(data=2, fsdp=2, tensor=4)
    assert (load_config(None).lora, load_config(None).mesh) == (LoRAConfig(), MeshConfig())


def test_to_dict_round_trips_through_load_config(tmp_path):
    cfg = load_config(CONFIGS / "qwen3_4b_lora.yaml", ["lora.targets=[q_proj, down_proj]", "data.system=hi"])
    path = tmp_path / "saved.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(path) == cfg


def test_build_config_maps_the_run_settings():
    cfg = load_config(None, ["train.seq_len=300", "data.m_max=20", "data.cut_policy=head", "train.loss_on_trace=false",
                             "data.system=Think.", "train.seed=7"])
    assert cfg.build_config() == BuildConfig(seq_len=300, m_max=20, cut_policy="head", loss_on_trace=False,
                                             system="Think.", seed=7)
    assert load_config(None).build_config().system is None  # "": the rows' own messages


@pytest.mark.parametrize("overrides, message", [
    (["train.seqlen=3"], "unknown config key 'train.seqlen'; did you mean 'train.seq_len'?"),
    (["trian.seq_len=3"], "unknown config key 'trian'; did you mean 'train'?"),
    (["train.seq_len=long"], "train.seq_len must be int, got 'long'"),
    (["train.mode=half"], "train.mode must be 'lora' or 'full'"),
    (["lora.targets=q_proj"], "lora.targets must be a list"),
    (["lora.rnak=8"], "unknown config key 'lora.rnak'; did you mean 'lora.rank'?"),
    (["lora.targets=[q_proj, qk_proj]"], "lora.targets: unknown ['qk_proj']"),
    (["lora.rank=0"], "lora.rank must be >= 1"),
    (["lora.dropout=1"], "lora.dropout must be in [0, 1)"),
    (["mesh.fsdp=two"], "mesh.fsdp must be int, got 'two'"),
    (["sampler.engine=vllm"], "sampler.engine=vllm needs sampler.python"),
    (["train.device_memory_fraction=1.5"], "train.device_memory_fraction must be in (0, 1]"),
    (["train.device_memory_fraction=0"], "train.device_memory_fraction must be in (0, 1]"),
])
def test_config_mistakes_give_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_mesh_that_does_not_match_the_devices():
    with pytest.raises(ValueError, match="but 8 are available"):
        MeshConfig(data=2, fsdp=2, tensor=1).shape(8)
    with pytest.raises(ValueError, match="not a multiple of 3"):
        MeshConfig(data=3, fsdp=-1).shape(8)
    assert MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 2)


def test_shipped_configs_load_and_tiny_matches_the_demo():
    for path in CONFIGS.glob("*.yaml"):
        load_config(path)
    # The same settings under its own name: the train command does not reuse the demo's run.
    assert to_dict(load_config(CONFIGS / "tiny_cpu.yaml", ["name=demo"])) == to_dict(demo_config())
    assert load_config(CONFIGS / "tiny_cpu.yaml").name == "tiny_cpu"
