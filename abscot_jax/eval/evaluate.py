"""MATH-500 evaluation: prompts, sampling through any engine, grading, summary, trace diagnostics.

Modes (the prompt is always `render_prompt` with the system line, thinking off, so it ends with
Qwen3's pre-filled empty think block `<think>\\n\\n</think>\\n\\n`):

  abstract  `trace_answer` requests: a constrained trace (m_min..m_max abstract tokens, sampled
            at `trace_temperature`), then the answer decoded greedily.
  verbal    `verbal` requests, greedy: the model writes whatever it writes (a verbal CoT, in
            plain text or, for a model taught the `[x; c y]` format, as a second think block
            `<think>\\n COT \\n</think>\\n\\n` followed by the answer).
  direct    as verbal, but the prompt is followed by an *empty, closed* CoT block, i.e. exactly
            the training layout's `c` with an empty CoT (`COT_OPEN + COT_CLOSE`). A model taught
            `[x; c y]` must then answer at once. This closes the CoT slot only: it cannot stop a
            model (e.g. Qwen3 with thinking off) from reasoning in plain text inside its answer.

Grading: `is_correct(answer_text, gold)`: the last `\\boxed{}` of the text after the trace (in
verbal and direct mode the answer is everything generated, CoT included, so a box in the CoT
counts when no later one follows).

Every sample is one record (one row of results.jsonl); with k samples per problem, scores form a
[problems, k] matrix and uncertainty comes from resampling problems (see stats.py). A sample whose
engine result is an error or malformed counts as wrong and is counted under `errors`; token means
are over the samples without an error.

Trace diagnostics (abstract mode): for each sample, the model's own trace is replaced by (a) a
random trace of the same length (uniform over the 64 abstract tokens) and (b) its own tokens
shuffled, and the answer is decoded greedily after the forced trace: a `verbal` request whose
prompt is `x <beginabstract> z' <endabstract>`, with the budget the own-trace answer had. The own
trace's answer is greedy too, so the main run is its own "forced own trace" variant. Accuracies of
all three are over the same samples (failed runs count as wrong). A trace that carries information
beats a random one by more than the own accuracy's confidence interval.
"""
from __future__ import annotations

import collections
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from abscot_jax.data.sequences import COT_CLOSE, COT_OPEN, EVAL_SYSTEM_PROMPT, example_rng, render_prompt
from abscot_jax.eval.grading import is_correct, last_boxed
from abscot_jax.eval.stats import bootstrap_ci, distinct_count, length_histogram, pass_at_1, token_entropy
from abscot_jax.files import replace_json, replace_jsonl
from abscot_jax.progress import duration, labelled, say
from abscot_jax.sampling.protocol import FINISH_REASONS, SamplingRequest

MODES = ("abstract", "verbal", "direct")
DIRECT_PREFIX = COT_OPEN + COT_CLOSE  # "<think>\n\n</think>\n\n": an empty CoT, closed at once
RESULTS_FILE, SUMMARY_FILE = "results.jsonl", "summary.json"
CONFIDENCE = 0.95
HUB_ID = "HuggingFaceH4/MATH-500"


def dataset_name(source: str) -> str:
    """The name the summary (and the report's table header) shows: MATH-500, or the file's name."""
    return "MATH-500" if source in ("math500", HUB_ID) else Path(source).name


def prompt_ids(tokenizer, problem, mode: str, system: str | None = EVAL_SYSTEM_PROMPT) -> list[int]:
    text = render_prompt(tokenizer, [{"role": "user", "content": problem.problem}], system)
    if mode == "direct":
        text += DIRECT_PREFIX
    return tokenizer.encode(text, add_special_tokens=False)


# ---- engine results ---------------------------------------------------------------------------

def _failed(message: str) -> dict:
    return {"token_ids": [], "text": "", "trace_ids": [], "answer_text": "", "answer_length": 0,
            "finish_reason": "error", "error": message}


