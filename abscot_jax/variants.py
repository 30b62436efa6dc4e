"""Trace sources that give the trace a reason to carry information (docs/variants.md); the
trace_sources modules of the same names call them, and abscot_jax/layouts holds the two-pass layout.

    trace_selection: best_of_k    k constrained traces per example; keep the one under which the gold
                                  answer is most likely given [x; z] alone (or all, weighted);
                                  `trace_prior_weight` w adds w * log p(z | x) to that score.
    round1_traces: cot_codes      round-1 traces = k-means codes of the hidden states of the CoT steps.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from abscot_jax.data.dolci import DataError
from abscot_jax.data.pipeline import first_fit_decreasing, pack_row
from abscot_jax.data.roles import Role
from abscot_jax.data.sequences import SequenceExample, make_example
from abscot_jax.files import replace_json, replaced
from abscot_jax.progress import Progress
from abscot_jax.sampling.protocol import MAX_SEED, SamplingRequest
from abscot_jax.train.loss import target_roles

CODEBOOK_SIZE = 64  # one code per abstract token


# ---- shared: packed forwards ------------------------------------------------------------------

def packed_batches(examples: Sequence[SequenceExample], seq_len: int, rows: int,
                   ) -> Iterator[tuple[dict[str, np.ndarray], list[tuple[int, int, int]]]]:
    """Fixed-shape [rows, seq_len] batches of the examples packed first-fit decreasing (the last
    batch padded with empty rows, so one program serves every batch), each with its placements
    (example index, row, start)."""
    bins = first_fit_decreasing([len(e) for e in examples], seq_len)
    for first in range(0, len(bins), rows):
        group = bins[first:first + rows]
        packed = [pack_row([examples[i] for i in b], seq_len) for b in group]
        packed += [pack_row([], seq_len)] * (rows - len(group))
        batch = {key: np.stack([r[key] for r in packed]) for key in packed[0]}
        placements = []
        for row, b in enumerate(group):
            start = 0
            for i in b:
                placements.append((i, row, start))
                start += len(examples[i])
        yield batch, placements


@nnx.jit(static_argnames=("num_layers",))
def _residual_stream(model, batch, num_layers: int):
    """The residual stream after `num_layers` layers (0: the token embeddings)."""
    if num_layers == 0:  # hidden_states cannot stop before the first layer
        return model.embed_tokens(batch["tokens"])
    hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"], batch["roles"],
                                    num_layers=num_layers)
    return hidden


@nnx.jit(static_argnames=("chunk",))
def _answer_and_trace_logprobs(model, batch, chunk: int):
    """log p(target) at the positions whose target is an ANSWER token of the loss mask, and at those
    inside the trace whose target is a trace token or `<endabstract>` (z given x and the forced
    `<beginabstract>`, whatever the loss mask says); 0 elsewhere. Two [B, T] arrays. Logits are
    made `chunk` tokens at a time (never [B, T, vocab] at once)."""
    hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"], batch["roles"])
    b, t, d = hidden.shape
    n = b * t
    chunk = min(chunk, n)
    pad = (-n) % chunk
    h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, chunk, d)
    y = jnp.pad(batch["targets"].reshape(n), (0, pad)).reshape(-1, chunk)

    def one_chunk(xs):
        h, y = xs
        logits = model.logits(h)
        return jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)

    logp = jax.lax.map(one_chunk, (h, y)).reshape(-1)[:n].reshape(b, t)
    roles, targets = batch["roles"], target_roles(batch["roles"])
    answer = (batch["loss_mask"] > 0) & (targets == Role.ANSWER)
    trace = (roles == Role.ABSTRACT) & (targets == Role.ABSTRACT)
    return jnp.where(answer, logp, 0.0), jnp.where(trace, logp, 0.0)


# ---- 2. best-of-k trace selection ---------------------------------------------------------------

def candidate_requests(requests: Sequence[SamplingRequest], k: int) -> list[SamplingRequest]:
    """k copies of each request: copy j of request i (of n) gets seed seed_i + j * n, so with the
    driver's seeds (base + i) every candidate has its own seed and copy 0 is the request itself."""
    n = len(requests)
    return [dataclasses.replace(r, id=f"{r.id}#{j}", seed=(r.seed + j * n) % (MAX_SEED + 1))
            for r in requests for j in range(k)]


