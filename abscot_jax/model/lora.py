"""LoRA over the stacked Qwen3 projections, plus trainable rows for the new (abstract) tokens.

Our own rather than qwix's: qwix rewrites a model by intercepting its einsums per module, while
our layers are stacked arrays scanned by one pure function; an adapter here (a `LoRAAdapter` in
the model's `lora` mapping, by projection name) is two more stacked arrays read by the same
`project` call, which keeps the scan, the sharding rules and the merge in a few lines. The base
stays frozen (plain `nnx.Param`, bf16 if so configured); adapters and new-token rows are
`nnx.LoRAParam` (fp32), which is what the trainer selects in LoRA mode.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from abscot_jax.errors import ConfigError
from abscot_jax.model.qwen3 import PROJECTIONS, Qwen3, lora_axes, projection_shapes

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 32
    alpha: float = 64.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    train_new_token_rows: bool = True  # the new (abstract) tokens' embedding and head rows train too, as deltas

    def __post_init__(self):
        unknown = set(self.targets) - set(PROJECTIONS)
        if unknown:
            raise ConfigError(f"lora.targets: unknown {sorted(unknown)}; valid: {list(PROJECTIONS)}")
        if self.rank < 1:
            raise ConfigError("lora.rank must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ConfigError("lora.dropout must be in [0, 1)")


class LoRAAdapter(nnx.Module):
    """The adapter of one projection, stacked over layers: its update is `(h @ a) @ b * scale`
    (qwen3.lora_delta), a [layers, in, r] and b [layers, r, out]."""

    def __init__(self, name: str, a: jax.Array, b: jax.Array):
        a_axes, b_axes = lora_axes(name)
        self.a = nnx.LoRAParam(a, axes=a_axes)
        self.b = nnx.LoRAParam(b, axes=b_axes)


def apply_lora(model: Qwen3, cfg: LoRAConfig, *, new_token_start: int | None = None, num_new_tokens: int = 0,
               seed: int = 0) -> Qwen3:
    """Add adapters in place: A ~ N(0, 1/in) (as PEFT's kaiming-uniform scale), B = 0, so the
    adapted model starts exactly at the base. New-token rows start at zero deltas."""
    key = jax.random.key(seed)
    layers = model.config.num_hidden_layers
    for i, name in enumerate(cfg.targets):
        fan_in, fan_out = projection_shapes(model.config)[name]
        a = jax.random.normal(jax.random.fold_in(key, i), (layers, fan_in, cfg.rank), jnp.float32) / fan_in**0.5
        model.lora[name] = LoRAAdapter(name, a, jnp.zeros((layers, cfg.rank, fan_out)))
    model.lora_scale = cfg.alpha / cfg.rank
    model.lora_dropout = cfg.dropout
    if cfg.train_new_token_rows and num_new_tokens:
        d = model.config.hidden_size
        model.new_token_start = new_token_start
        model.embed_delta = nnx.LoRAParam(jnp.zeros((num_new_tokens, d)), axes=("new_tokens", "embed"))
        if model.lm_head is not None:
            model.head_delta = nnx.LoRAParam(jnp.zeros((d, num_new_tokens)), axes=("embed", "new_tokens"))
    return model


def merge_lora(model: Qwen3) -> Qwen3:
    """Fold adapters and new-token deltas into the base weights, in place; the result has no LoRA.
    Merging runs in fp32 and casts back to the base's dtype."""
    for name, adapter in model.lora.items():
        base = getattr(model, name)
        delta = jnp.einsum("lir,lro->lio", adapter.a[...], adapter.b[...])
        base[...] = (base[...].astype(jnp.float32) + model.lora_scale * delta).astype(base[...].dtype)
    model.lora = nnx.Dict()
    if model.embed_delta is not None:
        rows = slice(model.new_token_start, model.new_token_start + model.embed_delta[...].shape[0])
        embed = model.embed[...]
        model.embed[...] = embed.at[rows].add(model.embed_delta[...].astype(embed.dtype))
        if model.head_delta is not None:
            head = model.lm_head[...]
            model.lm_head[...] = head.at[:, rows].add(model.head_delta[...].astype(head.dtype))
        model.embed_delta = None
        model.head_delta = None
    model.lora_scale = 0.0
    model.lora_dropout = 0.0
    return model


def has_lora(model: Qwen3) -> bool:
    return bool(nnx.state(model, nnx.LoRAParam))
