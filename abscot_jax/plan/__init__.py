"""Memory plan: bytes per device for a training config (whether it fits: the command line,
`python -m abscot_jax.plan`, in __main__.py).

`memory_plan` is a pure function of the architecture, the run config and the device count. It
counts what the code keeps, checked against XLA's own accounting of the compiled train step
(tests/test_plan.py: within 15% on CPU; on an H200, LoRA runs measured 22-26% above the plan, see
docs/BENCHMARKS.md):

- parameters: the frozen base in `model.param_dtype`; trainable ones in their own dtype (LoRA
  adapters and new-token rows are fp32); each split by the same partition rules as the real
  state (`abscot_jax.sharding.spec_for`). Weights whose dtype is not the compute dtype are cast
  once per step (a compute-dtype copy); with fsdp, one layer at a time is all-gathered.
- gradients: the accumulator is `zeros_like(trainable)`; with grad_accum > 1 one micro-batch's
  gradients sit beside it.
- optimizer: optax AdamW keeps m and v in each parameter's dtype.
- activations, per micro-batch of N = rows x T tokens on the device. Per token and layer the
  forward saves for the backward (read off `jax.ad_checkpoint.print_saved_residuals`;
  c = compute-dtype bytes; w = 1 when the norm weights train, else 0):
      norms   2·D·(4 + c·(1+w))          fp32 copy of each norm's input, its output (and pre-scale value)
      q, k    (H+KV)·hd·(4 + c·(1+w))    fp32 pre-norm copy, normed (pre-scale), after RoPE
      v, out  (KV+H)·hd·c                values and the attention output (the o_proj input)
      scores  H·T·(4 + c)                fp32 softmax and the probabilities in compute dtype (xla kernel);
              H·(hd·c + 4)               a fused kernel's (blockwise, pallas, cudnn) copy of its output
                                         and log-sum-exp
      mlp     6·F·c                      gate, up, the silu pieces, their product
      lora    targets·r·c                each adapter's rank-r intermediate
  R = their sum; R_lin = R without the scores; S = the attention backward's own buffers:
  rows·H·T²·4 (xla: one layer's fp32 scores), N·(H+2KV)·hd·4 (blockwise: fp32 dq, dk, dv),
  N·((H+2KV)·hd·c + 4H) (pallas: dq, dk, dv and rowsum(dO·O)), and for cudnn its dq, dk, dv plus
  the gradient of its bf16 [rows, T, T] mask bias. "auto" is counted as pallas (a GPU's choice).
      remat none:      saved L·N·R; one layer's backward in flight: N·R
      remat layer:     saved L·N·D·c (each layer's input); one layer's backward: N·R recomputed
                       + ½(N·R_lin + S) of gradients alive beside it
      remat dots:      saved L·N·(2D + (H+2KV)·hd + 2F)·c (input, q, k, v, o, gate, up outputs)
      remat attention: saved L·N·(D + H·hd)·c (input, attention output)
                       With either, the MLP half of a layer (post-attention norm, mlp) is recomputed
                       without attention, so the backward takes one half at a time: the larger of
                       N·R_half recomputed + N·R_half_lin (+ S, attention half) of gradients.
  LoRA adds one [N, out] adapter output per target to the backward. The backward of a layer and
  the chunked loss (2 x [chunk, V] fp32: logits and their gradient) are not alive together: the
  larger counts. Plus the bool mask [rows, H, T, T] (xla) or the bias (cudnn), and the final norm's input and
  output. Activations split over data x fsdp (the batch) and, for head and MLP activations, over
  tensor (they follow their weights).
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
from pathlib import Path

from abscot_jax.config import RunConfig
from abscot_jax.errors import ConfigError
from abscot_jax.model.config import Qwen3Config
from abscot_jax.model.qwen3 import NORMS, PROJECTIONS, lora_axes, norm_sizes, projection_shapes
from abscot_jax.sharding import LOGICAL_RULES, check_tensor_split, spec_for
from abscot_jax.vocab import NEW_TOKENS

GiB = 2**30

# Architectures by name, so the plan works offline (values from the models' config.json).
PRESETS = {
    "qwen3-4b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
        "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000, "tie_word_embeddings": True, "max_position_embeddings": 40960,
    },
}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device. `activation_terms` breaks `activations` down (name -> bytes);
    `working_set_terms` are the two candidates of which the larger is counted."""

    mesh: tuple[int, int, int]  # data, fsdp, tensor
    frozen_params: int
    trainable_params: int
    compute_copy: int  # weights cast to the compute dtype (0 when param and compute dtypes agree)
    gradients: int
    optimizer: int
    activations: int
    activation_terms: dict[str, int]
    working_set_terms: dict[str, int]
    per_token_layer_bytes: dict[str, int]  # R, term by term
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return (self.frozen_params + self.trainable_params + self.compute_copy + self.gradients
                + self.optimizer + self.activations)