def _clean(result) -> dict:
    """The fields used from an engine result. Anything malformed becomes an error; never raises."""
    if result is None:
        return _failed("the engine returned no result for this request")
    try:
        out = {
            "token_ids": [int(t) for t in result.token_ids or []],
            "text": result.text or "",
            "trace_ids": [int(t) for t in result.trace_ids or []],
            "answer_text": result.answer_text or "",
            "answer_length": int(result.answer_length or 0),
            "finish_reason": result.finish_reason,
            "error": result.error,
        }
        if out["finish_reason"] not in FINISH_REASONS:
            raise ValueError(f"finish_reason {out['finish_reason']!r} is not one of {FINISH_REASONS}")
        if not isinstance(out["text"], str) or not isinstance(out["answer_text"], str):
            raise TypeError("text and answer_text must be strings")
    except (AttributeError, TypeError, ValueError) as e:
        return _failed(f"malformed engine result: {type(e).__name__}: {e}")
    if out["finish_reason"] == "error":
        return _failed(str(out["error"] or "the engine reported an error without a message"))
    return out


def run_engine(engine, requests: Sequence[SamplingRequest]) -> list[dict]:
    """One cleaned result per request, matched by id (an engine may reorder or drop results)."""
    by_id = {}
    for result in engine.run_requests(list(requests)) or []:
        rid = getattr(result, "id", None)
        if isinstance(rid, str):
            by_id.setdefault(rid, result)
    return [_clean(by_id.get(r.id)) for r in requests]


# ---- evaluation -------------------------------------------------------------------------------

