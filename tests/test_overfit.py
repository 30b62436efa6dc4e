"""A tiny model memorises a tiny Phase A dataset through the real builder, pipeline and runner."""
import copy

import jax
import pytest
from flax import nnx

from abscot_jax.config import load_config
from abscot_jax.data.dolci import DolciExample
from abscot_jax.data.sequences import BuildConfig, SequenceBuilder
from abscot_jax.model.config import Qwen3Config
from abscot_jax.model.qwen3 import Qwen3
from abscot_jax.sharding import MeshConfig, make_mesh
from abscot_jax.train.runner import run_phase
from abscot_jax.vocab import add_abstract_tokens


@pytest.mark.slow
def test_tiny_model_overfits_tiny_phase_a_dataset(tmp_path, tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    add_abstract_tokens(tokenizer)
    examples = [DolciExample(id=f"ex{i}", prompt_messages=({"role": "user", "content": f"add {i} and {i + 3}"},),
                             cot=f"{i} plus {i + 3}\nis {2 * i + 3}", answer=f"\\boxed{{{2 * i + 3}}}")
                for i in range(4)]
    built = SequenceBuilder(tokenizer, BuildConfig(seq_len=128, m_max=8)).build_all(examples, "A")
    assert len(built) == 4
    cfg = load_config(None, ["train.mode=full", "train.seq_len=128", "train.batch_size=2", "train.epochs=100",
                             "train.checkpoint_every=1000", "optim.learning_rate=1e-2", "optim.warmup_ratio=0.05"])
    model = Qwen3(Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16), rngs=nnx.Rngs(0))
    _, summary = run_phase(model, built, cfg, tmp_path, make_mesh(MeshConfig(), jax.devices()[:1]), progress=False)
    # The trace is random, so a model that has not memorised pays about ln(64) = 4.2 nats per trace
    # token and ln(vocab) ~ 6.4 at the start; 0.1 nats/token means the targets are predicted with
    # probability ~0.9 on average: the four examples are memorised, trace included.
    assert summary["first_loss"] > 4.0
    assert summary["final_loss"] < 0.1, summary
