"""Qwen3's Hugging Face tensor names and shapes against this model's parameters: the one table
both directions of the checkpoint conversion (abscot_jax/checkpoint/hf.py) read."""
from __future__ import annotations

from typing import NamedTuple

from abscot_jax.model.config import Qwen3Config
from abscot_jax.model.qwen3 import PROJECTIONS, norm_sizes, projection_shapes

# Our parameter name -> HF tensor name (per layer: a template over the layer index).
HF_LAYER_NAMES = {
    "q_proj": "model.layers.{}.self_attn.q_proj.weight",
    "k_proj": "model.layers.{}.self_attn.k_proj.weight",
    "v_proj": "model.layers.{}.self_attn.v_proj.weight",
    "o_proj": "model.layers.{}.self_attn.o_proj.weight",
    "gate_proj": "model.layers.{}.mlp.gate_proj.weight",
    "up_proj": "model.layers.{}.mlp.up_proj.weight",
    "down_proj": "model.layers.{}.mlp.down_proj.weight",
    "input_norm": "model.layers.{}.input_layernorm.weight",
    "post_attn_norm": "model.layers.{}.post_attention_layernorm.weight",
    "q_norm": "model.layers.{}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{}.self_attn.k_norm.weight",
}
HF_GLOBAL_NAMES = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}
# torch.nn.Linear stores [out, in]; our kernels are [in, out].
TRANSPOSED = frozenset(PROJECTIONS) | {"lm_head"}


class HFSpec(NamedTuple):
    hf_name: str
    param: str  # our (stacked) parameter
    layer: int | None  # its layer, None for the global ones
    shape: tuple[int, ...]  # the HF tensor's shape


def hf_tensor_specs(cfg: Qwen3Config) -> list[HFSpec]:
    """Every HF tensor of the model, grouped by our parameter (all layers of one stacked
    parameter together, so a writer needs one parameter in memory at a time)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    per_layer = {name: (fan_out, fan_in) for name, (fan_in, fan_out) in projection_shapes(cfg).items()}
    per_layer.update({name: (size,) for name, size in norm_sizes(cfg).items()})
    specs = [HFSpec(HF_GLOBAL_NAMES["embed"], "embed", None, (v, d))]
    for name, shape in per_layer.items():
        specs += [HFSpec(HF_LAYER_NAMES[name].format(i), name, i, shape) for i in range(cfg.num_hidden_layers)]
    specs.append(HFSpec(HF_GLOBAL_NAMES["final_norm"], "final_norm", None, (d,)))
    if not cfg.tie_word_embeddings:
        specs.append(HFSpec(HF_GLOBAL_NAMES["lm_head"], "lm_head", None, (v, d)))
    return specs