def candidate_logliks(model, builder, pairs: Sequence[tuple[object, Sequence[int]]], *, rows: int,
                      chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, dict]:
    """log p(y | x, <beginabstract> z <endabstract>) and log p(z <endabstract> | x, <beginabstract>)
    of each (example, trace), both from one forward of the Phase B sequence, packed, `rows` rows a
    forward; -inf where it does not fit seq_len. Returns the two score arrays and the cost (tokens
    scored, forwards)."""
    seqs = [builder.phase_b(example, trace) for example, trace in pairs]
    fits = [i for i, s in enumerate(seqs) if s is not None]
    answer, trace = np.full(len(pairs), -np.inf), np.full(len(pairs), -np.inf)
    tokens = forwards = 0
    seq_len = builder.config.seq_len
    bar = Progress("scoring candidates", len(fits), unit="candidates")
    for batch, placements in packed_batches([seqs[i] for i in fits], seq_len, rows):
        answer_logp, trace_logp = (np.asarray(a, np.float64) for a in _answer_and_trace_logprobs(model, batch, chunk))
        for j, row, start in placements:
            i = fits[j]
            span = slice(start, start + len(seqs[i]))
            answer[i], trace[i] = answer_logp[row, span].sum(), trace_logp[row, span].sum()
        tokens += int((batch["segment_ids"] != 0).sum())
        forwards += 1
        bar.update(len(placements))
    bar.close(tokens=f"{tokens:,}", forwards=forwards, unscored=len(pairs) - len(fits) or None)
    return answer, trace, {"scoring_tokens": tokens, "scoring_forwards": forwards,
                           "scoring_padded_tokens": forwards * rows * seq_len, "unscored": len(pairs) - len(fits)}


@dataclasses.dataclass
class Selection:
    best: dict[str, list[int]]  # example id -> the chosen trace
    candidates: dict[str, dict]  # example id -> {"traces": [...], "scores": [...]}
    cost: dict
    errors: list[str]  # the engine's error for each sample that failed


