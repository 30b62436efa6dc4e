"""Qwen3 decoder in Flax NNX.

Layer weights are stacked along a leading `layers` axis and the training forward
(`hidden_states`) runs `jax.lax.scan` over them: XLA compiles one layer body whatever the depth, so
a 36-layer Qwen3-4B compiles about as fast as a 2-layer toy (a Python loop would unroll 36 copies
into the graph). Generation (`decode`) runs the same layer (`decoder_layer`) unrolled over per-layer
weights and KV-cache buffers, which its few rows per step make worth the longer compile.
Each parameter carries its logical axes (`axes=`) which `abscot_jax.sharding` maps to mesh axes.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from abscot_jax.model.attention import bottleneck_attention, cached_attention
from abscot_jax.model.config import ATTENTION_OUT, PROJECTION_OUT, REMAT_POLICIES, Qwen3Config
from abscot_jax.sharding import constrain, gathered

# name -> (logical axes of the stacked kernel [layers, in, out])
PROJECTIONS = {
    "q_proj": ("layers", "embed", "heads"),
    "k_proj": ("layers", "embed", "kv_heads"),
    "v_proj": ("layers", "embed", "kv_heads"),
    "o_proj": ("layers", "heads", "embed"),
    "gate_proj": ("layers", "embed", "mlp"),
    "up_proj": ("layers", "embed", "mlp"),
    "down_proj": ("layers", "mlp", "embed"),
}
# Projections that generation runs as one matmul on concatenated kernels (`layer_params_list`).
FUSED_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
HIDDEN = ("batch", None, None)  # logical axes of the residual stream [B, T, hidden]
NORMS = {
    "input_norm": ("layers", "norm"),
    "post_attn_norm": ("layers", "norm"),
    "q_norm": ("layers", "norm"),
    "k_norm": ("layers", "norm"),
}


def layer_axes(name: str) -> tuple[str, ...] | None:
    """Logical axes of one layer's slice of a stacked projection or norm (None for generation's fused kernels)."""
    axes = {**PROJECTIONS, **NORMS}.get(name)
    return axes and axes[1:]


def lora_axes(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Logical axes of projection `name`'s stacked LoRA arrays: a [layers, in, r], b [layers, r, out]."""
    layers, in_axis, out_axis = PROJECTIONS[name]
    return (layers, in_axis, "lora_rank"), (layers, "lora_rank", out_axis)


def projection_shapes(cfg: Qwen3Config) -> dict[str, tuple[int, int]]:
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return {
        "q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
        "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
    }


