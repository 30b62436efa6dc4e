"""Batched generation for the Qwen3 NNX model: one jitted call prefills a left-padded batch into a
KV cache and decodes under `jax.lax.while_loop` until every row is done.

Shapes are static and bucketed (batch, prompt length and new-token budget rounded up to powers of
two), so a run compiles a handful of programs, not one per prompt length. Everything that varies
per request (temperatures, top-k/top-p, seed, trace bounds, stop tokens, budget) lives in arrays,
so any mix of requests shares one program. Each row draws its randomness from its own seed folded
with the token index: a request samples the same tokens whatever batch it lands in.

Layer weights: split once per layer before the loop (`Qwen3.layer_params_list`: no slice copies
per step, at the cost of a second copy of the layer weights), except when computing in 16 bits on
CPU. There XLA computes each dot in fp32, converting the weight at every use; the layer is indexed in
the stacked weights inside the loop, where the slice fuses into that conversion (no copy at all),
and two compiler options (STREAM_OPTIONS) keep XLA converting one layer at a time. Qwen3-4B in bf16
(8 GB of weights), 2 rows: split, the program needs 26.9 GB of temporaries; indexed, 1.6 GB.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from abscot_jax.model.qwen3 import KVCache, Qwen3
from abscot_jax.sampling import constraints as C
from abscot_jax.sampling.protocol import SamplingRequest, in_length_batches, stop_ids


@dataclasses.dataclass(frozen=True)
class TraceTokens:
    """The ids the constraint needs (static under jit). Without abstract tokens: no trace modes."""

    abstract_ids: tuple[int, ...] = ()
    begin_id: int = -1
    end_id: int = -1

    @classmethod
    def of(cls, vocab) -> "TraceTokens":
        """From an `abscot_jax.vocab.AbstractVocab` (or None)."""
        return cls() if vocab is None else cls(tuple(vocab.abstract_ids), vocab.begin_id, vocab.end_id)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rows:
    """Per-row settings as arrays [B] (stop_ids [B, K], padded with -1)."""

    temperature: jax.Array  # before and inside the trace
    answer_temperature: jax.Array
    top_k: jax.Array  # 0 = off
    top_p: jax.Array  # 1 = off
    seed: jax.Array  # uint32
    m_min: jax.Array
    m_max: jax.Array
    has_trace: jax.Array  # bool
    trace_only: jax.Array  # bool: stop right after `<endabstract>`
    max_new: jax.Array  # 0 marks a padding row
    stop_ids: jax.Array

    @classmethod
    def build(cls, requests: Sequence[SamplingRequest | None], max_new: Sequence[int], eos_id: int | None) -> "Rows":
        """Numpy arrays for a batch; None entries are padding rows (done from the start)."""
        filler = SamplingRequest(id="", prompt_ids=[0])
        reqs = [r or filler for r in requests]
        stops = [stop_ids(r, eos_id) for r in reqs]
        width = max(1, max(len(s) for s in stops))
        return cls(
            temperature=np.array([r.temperature for r in reqs], np.float32),
            answer_temperature=np.array([r.answer_temp for r in reqs], np.float32),
            top_k=np.array([r.top_k for r in reqs], np.int32),
            top_p=np.array([r.top_p for r in reqs], np.float32),
            seed=np.array([r.seed for r in reqs], np.uint32),
            m_min=np.array([r.m_min for r in reqs], np.int32),
            m_max=np.array([r.m_max for r in reqs], np.int32),
            has_trace=np.array([r.has_trace for r in reqs], bool),
            trace_only=np.array([r.mode == "trace" for r in reqs], bool),
            max_new=np.array([n if r is not None else 0 for r, n in zip(requests, max_new)], np.int32),
            stop_ids=np.array([s + [-1] * (width - len(s)) for s in stops], np.int32),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    step: jax.Array  # int32[]: tokens generated so far
    phase: jax.Array  # int32[B], see constraints
    trace_len: jax.Array  # int32[B]
    done: jax.Array  # bool[B]
    stopped: jax.Array  # bool[B]: finished on a stop token / the end of a trace (else: length)
    tokens: jax.Array  # int32[B, N]: generated ids, -1 after a row is done

    @classmethod
    def init(cls, rows: Rows, max_new: int) -> "DecodeState":
        b = rows.max_new.shape[0]
        return cls(jnp.zeros((), jnp.int32), C.initial_phase(rows.has_trace), jnp.zeros(b, jnp.int32),
                   rows.max_new <= 0, jnp.zeros(b, bool), jnp.full((b, max_new), -1, jnp.int32))


# ---- choosing tokens --------------------------------------------------------------------------

def filter_top_k_top_p(logits, top_k, top_p):
    """-inf outside each row's top-k, then outside its top-p nucleus of what is left (as HF and vLLM)."""
    v = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    desc = jnp.where(jnp.arange(v) < k[:, None], desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.sum(mass_before < top_p[:, None], axis=-1)  # >= 1: the first token has 0 mass before it
    threshold = jnp.take_along_axis(desc, (jnp.minimum(keep, k) - 1)[:, None], axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def choose_tokens(logits, temperature, top_k, top_p, seed, step):
    """Greedy where temperature is 0, else a sample (temperature, top-k, top-p) keyed by (seed, step)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample():
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        needs_filter = jnp.any((top_k > 0) | (top_p < 1))
        scaled = jax.lax.cond(needs_filter, filter_top_k_top_p, lambda x, *_: x, scaled, top_k, top_p)
        keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(seed)
        return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)

    sampled = jax.lax.cond(jnp.any(temperature > 0), sample, lambda: greedy)
    return jnp.where(temperature > 0, sampled, greedy)


def decode_step(state: DecodeState, logits, rows: Rows, trace: TraceTokens) -> DecodeState:
    """Pick token number `state.step` of every row from its logits [B, V] and advance the row.

    The one place that turns logits into tokens: the jitted loop below and the HF engine's
    logits processor both call it."""
    abstract_ids = jnp.asarray(trace.abstract_ids, jnp.int32)
    logits = C.constrain_logits(logits, state.phase, state.trace_len, rows.m_min, rows.m_max,
                                abstract_ids, trace.begin_id, trace.end_id)
    in_answer = state.phase == C.ANSWER
    temperature = jnp.where(in_answer, rows.answer_temperature, rows.temperature)
    token = choose_tokens(logits, temperature, rows.top_k, rows.top_p, rows.seed, state.step)

    phase, trace_len, closed = C.advance(state.phase, state.trace_len, token, trace.begin_id, trace.end_id)
    hit_stop = in_answer & jnp.any(token[:, None] == rows.stop_ids, axis=-1)
    stop = hit_stop | (closed & rows.trace_only)
    live = ~state.done
    tokens = state.tokens.at[:, state.step].set(jnp.where(live, token, -1))
    return DecodeState(
        step=state.step + 1,
        phase=jnp.where(live, phase, state.phase),
        trace_len=jnp.where(live, trace_len, state.trace_len),
        done=state.done | stop | (state.step + 1 >= rows.max_new),
        stopped=state.stopped | (live & stop),
        tokens=tokens,
    )


# ---- the compiled generation ------------------------------------------------------------------

# For the program that indexes layers inside the loop (see the module docstring). Without the first,
# XLA hoists the loop-invariant fp32 conversions of every weight out of the decode loop (an fp32
# copy of the model: 14.5 GB at Qwen3-4B); without the second, XLA:CPU's default scheduler, tuned
# for concurrency, converts every layer's weights at the start of each forward (the same 14.5 GB).
STREAM_OPTIONS = {
    "xla_disable_hlo_passes": "while-loop-invariant-code-motion",
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
}


def _generate(graphdef, params, tokens, positions, segments, rows: Rows, *, max_new: int, trace: TraceTokens,
              split_layers: bool):
    """tokens/positions/segments [B, P] left-padded (pads: segment 0). Returns (tokens [B, N], stopped [B])."""
    model = nnx.merge(graphdef, params)
    b, p = tokens.shape
    cache = KVCache.zeros(model.config, b, p + max_new)
    split = model.layer_params_list() if split_layers else None  # once, here, outside the decode loop

    def layer_weights():
        """Each layer's weights: split above, or sliced from the stacked weights where they are used."""
        if split is not None:
            return split
        stacked = model.layer_params()
        return [jax.tree.map(lambda w, i=i: w[i], stacked) for i in range(model.config.num_hidden_layers)]

    hidden, cache = model.decode(tokens, positions, segments, cache, layers=layer_weights())
    # Left padding puts every row's last prompt token in the last slot.
    state = decode_step(DecodeState.init(rows, max_new), model.logits(hidden[:, -1]), rows, trace)
    next_position = positions[:, -1] + 1
    ones = jnp.ones((b, 1), jnp.int32)

    def running(carry):
        state, _ = carry
        return (state.step < max_new) & ~jnp.all(state.done)

    def one_token(carry):
        state, cache = carry
        last = jax.lax.dynamic_index_in_dim(state.tokens, state.step - 1, axis=1, keepdims=True)
        # A done row keeps computing (static shapes); feed it a valid id, its output is ignored.
        position = (next_position + state.step - 1)[:, None]
        hidden, cache = model.decode(jnp.maximum(last, 0), position, ones, cache, layers=layer_weights())
        return decode_step(state, model.logits(hidden[:, 0]), rows, trace), cache

    state, _ = jax.lax.while_loop(running, one_token, (state, cache))
    return state.tokens, state.stopped


def bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= max(n, minimum): bounds how many programs get compiled."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def batch_rows(n: int, min_batch: int, max_batch: int, multiple: int) -> int:
    """Rows of the program that generates n <= max_batch prompts: n bucketed within max_batch, then
    rounded up to a multiple of the mesh's batch shards."""
    b = max(n, min(bucket(n, min_batch), max_batch))
    return -(-b // multiple) * multiple


class Sampler:
    """Generates for lists of (prompt ids, request) with the constrained-trace logic.

    model: a Qwen3 (any dtype, LoRA included). trace: the abstract ids (`TraceTokens.of(vocab)`).
    eos_id: the default stop token (end of turn). mesh: optional; the batch is split over its
    `data`/`fsdp` axes and the parameters placed with the training partition rules.
    split_layers: split the layer weights before the decode loop; default: unless computing in 16
    bits on CPU (see the module docstring).
    """

    def __init__(self, model: Qwen3, *, trace: TraceTokens = TraceTokens(), eos_id: int | None = None,
                 mesh=None, max_batch: int = 32, min_batch: int = 1, min_prompt_bucket: int = 16,
                 min_new_bucket: int = 16, split_layers: bool | None = None):
        self.config = model.config
        self.trace, self.eos_id, self.mesh = trace, eos_id, mesh
        self.max_batch, self.min_batch = max_batch, min_batch
        self.min_prompt_bucket, self.min_new_bucket = min_prompt_bucket, min_new_bucket
        self.graphdef, params = nnx.split(model)
        self.batch_multiple = 1
        if mesh is not None:
            from abscot_jax.sharding import BATCH_AXES, batch_sharding, state_shardings

            params = jax.device_put(params, state_shardings(params, mesh))
            self.batch_sharding = batch_sharding(mesh)
            self.batch_multiple = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))
        self.params = params
        if split_layers is None:
            platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
            split_layers = not (platform == "cpu" and jnp.dtype(self.config.jnp_compute_dtype).itemsize == 2)
        self._compiled = jax.jit(
            functools.partial(_generate, self.graphdef, split_layers=split_layers),
            static_argnames=("max_new", "trace"), compiler_options=None if split_layers else STREAM_OPTIONS)

    def with_model(self, model: Qwen3) -> "Sampler":
        """This sampler running `model` (same architecture, new weights: e.g. after a training
        phase), sharing the compiled programs."""
        graphdef, params = nnx.split(model)
        if graphdef != self.graphdef:
            raise ValueError("with_model needs a model of the same architecture (and LoRA layout)")
        if self.mesh is not None:
            from abscot_jax.sharding import state_shardings

            params = jax.device_put(params, state_shardings(params, self.mesh))
        new = copy.copy(self)
        new.params = params
        return new

    def _place(self, tree):
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        return jax.device_put(tree, self.batch_sharding)

    def generate(self, prompts: Sequence[Sequence[int]], requests: Sequence[SamplingRequest],
                 max_new: Sequence[int]) -> list[tuple[list[int], bool]]:
        """(generated ids, finished on a stop) per prompt; `max_new[i]` caps row i. Inputs must be
        valid (see protocol.prompt_token_ids): this level does no checking."""
        return in_length_batches(prompts, requests, max_new, self.max_batch, self._generate_batch)

    def _generate_batch(self, prompts, requests, max_new):
        n = len(prompts)
        b = batch_rows(n, self.min_batch, self.max_batch, self.batch_multiple)
        p = bucket(max(len(x) for x in prompts), self.min_prompt_bucket)
        budget = bucket(max(max_new), self.min_new_bucket)
        tokens = np.zeros((b, p), np.int32)
        positions = np.zeros((b, p), np.int32)
        segments = np.zeros((b, p), np.int32)
        for i, prompt in enumerate([*prompts, *[[0]] * (b - n)]):  # padding rows: one dummy token
            tokens[i, p - len(prompt):] = prompt
            positions[i, p - len(prompt):] = np.arange(len(prompt))
            segments[i, p - len(prompt):] = 1
        rows = Rows.build([*requests, *[None] * (b - n)], [*max_new, *[0] * (b - n)], self.eos_id)
        inputs = self._place((tokens, positions, segments, rows))
        if self.mesh is not None:
            with jax.set_mesh(self.mesh):
                generated, stopped = self._compiled(self.params, *inputs, max_new=budget, trace=self.trace)
        else:
            generated, stopped = self._compiled(self.params, *inputs, max_new=budget, trace=self.trace)
        generated, stopped = np.asarray(generated), np.asarray(stopped)
        return [([int(t) for t in generated[i] if t >= 0], bool(stopped[i])) for i in range(n)]