def select_traces(engine, load_scorer, builder, examples, requests: Sequence[SamplingRequest], k: int, *,
                  rows: int, chunk: int = 1024, trace_prior_weight: float = 0.0) -> Selection:
    """Best of k: sample k constrained traces per request (one `run_requests` call), score each by
    the gold answer's log-likelihood given [x; z] under the model `load_scorer()` returns (called
    once the samples are in: an out-of-process engine has exited and left the accelerators), plus
    `trace_prior_weight` times the trace's own log-likelihood given x alone (a trace Phase B can
    learn to produce from the prompt, not a lucky key the answer model memorised), keep the best
    (first on ties).
    `requests[i].id` is an example id of `examples`. Failed samples are dropped; an example
    without any good sample is left out (as the plain sampler does)."""
    by_id = {e.id: e for e in examples}
    results = engine.run_requests(candidate_requests(requests, k))
    traces: dict[str, list[list[int]]] = {}
    for index, result in enumerate(results):
        if result.finish_reason == "stop" and result.trace_ids:
            traces.setdefault(requests[index // k].id, []).append(list(result.trace_ids))
    pairs = [(by_id[i], t) for i, ts in traces.items() for t in ts]
    answer, trace, cost = candidate_logliks(load_scorer(), builder, pairs, rows=rows, chunk=chunk)
    # (w = 0 keeps the answer scores as they are: 0 * -inf would turn unscored candidates into nan)
    scores = answer + trace_prior_weight * trace if trace_prior_weight else answer
    candidates, best, start = {}, {}, 0
    for example_id, ts in traces.items():
        part = slice(start, start + len(ts))
        s = scores[part]
        start += len(ts)
        candidates[example_id] = {"traces": ts, "scores": [float(v) for v in s],
                                  "answer_logliks": [float(v) for v in answer[part]],
                                  "trace_logliks": [float(v) for v in trace[part]]}
        if np.isfinite(s).any():
            best[example_id] = ts[int(np.argmax(s))]
    best_scores = [max(c["scores"]) for i, c in candidates.items() if i in best]
    cost = {"samples": len(results), "good_samples": len(pairs),
            "tokens_generated": sum(len(r.token_ids) for r in results), **cost,
            "mean_best_score": float(np.mean(best_scores)) if best_scores else None,
            "mean_candidate_score": float(np.mean(scores[np.isfinite(scores)])) if np.isfinite(scores).any() else None}
    return Selection(best, candidates, cost, [r.error for r in results if r.finish_reason == "error"])


def weighted_candidates(candidates: Mapping[str, dict]) -> dict[str, list[tuple[list[int], float]]]:
    """(trace, weight) per candidate: weights = softmax of the example's scores (they sum to 1)."""
    out = {}
    for example_id, c in candidates.items():
        s = np.asarray(c["scores"], np.float64)
        if not np.isfinite(s).any():
            continue
        w = np.exp(s - s.max())
        w /= w.sum()
        out[example_id] = [(t, float(wi)) for t, wi in zip(c["traces"], w) if wi > 0]
    return out


def scoring_model(engine, model_dir: Path, **load_options):
    """The model that scores candidates: the JAX engine's own (no second copy), else loaded."""
    sampler = getattr(engine, "sampler", None)
    if sampler is not None and hasattr(sampler, "graphdef"):
        return nnx.merge(sampler.graphdef, sampler.params)
    from abscot_jax.checkpoint import load_hf

    return load_hf(model_dir, **load_options)


# ---- 3. round-1 traces from CoT codes -----------------------------------------------------------

def step_spans(builder, example) -> tuple[list[int], list[tuple[int, int]]]:
    """c's token ids and the token span [start, end) of each step within them (the builder's split)."""
    pieces = builder.cot_pieces(example)
    return pieces.open + pieces.cot + pieces.close, pieces.step_spans


def step_vectors(model, builder, examples, *, layer: int, rows: int) -> tuple[list[np.ndarray], int]:
    """Per example, [steps, hidden] float32: each CoT step's mean residual stream at `layer`, from
    one forward of [x; c] (the model sees the CoT as Phase A shows it to the trace). [x; c] longer
    than seq_len is cut at its end and the steps past the cut get no vector; returns their count."""
    seq_len = builder.config.seq_len
    seqs, spans, beyond = [], [], 0
    for example in examples:
        x = builder.prompt_ids(example)[:seq_len]
        c, steps = step_spans(builder, example)
        c = c[:max(0, seq_len - len(x))]
        inside = [(len(x) + a, len(x) + b) for a, b in steps if len(x) + b <= seq_len]
        beyond += len(steps) - len(inside)
        seqs.append(make_example([(x, Role.PROMPT), (c, Role.COT)], example_id=example.id, phase="codes"))
        spans.append(inside)
    vectors: list[np.ndarray | None] = [None] * len(seqs)
    for batch, placements in packed_batches(seqs, seq_len, rows):
        hidden = np.asarray(_residual_stream(model, batch, layer), np.float32)
        for i, row, start in placements:
            vectors[i] = np.stack([hidden[row, start + a:start + b].mean(0) for a, b in spans[i]]) if spans[i] \
                else np.zeros((0, hidden.shape[-1]), np.float32)
    return vectors, beyond


def _sq_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return (x * x).sum(1)[:, None] - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]


def kmeans(x: np.ndarray, k: int = CODEBOOK_SIZE, *, seed: int = 0, iterations: int = 100
           ) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd's k-means with k-means++ seeding, in float64: (centroids [k, D], assignment, inertia).
    With fewer distinct points than k, the spare centroids duplicate points and stay unused
    (ties go to the lowest index); an emptied cluster keeps its centroid."""
    x = np.asarray(x, np.float64)
    rng = np.random.default_rng(seed)
    centroids = np.empty((k, x.shape[1]))
    centroids[0] = x[rng.integers(len(x))]
    d2 = _sq_distances(x, centroids[:1])[:, 0].clip(0)
    for j in range(1, k):
        i = rng.choice(len(x), p=d2 / d2.sum()) if d2.sum() > 0 else rng.integers(len(x))
        centroids[j] = x[i]
        d2 = np.minimum(d2, _sq_distances(x, centroids[j:j + 1])[:, 0].clip(0))
    assign = None
    for _ in range(iterations):
        new = _sq_distances(x, centroids).argmin(1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        for j in np.unique(assign):
            centroids[j] = x[assign == j].mean(0)
    assign = _sq_distances(x, centroids).argmin(1)
    inertia = float(((x - centroids[assign]) ** 2).sum())
    return centroids, assign, inertia


def fit_codebooks(x: np.ndarray, levels: int, *, k: int = CODEBOOK_SIZE, seed: int = 0
                  ) -> tuple[np.ndarray, list[float]]:
    """Residual quantisation: level l's codebook is fitted to what levels < l left unexplained.
    Returns the codebooks [levels, k, D] and each level's inertia (of its residuals)."""
    books, inertias, residual = [], [], np.asarray(x, np.float64)
    for level in range(levels):
        centroids, assign, inertia = kmeans(residual, k, seed=seed + level)
        books.append(centroids)
        inertias.append(inertia)
        residual = residual - centroids[assign]
    return np.stack(books), inertias


def _level_residuals(x: np.ndarray, codebooks: np.ndarray):
    """(residual, level's centroids, assignment) per level, as `encode` walks them."""
    residual = np.asarray(x, np.float64)
    for centroids in codebooks:
        code = _sq_distances(residual, centroids).argmin(1)
        yield residual, centroids, code
        residual = residual - centroids[code]


def encode(x: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """Codes [n, levels]: nearest centroid of each level, on the residual the levels before left."""
    codes = [code for _, _, code in _level_residuals(x, codebooks)]
    return np.stack(codes, axis=1) if codes else np.zeros((len(x), 0), np.int64)


def usage_stats(codes: np.ndarray, k: int = CODEBOOK_SIZE) -> dict:
    """Histogram of code usage, its entropy (nats) and perplexity exp(entropy): how many codes the
    steps effectively use (k at most)."""
    counts = np.bincount(np.asarray(codes, np.int64), minlength=k)
    p = counts[counts > 0] / max(counts.sum(), 1)
    entropy = float(-(p * np.log(p)).sum())
    return {"histogram": counts.tolist(), "entropy": entropy, "perplexity": math.exp(entropy),
            "codes_used": int((counts > 0).sum())}


def mutual_information(a: Sequence, b: Sequence) -> float:
    """Plug-in mutual information (nats) of two paired discrete sequences (biased upward by about
    (|A|-1)(|B|-1) / 2n; compare against a shuffled or random baseline)."""
    _, ia = np.unique(np.asarray(a), return_inverse=True)
    _, ib = np.unique(np.asarray(b), return_inverse=True)
    joint = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(joint, (ia, ib), 1)
    joint /= joint.sum()
    outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / outer[nz])).sum())