def norm_sizes(cfg: Qwen3Config) -> dict[str, int]:
    d, hd = cfg.hidden_size, cfg.head_dim
    return {"input_norm": d, "post_attn_norm": d, "q_norm": hd, "k_norm": hd}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for generation. Slots fill left to right, in step across rows.

    One array per layer, head-major: generation runs the layers unrolled (see `hidden_states`), and
    separate per-layer buffers are updated in place with no slicing of a stacked cache."""

    k: tuple[jax.Array, ...]  # per layer [B, kv_heads, head_dim, S] (keys transposed, see cached_attention)
    v: tuple[jax.Array, ...]  # per layer [B, kv_heads, S, head_dim]
    valid: jax.Array  # bool[B, S]: slot holds a real (non-pad) token
    length: jax.Array  # int32[]: slots written so far

    @classmethod
    def zeros(cls, cfg: Qwen3Config, batch: int, max_len: int) -> "KVCache":
        def zeros(*shape):
            return tuple(jnp.zeros(shape, cfg.jnp_compute_dtype) for _ in range(cfg.num_hidden_layers))

        kv, d = cfg.num_key_value_heads, cfg.head_dim
        return cls(zeros(batch, kv, d, max_len), zeros(batch, kv, max_len, d),
                   jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))


def rms_norm(x, weight, eps):
    # As in transformers: normalise in fp32, cast back, then scale.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def rope_tables(positions, head_dim, theta, dtype):
    """cos, sin of shape [B, T, head_dim] (the two halves repeat, as in transformers)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x, cos, sin):
    """x: [B, T, heads, head_dim]; rotate-half convention."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lora_delta(h: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """The LoRA update `(h @ a) @ b * scale` of a projection, h [..., in], a [in, r], b [r, out]."""
    return (h @ a) @ b * jnp.asarray(scale, h.dtype)


def _lora_delta_fwd(h, a, b, scale):
    ha = h @ a
    return ha @ b * jnp.asarray(scale, h.dtype), (h, a, b, ha)


def _lora_delta_bwd(scale, residuals, g):
    h, a, b, ha = residuals
    g_ha = (g @ b.T) * jnp.asarray(scale, g.dtype)
    d_b = jnp.einsum("...r,...o->ro", ha, g) * jnp.asarray(scale, g.dtype)
    # d_a = h^T g_ha, computed as (g_ha^T h)^T: left to autodiff, XLA on CPU transposes the whole
    # [tokens, in] activation for this product; transposing the small [r, in] result is cheaper
    # (measured: the LoRA step 10.7 s -> 8.7 s on the bench_train model).
    d_a = jnp.einsum("...r,...i->ri", g_ha, h).T
    d_h = g_ha @ a.T
    return d_h.astype(h.dtype), d_a.astype(a.dtype), d_b.astype(b.dtype)


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def head_logits(hidden: jax.Array, kernel: jax.Array, new_kernel: jax.Array | None, new_token_start: int) -> jax.Array:
    """fp32 logits [..., V] of hidden states [..., D]: `hidden @ kernel` ([D, V], compute dtype, fp32
    accumulation), plus `hidden @ new_kernel` ([D, n], the new tokens' fp32 trainable rows, or None)
    added at columns [new_token_start, + n). The latter runs on fp32 operands at full precision, so
    the rows and their gradients see no bf16 or TF32 rounding; with n in the tens it costs nothing."""
    out = jnp.einsum("...d,dv->...v", hidden, kernel, preferred_element_type=jnp.float32)
    if new_kernel is not None:
        new = jnp.einsum("...d,dn->...n", hidden.astype(jnp.float32), new_kernel, precision=jax.lax.Precision.HIGHEST)
        out = out.at[..., new_token_start:new_token_start + new.shape[-1]].add(new)
    return out


class Qwen3(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
        self.config = cfg
        dtype = cfg.jnp_param_dtype
        init = nnx.initializers.normal(0.02)
        layers = cfg.num_hidden_layers
        self.embed = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), dtype), axes=("vocab", "embed"))
        for name, (fan_in, fan_out) in projection_shapes(cfg).items():
            setattr(self, name, nnx.Param(init(rngs.params(), (layers, fan_in, fan_out), dtype), axes=PROJECTIONS[name]))
        for name, size in norm_sizes(cfg).items():
            setattr(self, name, nnx.Param(jnp.ones((layers, size), dtype), axes=NORMS[name]))
        self.final_norm = nnx.Param(jnp.ones((cfg.hidden_size,), dtype), axes=("norm",))
        # nnx.data: these may hold None now and a parameter later (growth, LoRA).
        self.lm_head = nnx.data(
            None if cfg.tie_word_embeddings
            else nnx.Param(init(rngs.params(), (cfg.hidden_size, cfg.vocab_size), dtype), axes=("embed", "vocab"))
        )
        # LoRA (abscot_jax.model.lora adds it): `lora` maps a projection's name to its LoRAAdapter
        # (a [layers, in, r], b [layers, r, out]), and trainable deltas for the rows of the new tokens
        # [new_token_start, new_token_start + n): `embed_delta` [n, D], `head_delta` [D, n] if untied.
        self.lora = nnx.Dict()
        self.lora_scale = 0.0
        self.lora_dropout = 0.0
        self.new_token_start = 0
        self.embed_delta = nnx.data(None)
        self.head_delta = nnx.data(None)

    # ---- pieces -------------------------------------------------------------------------------
    def layer_params(self) -> dict:
        """Stacked per-layer arrays in compute dtype, scanned over by the forward: each projection
        and norm by name, and under "lora" an (a, b) pair for each projection with an adapter."""
        dtype = self.config.jnp_compute_dtype
        params = {n: getattr(self, n)[...].astype(dtype) for n in [*PROJECTIONS, *NORMS]}
        params["lora"] = {n: (adapter.a[...].astype(dtype), adapter.b[...].astype(dtype))
                          for n, adapter in self.lora.items()}
        return params

    def layer_params_list(self) -> list[dict]:
        """`layer_params()` split into one dict per layer, for generation. Compute it once, outside
        a decode loop, and pass it as `decode(layers=...)`: on CPU, XLA copies a stacked
        weight's layer slice at every use (12 MB a layer of the bench model, every step); split
        once, the copies are made once (at the cost of a second copy of the layer weights).
        The kernels of each FUSED_PROJECTIONS group without LoRA are concatenated (key
        "q_proj+k_proj+v_proj"): at decode's few rows, one wide matmul beats three narrow ones."""
        params = self.layer_params()
        for names in FUSED_PROJECTIONS:
            if not any(n in params["lora"] for n in names):
                params["+".join(names)] = jnp.concatenate([params.pop(n) for n in names], axis=-1)
        return [jax.tree.map(lambda p, i=i: p[i], params) for i in range(self.config.num_hidden_layers)]

    def embed_tokens(self, tokens):
        dtype = self.config.jnp_compute_dtype
        table = gathered(self.embed[...].astype(dtype), ("vocab", "embed"))
        x = jnp.take(table, tokens, axis=0)
        if self.embed_delta is not None:
            delta = self.embed_delta[...]
            index = tokens - self.new_token_start
            is_new = (index >= 0) & (index < delta.shape[0])
            rows = jnp.take(delta, jnp.clip(index, 0, delta.shape[0] - 1), axis=0).astype(dtype)
            x = x + jnp.where(is_new[..., None], rows, 0)
        return x

    def head_kernel(self) -> jax.Array:
        """[hidden, vocab] output projection (the embedding, transposed, when tied)."""
        kernel = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return gathered(kernel.astype(self.config.jnp_compute_dtype), ("embed", "vocab"))

    def new_token_kernel(self) -> jax.Array | None:
        """[hidden, n] fp32 trainable deltas of the new tokens' head columns (`head_delta`, or
        `embed_delta` transposed when tied), or None without them."""
        if self.embed_delta is None:
            return None
        return self.embed_delta[...].T if self.head_delta is None else self.head_delta[...]

    def logits(self, hidden) -> jax.Array:
        """fp32 logits [..., vocab] of final hidden states [..., hidden]."""
        return head_logits(hidden, self.head_kernel(), self.new_token_kernel(), self.new_token_start)

    # ---- forward ------------------------------------------------------------------------------
    def __call__(self, tokens, positions, segment_ids, roles) -> jax.Array:
        """Logits [B, T, vocab] (fp32) of a packed batch under the Abstract-CoT mask."""
        return self.logits(self.hidden_states(tokens, positions, segment_ids, roles))

    def hidden_states(self, tokens, positions, segment_ids, roles, *, num_layers: int | None = None,
                      dropout_key: jax.Array | None = None) -> jax.Array:
        """Final-normed hidden states [B, T, hidden] of one packed batch under the bottleneck mask,
        the layers scanned over their stacked weights. `num_layers` stops early and returns the
        un-normed residual stream after that many layers. `dropout_key` turns on LoRA dropout
        (training only)."""
        cfg = self.config
        x = constrain(self.embed_tokens(tokens), HIDDEN)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        depth = cfg.num_hidden_layers if num_layers is None else num_layers
        params = jax.tree.map(lambda w: w[:depth], self.layer_params())
        dropout = self.lora_dropout if dropout_key is not None else 0.0
        keys = jax.random.split(dropout_key if dropout > 0 else jax.random.key(0), cfg.num_hidden_layers)[:depth]

        def attend(q, k, v):
            return bottleneck_attention(q, k, v, segment_ids, roles, cfg.attention_impl), None

        def layer(x, scanned):
            p, key = scanned
            return decoder_layer(cfg, self.lora_scale, dropout, x, p, attend, cos, sin, key)[0], None

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        x, _ = jax.lax.scan(layer, x, (params, keys))
        if num_layers is not None:
            return x
        return rms_norm(x, self.final_norm[...].astype(x.dtype), cfg.rms_norm_eps)

    def decode(self, tokens, positions, segment_ids, cache: KVCache,
               layers: list[dict] | None = None) -> tuple[jax.Array, KVCache]:
        """Generation: final-normed hidden states [B, T, hidden] of `tokens` appended at cache slots
        [cache.length, cache.length + T), attending causally to every valid slot (pads have segment
        id 0), and the updated cache. The layers run unrolled, each on its own weights (`layers`,
        default `self.layer_params_list()`) and cache buffers: no per-step copies of weight or
        cache slices (decode step 1.7x faster on CPU)."""
        cfg = self.config
        x = constrain(self.embed_tokens(tokens), HIDDEN)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        t, max_len = tokens.shape[1], cache.valid.shape[1]
        start = cache.length
        valid = jax.lax.dynamic_update_slice(cache.valid, segment_ids != 0, (0, start))
        query_slot = start + jnp.arange(t)
        mask = valid[:, None, :] & (jnp.arange(max_len)[None, :] <= query_slot[:, None])[None]
        ks, vs = list(cache.k), list(cache.v)
        for i, p in enumerate(self.layer_params_list() if layers is None else layers):
            def attend(q, k, v, i=i):
                # In place: this layer's own buffers (k [B, KV, D, S], v [B, KV, S, D]) at slot `start`.
                k_all = jax.lax.dynamic_update_slice(ks[i], k.transpose(0, 2, 3, 1), (0, 0, 0, start))
                v_all = jax.lax.dynamic_update_slice(vs[i], v.transpose(0, 2, 1, 3), (0, 0, start, 0))
                return cached_attention(q, k_all, v_all, mask), (k_all, v_all)

            x, (ks[i], vs[i]) = decoder_layer(cfg, self.lora_scale, 0.0, x, p, attend, cos, sin)
        x = rms_norm(x, self.final_norm[...].astype(x.dtype), cfg.rms_norm_eps)
        return x, KVCache(tuple(ks), tuple(vs), valid, cache.length + t)


def project(h, p, name: str, lora_scale: float, dropout: float, key):
    """h @ p[name], plus its LoRA delta when `p["lora"]` has an adapter for it (inputs dropped out at
    `dropout`)."""
    out = h @ p[name]
    if name in p["lora"]:
        if dropout > 0:
            keep = jax.random.bernoulli(jax.random.fold_in(key, list(PROJECTIONS).index(name)), 1 - dropout, h.shape)
            h = jnp.where(keep, h / (1 - dropout), 0).astype(h.dtype)
        out = out + lora_delta(h, *p["lora"][name], lora_scale)
    return checkpoint_name(out, PROJECTION_OUT)


def decoder_layer(cfg: Qwen3Config, lora_scale: float, dropout: float, x, p: dict, attend, cos, sin, key=None):
    """One decoder layer on x [B, T, hidden] with its weights `p`; `attend(q, k, v)` returns the
    attention output [B, T, heads, head_dim] and what the caller keeps (a layer's cache). Returns
    (x, that)."""
    def project_all(h, names):
        """project() of each of `names`; one matmul when `p` holds their concatenated kernel."""
        if "+".join(names) not in p:
            return [project(h, p, n, lora_scale, dropout, key) for n in names]
        sizes = [projection_shapes(cfg)[n][1] for n in names]
        return jnp.split(h @ p["+".join(names)], [sum(sizes[:i]) for i in range(1, len(sizes))], axis=-1)

    lora = {name: tuple(gathered(w, axes[1:]) for w, axes in zip(pair, lora_axes(name)))
            for name, pair in p["lora"].items()}
    p = {name: gathered(w, layer_axes(name)) if layer_axes(name) else w for name, w in p.items() if name != "lora"}
    p["lora"] = lora
    b, t, _ = x.shape
    h = rms_norm(x, p["input_norm"], cfg.rms_norm_eps)
    q, k, v = project_all(h, ("q_proj", "k_proj", "v_proj"))
    q = constrain(q.reshape(b, t, cfg.num_attention_heads, cfg.head_dim), ("batch", None, "heads", None))
    k = constrain(k.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim), ("batch", None, "kv_heads", None))
    v = constrain(v.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim), ("batch", None, "kv_heads", None))
    q = apply_rope(rms_norm(q, p["q_norm"], cfg.rms_norm_eps), cos, sin)
    k = apply_rope(rms_norm(k, p["k_norm"], cfg.rms_norm_eps), cos, sin)
    attn, kept = attend(q, k, v)
    attn = checkpoint_name(attn, ATTENTION_OUT)
    x = x + project(constrain(attn.reshape(b, t, -1), ("batch", None, "heads")), p, "o_proj", lora_scale, dropout, key)
    h = rms_norm(x, p["post_attn_norm"], cfg.rms_norm_eps)
    gate, up = project_all(h, ("gate_proj", "up_proj"))
    mlp = constrain(jax.nn.silu(gate) * up, ("batch", None, "mlp"))
    return constrain(x + project(mlp, p, "down_proj", lora_scale, dropout, key), HIDDEN), kept