@dataclasses.dataclass(frozen=True)
class _Array:
    name: str
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axes, as declared beside the parameter in the model
    itemsize: int
    trainable: bool
    stacked: bool = False  # [layers, ...]: the scan reads one layer at a time


DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def _parameters(cfg: Qwen3Config, run: RunConfig) -> list[_Array]:
    """Every array of the model state, as Qwen3 + apply_lora build them."""
    mode, p = run.train.mode, DTYPE_BYTES[run.model.param_dtype]
    base_trains = mode == "full"
    embed_trains = base_trains or run.train.train_embedding
    d, v, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    arrays = [_Array("embed", (v, d), ("vocab", "embed"), p, embed_trains),
              _Array("final_norm", (d,), ("norm",), p, base_trains)]
    if not cfg.tie_word_embeddings:
        arrays.append(_Array("lm_head", (d, v), ("embed", "vocab"), p, embed_trains))
    for name, (fan_in, fan_out) in projection_shapes(cfg).items():
        arrays.append(_Array(name, (layers, fan_in, fan_out), PROJECTIONS[name], p, base_trains, True))
    for name, size in norm_sizes(cfg).items():
        arrays.append(_Array(name, (layers, size), NORMS[name], p, base_trains, True))
    if mode == "lora":
        r = run.lora.rank
        for name in run.lora.targets:
            (fan_in, fan_out), (a_axes, b_axes) = projection_shapes(cfg)[name], lora_axes(name)
            arrays.append(_Array(f"lora/{name}/a", (layers, fan_in, r), a_axes, 4, True, True))
            arrays.append(_Array(f"lora/{name}/b", (layers, r, fan_out), b_axes, 4, True, True))
        if run.model.add_abstract_vocab:  # the new tokens' rows train, as fp32 deltas
            n = len(NEW_TOKENS)
            arrays.append(_Array("embed_delta", (n, d), ("new_tokens", "embed"), 4, True))
            if not cfg.tie_word_embeddings:
                arrays.append(_Array("head_delta", (d, n), ("embed", "new_tokens"), 4, True))
    return arrays


def _bytes_per_device(array: _Array, mesh_shape: dict[str, int], itemsize: int | None = None) -> int:
    """Size of the array's shard under the partition rules (the same function the state uses)."""
    spec = spec_for(array.axes, array.shape, types.SimpleNamespace(shape=mesh_shape))
    shards = math.prod(mesh_shape[a] for a in spec if a is not None)
    return math.prod(array.shape) * (itemsize or array.itemsize) // shards


def _split(width: int, logical_axis: str, mesh_shape: dict[str, int]) -> int:
    """How many ways an activation dimension is split: as the weight dimension it comes from."""
    mesh_axis = LOGICAL_RULES.get(logical_axis)
    if mesh_axis is None or width % mesh_shape[mesh_axis]:
        return 1
    return mesh_shape[mesh_axis] if mesh_axis == "tensor" else 1  # fsdp splits weights, not these


