"""The policy being trained: (model, optimizer) state on the mesh, the reference policy, and the
jitted pieces of a GRPO step.

Reference policy (the KL's other side), held as the trainable parameters it differs by:
  LoRA  the base with the adapters off: every `nnx.LoRAParam` leaf zero (the delta x·A·B vanishes,
        as do the new-token row deltas), whatever the adapters' structure; no copy of the base.
  full  a frozen copy of the starting weights.
(In LoRA mode with `train.train_embedding`, the embedding and head train too: they are copied.)

A step's rollouts come as a list of fixed-shape micro-batches (the packing decides how many).
Gradients of the summed loss are accumulated over them and divided once by the step's token
count, so the update is the token-mean over every rollout whatever the split; the sums are added
on the host in a fixed order, so a resumed run repeats them exactly.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from abscot_jax.rl.grpo import FREE, clipped_objective, token_logprobs
from abscot_jax.sharding import batch_sharding, check_tensor_split, state_shardings
from abscot_jax.train.step import make_optimizer, trainable_filter


def reference_params(model, wrt) -> tuple[nnx.State, nnx.State]:
    """The reference policy's values of the `wrt` parameters: LoRA leaves zero, the others copied.
    `nnx.update(model, *reference_params(...))` turns a copy of `model` into the reference."""
    adapters_off = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.All(wrt, nnx.LoRAParam)))
    frozen_copy = jax.tree.map(jnp.copy, nnx.state(model, nnx.All(wrt, nnx.Not(nnx.LoRAParam))))
    return adapters_off, frozen_copy


class PolicyTrainer:
    """`trace`: the sampler's TraceTokens (the abstract ids and `<endabstract>` of the constraint)."""

    def __init__(self, model, cfg, total_updates: int, mesh, trace):
        t, rl = cfg.train, cfg.rl
        check_tensor_split(model.config.num_attention_heads, mesh.shape["tensor"])
        self.mesh, self.wrt = mesh, trainable_filter(t.mode, t.train_embedding)
        reference = reference_params(model, self.wrt)
        tx, schedule = make_optimizer(dataclasses.replace(cfg.optim, learning_rate=rl.learning_rate), total_updates)
        optimizer = nnx.Optimizer(model, tx, wrt=self.wrt)
        self.graphdef, state = nnx.split((model, optimizer))
        shardings = state_shardings(state, mesh)
        with jax.set_mesh(mesh):
            self.state = jax.device_put(state, shardings)
            self.reference = jax.device_put(reference, state_shardings(reference, mesh))
        self.batch_sharding = batch_sharding(mesh)
        graphdef, wrt = self.graphdef, self.wrt
        options = dict(temperature=rl.temperature, abstract_ids=trace.abstract_ids, end_id=trace.end_id,
                       chunk=t.loss_chunk)

        def logprobs(state, params, batch):
            """Per-token log-probs of the policy (params None) or of the model with `params` set."""
            model, _ = nnx.merge(graphdef, state)
            if params is not None:
                nnx.update(model, *params)
            return token_logprobs(model, batch, **options)[0]

        def accumulate(state, grads_so_far, batch, first_pass):
            model_def, trainable, frozen = nnx.split(nnx.merge(graphdef, state)[0], wrt, ...)

            def loss_fn(trainable):
                logp, entropy = token_logprobs(nnx.merge(model_def, trainable, frozen), batch, **options)
                # In the first pass the policy is the one that sampled: take its log-probs' values from
                # the program that computed the reference's (the gradient stays this program's), so that
                # the ratio is exactly 1, and the KL exactly 0 while the weights equal the reference's.
                old = batch["old_logp"]
                logp = jnp.where(first_pass, old + (logp - jax.lax.stop_gradient(logp)), logp)
                sums = clipped_objective(logp, old, batch["ref_logp"], batch["advantages"], batch["weights"],
                                         clip_eps=rl.clip_eps, kl_weight=rl.kl_weight)
                trace_weights = batch["weights"] * (batch["allowed"] != FREE)
                sums.update(entropy=jnp.sum(trace_weights * entropy), trace_weight=jnp.sum(trace_weights))
                return sums["loss"], sums

            grads, sums = jax.grad(loss_fn, has_aux=True)(trainable)
            return jax.tree.map(jnp.add, grads_so_far, grads), sums

        def update(state, grads, weight):
            model, optimizer = nnx.merge(graphdef, state)
            grads = jax.tree.map(lambda g: g / jnp.maximum(weight, 1.0), grads)
            info = {"grad_norm": optax.global_norm(grads), "lr": schedule(optimizer.step[...])}
            optimizer.update(model, grads)
            return nnx.state((model, optimizer)), info

        self._logprobs = jax.jit(logprobs)
        self._accumulate = jax.jit(accumulate, donate_argnums=1)
        self._update = jax.jit(update, donate_argnums=0, out_shardings=(shardings, None))

    def model(self):
        return nnx.merge(self.graphdef, self.state)[0]

    def trainable(self) -> nnx.State:
        return nnx.state(self.model(), self.wrt)

    def saved_part(self) -> dict:
        """What a checkpoint holds (as abscot_jax.train.runner's): trainable parameters and optimizer."""
        model, optimizer = nnx.merge(self.graphdef, self.state)
        return {"trainable": nnx.state(model, self.wrt).to_pure_dict(), "optimizer": nnx.state(optimizer).to_pure_dict()}

    def step(self, batches: list[dict], updates: int) -> dict[str, float]:
        """`updates` optimizer steps of the clipped loss + KL on the rollouts in `batches` (numpy
        [rows, seq_len] dicts from rollouts.packed_rollouts). Loss, KL and trace entropy are those of
        the first pass (the policy that sampled), the clip fraction that of the last."""
        with jax.set_mesh(self.mesh):
            batches = [jax.device_put(b, self.batch_sharding) for b in batches]
            for b in batches:  # the reference's and the sampling policy's log-probs, by one program
                b["ref_logp"] = self._logprobs(self.state, self.reference, b)
                b["old_logp"] = self._logprobs(self.state, None, b)
            passes = []
            for update in range(updates):
                grads = jax.tree.map(jnp.zeros_like, self.trainable())
                sums = []
                for b in batches:
                    grads, micro = self._accumulate(self.state, grads, b, update == 0)
                    sums.append(micro)
                total = {k: sum(float(s[k]) for s in sums) for k in sums[0]}
                self.state, info = self._update(self.state, grads, total["weight"])
                passes.append(total)
        first, last, tokens = passes[0], passes[-1], passes[0]["weight"]
        return {
            "loss": first["loss"] / tokens, "kl": first["kl"] / tokens,
            "trace_entropy": first["entropy"] / first["trace_weight"] if first["trace_weight"] else None,
            "clip_fraction": last["clipped"] / tokens, "grad_norm": float(info["grad_norm"]), "lr": float(info["lr"]),
            "tokens": tokens,
        }