def evaluate(engine, tokenizer, problems, *, mode: str, samples_per_problem: int = 1, m_min: int = 16,
             m_max: int = 128, trace_temperature: float = 0.7, max_new_tokens: int = 4096, seed: int = 0,
             system: str | None = EVAL_SYSTEM_PROMPT, diagnostics: bool = True, dataset: str = "MATH-500",
             ) -> tuple[list[dict], dict]:
    """Evaluate `problems` (MathProblem-like: problem, answer, level, subject, unique_id) with
    `engine.run_requests`. Returns (records, summary): one record per (problem, sample)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of {list(MODES)}")
    if samples_per_problem < 1:
        raise ValueError(f"samples_per_problem={samples_per_problem}; must be >= 1")
    if not problems:
        raise ValueError("no problems to evaluate")
    ids = [p.unique_id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError("problem unique_ids must be distinct (results are keyed by them)")
    vocab = None
    if mode == "abstract":
        from abscot_jax.vocab import abstract_vocab  # raises VocabError with the fix when missing

        vocab = abstract_vocab(tokenizer)

    k = samples_per_problem
    prompts = [prompt_ids(tokenizer, p, mode, system) for p in problems]
    requests = []
    for i, (problem, ids_) in enumerate(zip(problems, prompts)):
        for j in range(k):
            common = dict(id=f"{problem.unique_id}#{j}", prompt_ids=ids_, max_new_tokens=max_new_tokens,
                          seed=(seed + i * k + j) % 2**32)
            if mode == "abstract":
                requests.append(SamplingRequest(**common, mode="trace_answer", temperature=trace_temperature,
                                                answer_temperature=0.0, m_min=m_min, m_max=m_max))
            else:
                requests.append(SamplingRequest(**common, mode="verbal", temperature=0.0))
    requests[0].check()  # every request shares these settings: a bad one is the caller's error, raise it
    started = time.monotonic()
    with labelled(f"eval {mode}, sampling"):
        results = run_engine(engine, requests)

    records = []
    for n, result in enumerate(results):
        problem = problems[n // k]
        records.append({
            "id": problem.unique_id, "sample": n % k, "level": problem.level, "subject": problem.subject,
            "gold": problem.answer, "response": result["text"], "answer_text": result["answer_text"],
            "boxed": last_boxed(result["answer_text"]),
            "correct": result["finish_reason"] != "error" and is_correct(result["answer_text"], problem.answer),
            "trace_ids": result["trace_ids"], "trace_length": len(result["trace_ids"]),
            "answer_length": result["answer_length"], "generated_tokens": len(result["token_ids"]),
            "finish_reason": result["finish_reason"], "error": result["error"],
        })
    if mode == "abstract" and diagnostics:
        with labelled(f"eval {mode}, random and shuffled traces"):
            _run_trace_variants(engine, requests, records, vocab, max_new_tokens, seed)
    summary = summarize(records, k, abstract_ids=vocab.abstract_ids if vocab else None)
    tokens = summary["mean_generated_tokens"]
    say(f"eval {mode}: done, {len(problems)} problems x {k} in {duration(time.monotonic() - started)}; "
        f"accuracy {summary['accuracy']:.1%}; mean generated tokens {'—' if tokens is None else f'{tokens:.1f}'}"
        + (f"; errors {summary['errors']}" if summary["errors"] else ""))
    summary = {"dataset": dataset, "mode": mode, **summary, "settings": {
        "samples_per_problem": k, "m_min": m_min, "m_max": m_max, "trace_temperature": trace_temperature,
        "max_new_tokens": max_new_tokens, "seed": seed, "system": system, "direct_prefix":
        DIRECT_PREFIX if mode == "direct" else None}}
    return records, summary


def _run_trace_variants(engine, requests, records, vocab, max_new_tokens: int, seed: int) -> None:
    """Adds `random_trace_correct` and `shuffled_trace_correct` to each record (None where the
    sample had no result to vary)."""
    abstract = np.asarray(vocab.abstract_ids)
    variants, owners = [], []
    for request, record in zip(requests, records):
        record["random_trace_correct"] = record["shuffled_trace_correct"] = None
        if record["finish_reason"] == "error":
            continue
        trace = record["trace_ids"]
        # Seeded by (seed, request id): the variants do not depend on the order of the problems.
        forced = {
            "random": [int(t) for t in example_rng(seed, request.id + "/random").choice(abstract, size=len(trace))],
            "shuffled": [int(t) for t in example_rng(seed, request.id + "/shuffled").permutation(trace)],
        }
        for name, z in forced.items():
            variants.append(SamplingRequest(
                id=f"{request.id}/{name}", prompt_ids=[*request.prompt_ids, vocab.begin_id, *z, vocab.end_id],
                mode="verbal", temperature=0.0, max_new_tokens=max(1, max_new_tokens - len(z) - 2)))
            owners.append((record, name))
    for (record, name), result in zip(owners, run_engine(engine, variants) if variants else []):
        ok = result["finish_reason"] != "error" and is_correct(result["answer_text"], record["gold"])
        record[f"{name}_trace_correct"] = ok
        if result["finish_reason"] == "error":
            record[f"{name}_trace_error"] = result["error"]


# ---- summary ----------------------------------------------------------------------------------

def _finite(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def _mean(values):
    return float(np.mean(values)) if len(values) else None


def _ci(scores) -> dict:
    mean, low, high = bootstrap_ci(scores, confidence=CONFIDENCE)
    return {"mean": mean, "ci": [low, high]}


def _by_group(records, k: int, key: str) -> dict:
    """{group: {n_problems, accuracy}} over the problems of each group (groups sorted)."""
    groups = collections.defaultdict(list)
    for r in records:
        value = r[key]
        groups["unknown" if value in (None, "") else str(value)].append(float(r["correct"]))
    return {g: {"n_problems": len(v) // k, "accuracy": float(np.mean(v))} for g, v in sorted(groups.items())}


def summarize(records: list[dict], k: int, abstract_ids: Sequence[int] | None = None) -> dict:
    """The summary of `records` (k consecutive samples per problem); trace diagnostics when the
    records carry the variants' results and `abstract_ids` is given."""
    scores = np.asarray([float(r["correct"]) for r in records]).reshape(-1, k)
    acc = _ci(scores)
    ok = [r for r in records if r["finish_reason"] != "error"]
    errors = collections.Counter(str(r["error"])[:200] for r in records if r["finish_reason"] == "error")
    summary = {
        "n_problems": scores.shape[0], "samples_per_problem": k, "n_samples": len(records),
        "accuracy": acc["mean"], "accuracy_ci": acc["ci"], "confidence": CONFIDENCE,
        "pass_at_1": None,
        "mean_generated_tokens": _mean([r["generated_tokens"] for r in ok]),
        "mean_trace_tokens": _mean([r["trace_length"] for r in ok]),
        "mean_answer_tokens": _mean([r["answer_length"] for r in ok]),
        "by_level": _by_group(records, k, "level"),
        "by_subject": _by_group(records, k, "subject"),
        "finish_reasons": dict(sorted(collections.Counter(r["finish_reason"] for r in records).items())),
        "errors": sum(errors.values()),
        "error_messages": dict(errors.most_common(5)),
        "diagnostics": None,
    }
    if k > 1:
        mean, sd = pass_at_1(scores)
        summary["pass_at_1"] = {"mean": mean, "sd": _finite(sd)}
    if abstract_ids is not None and records and "random_trace_correct" in records[0]:
        summary["diagnostics"] = trace_diagnostics(records, k, abstract_ids, acc)
    return summary