def memory_plan(model_cfg: Qwen3Config, run_cfg: RunConfig, num_devices: int) -> MemoryPlan:
    """Bytes per device to train `model_cfg` as `run_cfg` says on `num_devices` devices.

    The architecture comes from `model_cfg`; everything the run chooses (param/compute dtype,
    remat, attention kernel, mode, batch, sequence, loss chunk, mesh) from `run_cfg`.
    """
    cfg, run, t = model_cfg, run_cfg, run_cfg.train
    data, fsdp, tensor = run.mesh.shape(num_devices)
    check_tensor_split(cfg.num_attention_heads, tensor)
    mesh = {"data": data, "fsdp": fsdp, "tensor": tensor}
    c = DTYPE_BYTES[run.model.compute_dtype]
    notes = []

    # ---- parameters, gradients, optimizer state ----------------------------------------------
    arrays = _parameters(cfg, run)
    frozen = sum(_bytes_per_device(a, mesh) for a in arrays if not a.trainable)
    trainable = sum(_bytes_per_device(a, mesh) for a in arrays if a.trainable)
    compute_copy = sum(_bytes_per_device(a, mesh, c) for a in arrays if a.itemsize != c)
    if fsdp > 1:  # inside the scan each layer's weights are all-gathered over fsdp, one layer at a time
        gathered = {**mesh, "fsdp": 1}
        compute_copy += sum(_bytes_per_device(a, gathered, c) for a in arrays if a.stacked) // cfg.num_hidden_layers
    gradients = trainable * (2 if t.grad_accum > 1 else 1)  # accumulator (+ this micro-batch's)
    optimizer = 2 * trainable  # AdamW m and v

    # ---- activations ---------------------------------------------------------------------------
    batch_shards = data * fsdp
    rows = t.batch_size // batch_shards if t.batch_size % batch_shards == 0 else t.batch_size
    if rows == t.batch_size and batch_shards > 1:
        notes.append(f"train.batch_size={t.batch_size} is not a multiple of data*fsdp={batch_shards}: "
                     "activations counted unsplit")
    seq, layers = t.seq_len, cfg.num_hidden_layers
    n = rows * seq  # tokens per device per micro-batch
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    th = _split(kv * hd, "kv_heads", mesh) if (h * hd) % tensor == 0 and kv % tensor == 0 else 1
    tf = _split(f, "mlp", mesh)
    w = 1 if t.mode == "full" else 0
    # "xla" builds [T, T] scores; "auto" is the fused Pallas kernel on a GPU (what a plan is for).
    impl = {"auto": "pallas"}.get(run.model.attention_impl, run.model.attention_impl)
    dense = impl == "xla"
    targets = run.lora.targets if t.mode == "lora" else ()

    per_token = {  # R: bytes saved per token per layer
        "norms": 2 * d * (4 + c * (1 + w)),
        "q, k": (h + kv) * hd * (4 + c * (1 + w)) // th,
        "v, attention output": (kv + h) * hd * c // th,
        # Dense: fp32 softmax + probabilities. A fused kernel: its own copy of the output (in its
        # layout) and the fp32 log-sum-exp.
        "scores": (h * seq * (4 + c) if dense else h * (hd * c + 4)) // th,
        "mlp": 6 * f * c // tf,
        "lora": len(targets) * run.lora.rank * c,
    }
    r_all = n * sum(per_token.values())
    r_lin = r_all - n * per_token["scores"]
    # S, the attention backward's own buffers: one layer's fp32 scores (xla); fp32 dq, dk, dv
    # accumulators (blockwise); dq, dk, dv in compute dtype and an fp32 rowsum(dO * O) (pallas);
    # those and the [rows, T, T] bias gradient cuDNN computes (cudnn).
    scores = {
        "xla": rows * h * seq * seq * 4,
        "blockwise": n * (h + 2 * kv) * hd * 4,
        "pallas": n * ((h + 2 * kv) * hd * c + h * 4),
        "cudnn": n * (h + 2 * kv) * hd * c + rows * seq * seq * 2 * th,
    }[impl] // th

    def adapter_outputs(names):  # one [N, out] adapter output per LoRA target in the backward
        return sum(n * c * fan_out // _split(fan_out, PROJECTIONS[name][2], mesh)
                   for name, (_, fan_out) in projection_shapes(cfg).items() if name in names)

    if run.model.remat == "none":
        saved = ("saved: L·N·R", layers * r_all)
        layer_backward = r_all + adapter_outputs(targets)
    else:
        what, kept = {  # beside each layer's input (D·c per token)
            "layer": ("each layer's input", 0),
            "dots": ("each layer's input, q, k, v, o, gate, up", ((h + 2 * kv) * hd // th + d + 2 * f // tf) * c),
            "attention": ("each layer's input, attention output", h * hd * c // th),
        }[run.model.remat]
        saved = (f"saved: {what}", layers * n * (d * c + kept))
        if run.model.remat == "layer":
            layer_backward = r_all + (r_lin + scores) // 2 + adapter_outputs(targets)
        else:  # one half at a time (see above): attention (input norm, q, k, v, scores, output), MLP
            attention_targets = [name for name in targets if name in ("q_proj", "k_proj", "v_proj", "o_proj")]
            r_attention = n * (per_token["norms"] // 2 + per_token["q, k"] + per_token["v, attention output"]
                               + per_token["scores"] + len(attention_targets) * run.lora.rank * c)
            r_mlp = r_all - r_attention
            layer_backward = max(
                2 * r_attention - n * per_token["scores"] + scores + adapter_outputs(attention_targets),
                2 * r_mlp + adapter_outputs(set(targets) - set(attention_targets)))

    chunk = min(t.loss_chunk, t.batch_size * seq)  # loss_sums never takes more tokens than there are
    chunk_rows = chunk // batch_shards if chunk % batch_shards == 0 else chunk
    loss_chunk = 2 * chunk_rows * cfg.vocab_size * 4 // _split(cfg.vocab_size, "vocab", mesh)

    terms = {
        saved[0]: saved[1],
        ("working set: one layer's backward" if layer_backward >= loss_chunk
         else "working set: loss chunk, 2 x [chunk, V] fp32"): max(layer_backward, loss_chunk),
        "attention mask, bool [rows, H, T, T]": rows * h * seq * seq // th if dense else 0,
        "attention bias, bf16 [rows, T, T] (cudnn)": rows * seq * seq * 2 if impl == "cudnn" else 0,
        "final norm input + output": n * d * (4 + c),
    }
    terms = {name: size for name, size in terms.items() if size}
    return MemoryPlan(
        mesh=(data, fsdp, tensor), frozen_params=frozen, trainable_params=trainable, compute_copy=compute_copy,
        gradients=gradients, optimizer=optimizer, activations=sum(terms.values()), activation_terms=terms,
        working_set_terms={"one layer's backward": layer_backward, "loss chunk": loss_chunk},
        per_token_layer_bytes=per_token, notes=tuple(notes),
    )


def load_model_config(source: str, run: RunConfig, option: str = "--hf-config") -> Qwen3Config:
    """A preset name, a config.json, or a directory holding one. `option` names where `source`
    came from, for the error message."""
    overrides = dict(param_dtype=run.model.param_dtype, compute_dtype=run.model.compute_dtype,
                     remat=run.model.remat, attention_impl=run.model.attention_impl)
    if source.lower() in PRESETS:
        return Qwen3Config.from_hf_dict(PRESETS[source.lower()], **overrides)
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{option} {source}: no such preset, config.json or model directory; pass "
                          f"--hf-config {' | '.join(PRESETS)} (the architecture, offline), "
                          "--hf-config CONFIG_JSON or --set model.hf_dir=DIR")
    try:
        return Qwen3Config.from_hf_dict(json.loads(path.read_text()), **overrides)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except KeyError as e:
        raise ConfigError(f"{path}: no {e.args[0]!r}; not a Qwen3 config.json") from None
