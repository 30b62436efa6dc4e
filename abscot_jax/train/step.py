"""The jitted train step: gradient accumulation, AdamW with warmup + cosine, global-norm clipping.

State is the split NNX graph of (model, optimizer); the step is one pure jitted function with
explicit in/out shardings and the state donated, so parameters are updated in place on device.
It is traced, compiled and run under `jax.set_mesh(mesh)`: the model's sharding constraints on
activations and gathered weights act only there (without them XLA all-gathers activations and
all-reduces logits instead of doing FSDP).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from abscot_jax.config import OptimSection, TrainSection
from abscot_jax.sharding import batch_sharding, check_tensor_split, state_shardings
from abscot_jax.train.loss import loss_sums, mean_losses

BATCH_KEYS = ("tokens", "positions", "segment_ids", "roles", "targets", "loss_mask")


def trainable_filter(mode: str, train_embedding: bool = False):
    """Which variables train. LoRA: adapters + new-token rows (nnx.LoRAParam), optionally the
    whole embedding/head too. Full: every parameter."""
    if mode == "full":
        return nnx.Param
    if train_embedding:
        return nnx.Any(nnx.LoRAParam, nnx.PathContains("embed"), nnx.PathContains("lm_head"))
    return nnx.LoRAParam


def make_optimizer(optim: OptimSection, total_steps: int) -> optax.GradientTransformation:
    warmup = int(optim.warmup_ratio * total_steps)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=optim.learning_rate * optim.min_lr_ratio,
    )
    # No weight decay on norms (1-D per layer: [layers, size] and [size]) or new-token rows.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2 and p.shape[-1] > 1, params)
    return optax.chain(
        optax.clip_by_global_norm(optim.clip_norm),
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                    mask=decay_mask if optim.weight_decay else None),
    ), schedule


SUM_KEYS = ("nll", "weight", "trace_nll", "trace_weight", "answer_nll", "answer_weight")


def accumulated_grads(model, wrt, batch: dict, key, chunk: int):
    """Gradients of the summed loss over the micro-batches ([accum, B, T] arrays) and the summed
    figures. Summing, then dividing once by the total weight, gives the exact token-mean of the
    whole step whatever the micro-batch split."""
    model_def, trainable, frozen = nnx.split(model, wrt, ...)

    def loss_fn(trainable, micro_batch, micro_key):
        sums = loss_sums(nnx.merge(model_def, trainable, frozen), micro_batch, chunk=chunk, dropout_key=micro_key)
        return sums["nll"], sums

    def accumulate(carry, xs):
        i, micro_batch = xs
        grads, sums = jax.grad(loss_fn, has_aux=True)(trainable, micro_batch, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

    zeros = (jax.tree.map(jnp.zeros_like, trainable), {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS})
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(batch["tokens"].shape[0]), batch))
    return grads, sums


@dataclasses.dataclass
class TrainStep:
    """Holds the compiled step and the sharded state of (model, optimizer)."""

    graphdef: Any
    state: Any
    step_fn: Any
    schedule: Any
    mesh: Any
    compiled: Any = None  # set by `compile`; used instead of step_fn once there

    @classmethod
    def create(cls, model, optim: OptimSection, train: TrainSection, total_steps: int, mesh, seed: int = 0):
        check_tensor_split(model.config.num_attention_heads, mesh.shape["tensor"])
        wrt = trainable_filter(train.mode, train.train_embedding)
        tx, schedule = make_optimizer(optim, total_steps)
        optimizer = nnx.Optimizer(model, tx, wrt=wrt)
        graphdef, state = nnx.split((model, optimizer))
        shardings = state_shardings(state, mesh)
        with jax.set_mesh(mesh):
            state = jax.device_put(state, shardings)
        batch_spec = batch_sharding(mesh)
        data_sharding = {k: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *batch_spec.spec))
                         for k in BATCH_KEYS}
        base_key = jax.random.key(seed)
        chunk = train.loss_chunk

        def step(state, batch):
            model, optimizer = nnx.merge(graphdef, state)
            key = jax.random.fold_in(base_key, optimizer.step[...])
            grads, sums = accumulated_grads(model, wrt, batch, key, chunk)
            # Token-mean over everything in the step, whatever the micro-batch split.
            grads = jax.tree.map(lambda g: g / jnp.maximum(sums["weight"], 1.0), grads)
            metrics = mean_losses(sums)
            metrics["grad_norm"] = optax.global_norm(grads)
            metrics["lr"] = schedule(optimizer.step[...])
            optimizer.update(model, grads)
            return nnx.state((model, optimizer)), metrics

        step_fn = jax.jit(step, in_shardings=(shardings, data_sharding), out_shardings=(shardings, None),
                          donate_argnums=0)
        return cls(graphdef, state, step_fn, schedule, mesh)

    def compile(self, batch: dict):
        """Lower and compile the step for `batch`'s shapes ahead of time (the compiled executable is
        returned, e.g. for its HLO text and memory analysis, and used by every later call)."""
        with jax.set_mesh(self.mesh):
            self.compiled = self.step_fn.lower(self.state, {k: batch[k] for k in BATCH_KEYS}).compile()
        return self.compiled

    def __call__(self, batch: dict) -> dict:
        """One optimizer step on a batch of [grad_accum, B, T] arrays; returns the metrics (device arrays)."""
        with jax.set_mesh(self.mesh):
            self.state, metrics = (self.compiled or self.step_fn)(self.state, {k: batch[k] for k in BATCH_KEYS})
        return metrics

    def model(self):
        return nnx.merge(self.graphdef, self.state)[0]

    @property
    def step(self) -> int:
        return int(nnx.merge(self.graphdef, self.state)[1].step[...])