def trace_diagnostics(records: list[dict], k: int, abstract_ids: Sequence[int], own: dict) -> dict:
    index = {int(t): i for i, t in enumerate(abstract_ids)}
    traces = [r["trace_ids"] for r in records if r["finish_reason"] != "error"]
    tokens = [[index[t] for t in z if t in index] for z in traces]
    lengths = [len(z) for z in traces]
    variant = {name: _ci(np.asarray([float(bool(r[f"{name}_trace_correct"])) for r in records]).reshape(-1, k))
               for name in ("random", "shuffled")}
    step = max(1, math.ceil(max(lengths, default=0) / 16))
    edges = list(range(0, max(lengths, default=0) + step + 1, step))
    diag = {
        "n_traces": len(traces),
        "own_accuracy": own["mean"], "own_accuracy_ci": own["ci"],
        "random_accuracy": variant["random"]["mean"], "random_accuracy_ci": variant["random"]["ci"],
        "shuffled_accuracy": variant["shuffled"]["mean"], "shuffled_accuracy_ci": variant["shuffled"]["ci"],
        "variant_errors": sum(f"{n}_trace_error" in r for r in records for n in ("random", "shuffled")),
        "entropy_nats": _finite(token_entropy(tokens, len(abstract_ids))),
        "entropy_max_nats": math.log(len(abstract_ids)),
        "non_abstract_trace_tokens": sum(lengths) - sum(len(t) for t in tokens),
        "distinct_traces": distinct_count(traces),
        "trace_length": {"mean": _mean(lengths), "min": min(lengths, default=None),
                         "max": max(lengths, default=None), "histogram": length_histogram(lengths, edges)},
    }
    diag["verdict"] = verdict(diag)
    return diag


def verdict(diag: dict) -> str:
    """One line that says whether the trace carries information (see the module docstring)."""
    if not diag["n_traces"]:
        return "NO TRACES: every sample failed, nothing to diagnose"
    own, (low, high) = diag["own_accuracy"], diag["own_accuracy_ci"]
    rnd, shuf = diag["random_accuracy"], diag["shuffled_accuracy"]
    own_s = f"{own:.2f} [{low:.2f}, {high:.2f}]"
    if low <= rnd <= high:
        return (f"TRACE CARRIES NO INFORMATION: accuracy with a random trace ({rnd:.2f}) is within the "
                f"{CONFIDENCE:.0%} CI of the own-trace accuracy ({own_s}); shuffled {shuf:.2f}")
    if rnd > high:
        return f"RANDOM TRACES BEAT THE MODEL'S OWN: random {rnd:.2f} vs own {own_s}; shuffled {shuf:.2f}"
    line = f"trace carries information: own {own_s} vs random {rnd:.2f} vs shuffled {shuf:.2f}"
    if low <= shuf <= high:
        line += " (its token order carries none: shuffled is within the CI)"
    return line


# ---- files ------------------------------------------------------------------------------------

def write_results(out_dir: str | Path, records: list[dict], summary: dict) -> tuple[Path, Path]:
    """Write `results.jsonl` (one record a line) and `summary.json` into `out_dir`, atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path, summary_path = out_dir / RESULTS_FILE, out_dir / SUMMARY_FILE
    replace_jsonl(results_path, records)
    replace_json(summary_path, summary)
    return results_path, summary_path


def summary_lines(summary: dict) -> list[str]:
    """A few lines for the terminal."""
    low, high = summary["accuracy_ci"]
    tokens = summary["mean_generated_tokens"]
    lines = [f"{summary['dataset']} {summary['mode']}: accuracy {summary['accuracy']:.3f} "
             f"[{low:.3f}, {high:.3f}] over {summary['n_problems']} problems x {summary['samples_per_problem']}; "
             f"mean generated tokens {'—' if tokens is None else f'{tokens:.1f}'}"]
    if summary["errors"]:
        first = next(iter(summary["error_messages"]), "")
        lines.append(f"errors: {summary['errors']} samples failed (e.g. {first})")
    if summary.get("diagnostics"):
        lines.append(summary["diagnostics"]["verdict"])
    return lines