def resolve_layer(model, code_layer: int) -> int:
    """-1: the middle layer; else 0 (embeddings) .. num_hidden_layers."""
    n = model.config.num_hidden_layers
    layer = n // 2 if code_layer == -1 else code_layer
    if not 0 <= layer <= n:
        raise ValueError(f"variants.code_layer={code_layer}: the model has {n} layers; use -1 (middle) or 0..{n}")
    return layer


def cot_code_traces(model, builder, examples, *, code_layer: int = -1, codes_per_step: int = 1, rows: int = 4,
                    seed: int = 0, fit_steps: int = 20_000, out_dir: Path | None = None,
                    codebooks: np.ndarray | None = None, separator: bool = False
                    ) -> tuple[dict[str, list[int]], dict]:
    """Traces that carry the CoT's content: each step's hidden-state vector (`step_vectors`)
    quantised by `codes_per_step` residual levels of a 64-entry codebook, given or fitted by k-means
    on a seeded sample of at most `fit_steps` steps; code i is `abstract_ids[i]`; a trace is its
    steps' codes in order, each step's followed by the last abstract token when `separator` (the
    codebook then has 63 entries), capped at m_max. A fitted codebook and its statistics are saved
    as `codebook.npz` and `codebook_stats.json` in `out_dir`. Returns (traces by example id, statistics)."""
    layer = resolve_layer(model, code_layer)
    vectors, beyond = step_vectors(model, builder, examples, layer=layer, rows=rows)
    if not any(len(v) for v in vectors):
        raise DataError("cot_codes: no CoT steps to encode (no examples, or their CoTs are empty)")
    all_steps = np.concatenate(vectors)
    rng = np.random.default_rng(seed)
    if len(all_steps) > fit_steps:
        sample = all_steps[rng.choice(len(all_steps), fit_steps, replace=False)]
    else:
        sample = all_steps
    fitted = codebooks is None
    if fitted:
        codebooks, inertias = fit_codebooks(sample, codes_per_step, k=CODEBOOK_SIZE - separator, seed=seed)
    else:
        if len(codebooks) != codes_per_step or codebooks.shape[1] > CODEBOOK_SIZE - separator:
            raise DataError(f"cot_codes: the codebook has {len(codebooks)} levels of {codebooks.shape[1]} codes; "
                            f"variants.codes_per_step={codes_per_step} and step_separator={separator} need "
                            f"{codes_per_step} levels of at most {CODEBOOK_SIZE - separator}")
        inertias = [float(((r - c[a]) ** 2).sum()) for r, c, a in _level_residuals(sample, codebooks)]
    abstract = np.asarray(builder.vocab.abstract_ids)
    m_max = builder.config.m_max
    traces, codes_all, capped = {}, [], 0
    for example, v in zip(examples, vectors):
        codes = encode(v, codebooks)  # [steps, levels]
        codes_all.append(codes)
        if separator:
            codes = np.concatenate([codes, np.full((len(codes), 1), CODEBOOK_SIZE - 1)], axis=1)
        capped += int(codes.size > m_max)
        traces[example.id] = [int(t) for t in abstract[codes.reshape(-1)][:m_max]]
    codes_all = np.concatenate(codes_all)
    total_ss = float(((sample - sample.mean(0)) ** 2).sum())
    stats = {
        "layer": layer, "codes_per_step": codes_per_step, "separator": separator, "examples": len(examples),
        "steps": len(all_steps),
        "steps_fitted": len(sample), "steps_beyond_seq_len": beyond,
        "traces_capped_at_m_max": capped,
        "mean_trace_length": float(np.mean([len(t) for t in traces.values()])),
        "levels": [{"inertia": inertia, "inertia_fraction": inertia / total_ss if total_ss else 0.0,
                    **usage_stats(codes_all[:, level])} for level, inertia in enumerate(inertias)],
    }
    stats["codebook"] = "fitted" if fitted else "given"
    if fitted and out_dir is not None and jax.process_index() == 0:  # every process fits the same codebook; one writes
        save_codebook(Path(out_dir), codebooks, layer, stats)
    return traces, stats


def load_codebook(out_dir: Path) -> tuple[np.ndarray, int] | None:
    """(codebooks, layer) saved by `save_codebook` in `out_dir`, or None when there is none."""
    path = Path(out_dir) / "codebook.npz"
    if not path.exists():
        return None
    with np.load(path) as f:
        return f["codebooks"].astype(np.float64), int(f["layer"])


def save_codebook(out_dir: Path, codebooks: np.ndarray, layer: int, stats: dict) -> None:
    """`codebook.npz` (codebooks [levels, 64, hidden], layer) and `codebook_stats.json`, each
    written under a temporary name and renamed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with replaced(out_dir / "codebook.npz", "wb") as f:
        np.savez(f, codebooks=codebooks.astype(np.float32), layer=np.int64(layer))
    replace_json(out_dir / "codebook_stats.json", stats)
