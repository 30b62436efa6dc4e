"""Qwen3 architecture configuration, read from (and written back to) a Hugging Face config.json."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from abscot_jax.errors import ConfigError

SUPPORTED_ARCHITECTURE = "Qwen3ForCausalLM"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Values the layer tags (`jax.ad_checkpoint.checkpoint_name`) for the remat policies to save.
PROJECTION_OUT = "projection_out"  # each projection's output, LoRA update included
ATTENTION_OUT = "attention_out"  # the attention output (o_proj's input)
# `remat` -> the policy of the checkpointed layer (None: no remat); `abscot_jax.config.ModelSection`
# says what each keeps.
REMAT_POLICIES = {
    "none": None,
    "layer": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_only_these_names(PROJECTION_OUT),
    "attention": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT),
}


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960
    # Not part of the architecture: how we store and compute.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"  # a key of REMAT_POLICIES
    attention_impl: str = "xla"

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        for field in ("param_dtype", "compute_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ConfigError(f"{field}={getattr(self, field)!r}; expected one of {sorted(DTYPES)}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat={self.remat!r}; expected one of {', '.join(REMAT_POLICIES)}")

    @property
    def jnp_param_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def jnp_compute_dtype(self):
        return DTYPES[self.compute_dtype]

    def replace(self, **changes) -> "Qwen3Config":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, hf: dict, **overrides) -> "Qwen3Config":
        architectures = hf.get("architectures") or [hf.get("model_type", "?")]
        if hf.get("model_type") != "qwen3" and SUPPORTED_ARCHITECTURE not in architectures:
            raise ConfigError(
                f"unsupported architecture {architectures[0]!r} (model_type {hf.get('model_type')!r}); "
                f"only {SUPPORTED_ARCHITECTURE} (model_type 'qwen3') is supported"
            )
        if hf.get("attention_bias"):
            raise ConfigError("attention_bias=true is not Qwen3's architecture; not supported")
        if hf.get("use_sliding_window"):
            raise ConfigError("use_sliding_window=true is not supported; set it to false")
        # Newer transformers write `rope_parameters`; older ones `rope_theta` (+ `rope_scaling`).
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope type {rope_type!r} is not supported; only the default RoPE")
        theta = rope.get("rope_theta", hf.get("rope_theta", 1_000_000.0))
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads", heads),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 40960),
            **overrides,
        )

    @classmethod
    def from_hf_dir(cls, hf_dir: str | Path, **overrides) -> "Qwen3Config":
        path = Path(hf_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found: not a Hugging Face model directory")
        return cls.from_hf_dict(json.loads(path.read_text()), **overrides)

    def to_hf_dict(self, base: dict | None = None, torch_dtype: str = "float32") -> dict:
        """config.json content; `base` (the source config) keeps fields we do not model."""
        out = dict(base or {})
        out.pop("rope_scaling", None)
        out.update(
            architectures=[SUPPORTED_ARCHITECTURE],
            model_type="qwen3",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act="silu",
            attention_bias=False,
            torch_dtype=torch_dtype,
        )
        if "rope_parameters" in out:
            out["rope_parameters"] = {**out["rope_parameters"], "rope_type": "default", "rope_theta": self.rope_theta}
        else:
            out["rope_theta"] = self.rope_theta
        return out
