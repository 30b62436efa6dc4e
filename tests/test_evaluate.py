"""Evaluation: requests, grading, summary and trace diagnostics. A fake engine returns crafted
results, so every summary number is recomputed here from results.jsonl; one end-to-end CLI run per
mode on the tiny random model proves the plumbing (a random model never boxes an answer)."""
from __future__ import annotations

import collections
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from transformers import AutoTokenizer

from abscot_jax.data.math500 import load_math500
from abscot_jax.eval import evaluate as E
from abscot_jax.eval.__main__ import main
from abscot_jax.eval.grading import is_correct
from abscot_jax.sampling.protocol import RequestError, SamplingResult
from abscot_jax.vocab import VocabError, abstract_vocab
from conftest import DATA_DIR

FIXTURE = DATA_DIR / "math500_fixture.jsonl"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def problems():
    problems, _ = load_math500(str(FIXTURE), limit=6)
    assert len(problems) == 6 and len({p.level for p in problems}) >= 1
    return problems


class FakeEngine:
    """`run_requests` through a script: request -> SamplingResult, None (dropped) or anything else.
    Returns the results reversed, so evaluation must match them by id."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def run_requests(self, requests):
        self.calls.append(list(requests))
        return [out for out in (self.script(r) for r in reversed(requests)) if out is not None]


def ok_result(request_id, answer_text, trace=(), finish="stop"):
    trace, answer = list(trace), [7] * (3 + len(answer_text) % 5)  # answer ids: only their count matters
    tokens = ([900, *trace, 901] if trace else []) + answer + ([2] if finish == "stop" else [])
    return SamplingResult(id=request_id, token_ids=tokens, text="TEXT " + answer_text, trace_ids=trace,
                          trace_length=len(trace), answer_ids=answer, answer_text=answer_text,
                          answer_length=len(answer), finish_reason=finish)


# ---- the scripted abstract run: (problem i, sample j) -> outcome --------------------------------
K = 2


def scripted_trace(abstract_ids, i, j):
    if i == 0:  # both samples of problem 0 share one trace: distinct traces < samples
        j = 0
    length = 3 + (2 * i + j) % 5
    return [abstract_ids[(7 * i + 3 * j + n * n) % 16] for n in range(length)]


def main_outcome(i, j):
    """'right', 'wrong', 'nobox', 'error', 'malformed' or 'missing'."""
    special = {(3, 0): "nobox", (4, 1): "error", (5, 0): "malformed", (5, 1): "missing"}
    return special.get((i, j), "right" if (i + j) % 3 else "wrong")


def variant_outcome(i, j, name):
    if (i, j, name) == (2, 1, "random"):
        return "error"
    return "right" if (name == "random" and i == 1) or (name == "shuffled" and i in (1, 2)) else "wrong"


def make_script(problems, abstract_ids):
    index = {p.unique_id: i for i, p in enumerate(problems)}

    def answer(outcome, gold):
        return {"right": f"so the answer is \\boxed{{{gold}}}.", "wrong": "\\boxed{-12345}", "nobox": "42"}[outcome]

    def script(request):
        uid, _, rest = request.id.rpartition("#")  # ids: UNIQUE_ID#SAMPLE[/VARIANT]
        j, _, variant = rest.partition("/")
        i, j = index[uid], int(j)
        gold = problems[i].answer
        if variant:
            outcome = variant_outcome(i, j, variant)
            if outcome == "error":
                return SamplingResult.failure(request.id, "variant exploded")
            return ok_result(request.id, answer(outcome, gold))
        outcome = main_outcome(i, j)
        if outcome == "missing":
            return None
        if outcome == "error":
            return SamplingResult.failure(request.id, "CUDA out of memory")
        if outcome == "malformed":
            return SamplingResult(id=request.id, token_ids=["x"], finish_reason="stop")
        return ok_result(request.id, answer(outcome, gold), scripted_trace(abstract_ids, i, j),
                         finish="length" if outcome == "nobox" else "stop")

    return script


@pytest.fixture(scope="module")
def abstract_run(problems, tokenizer, tmp_path_factory):
    vocab = abstract_vocab(tokenizer)
    engine = FakeEngine(make_script(problems, vocab.abstract_ids))
    records, summary = E.evaluate(engine, tokenizer, problems, mode="abstract", samples_per_problem=K, m_min=3,
                                  m_max=10, max_new_tokens=64, seed=5, dataset="fixture.jsonl")
    out = tmp_path_factory.mktemp("abstract_eval")
    E.write_results(out, records, summary)
    return engine, out, vocab


def read_outputs(out_dir):
    results = [json.loads(line) for line in (Path(out_dir) / "results.jsonl").read_text().splitlines()]
    summary = json.loads((Path(out_dir) / "summary.json").read_text())
    return results, summary


def independent_bootstrap(matrix, n=2000, seed=0, confidence=0.95):
    row_means = np.asarray(matrix, float).mean(axis=1)
    idx = np.random.default_rng(seed).integers(0, len(row_means), size=(n, len(row_means)))
    means = row_means[idx].mean(axis=1)
    return np.percentile(means, [50 * (1 - confidence), 100 - 50 * (1 - confidence)])


def check_summary(results, summary, k, abstract_ids=None):
    """Recompute every summary number from the per-sample results and compare."""
    by_problem = collections.OrderedDict()
    for r in results:
        by_problem.setdefault(r["id"], []).append(r)
    assert all([r["sample"] for r in rows] == list(range(k)) for rows in by_problem.values())
    matrix = [[float(r["correct"]) for r in rows] for rows in by_problem.values()]
    assert summary["n_problems"] == len(by_problem) and summary["n_samples"] == len(results)
    assert summary["accuracy"] == pytest.approx(np.mean(matrix))
    assert summary["accuracy_ci"] == pytest.approx(list(independent_bootstrap(matrix)))
    fine = [r for r in results if r["finish_reason"] != "error"]
    for key, field in [("mean_generated_tokens", "generated_tokens"), ("mean_trace_tokens", "trace_length"),
                       ("mean_answer_tokens", "answer_length")]:
        assert summary[key] == pytest.approx(np.mean([r[field] for r in fine]))
    assert summary["finish_reasons"] == dict(collections.Counter(r["finish_reason"] for r in results))
    assert summary["errors"] == sum(r["finish_reason"] == "error" for r in results)
    for key, group in [("level", "by_level"), ("subject", "by_subject")]:
        values = {str(r[key]) for r in results}
        assert set(summary[group]) == values
        for value in values:
            rows = [r for r in results if str(r[key]) == value]
            assert summary[group][value] == {"n_problems": len(rows) // k,
                                             "accuracy": pytest.approx(np.mean([r["correct"] for r in rows]))}
    if k > 1:
        columns = np.mean(matrix, axis=0)
        assert summary["pass_at_1"] == {"mean": pytest.approx(columns.mean()), "sd": pytest.approx(columns.std(ddof=1))}
    else:
        assert summary["pass_at_1"] is None
    for r in results:  # grading: the answer part, never the trace
        assert r["correct"] == (r["finish_reason"] != "error" and is_correct(r["answer_text"], r["gold"]))
        assert r["trace_length"] == len(r["trace_ids"])
    if abstract_ids is None:
        assert summary["diagnostics"] is None
        return
    d = summary["diagnostics"]
    for name in ("random", "shuffled"):
        variant = [[float(bool(r[f"{name}_trace_correct"])) for r in rows] for rows in by_problem.values()]
        assert d[f"{name}_accuracy"] == pytest.approx(np.mean(variant))
        assert d[f"{name}_accuracy_ci"] == pytest.approx(list(independent_bootstrap(variant)))
    assert (d["own_accuracy"], d["own_accuracy_ci"]) == (summary["accuracy"], summary["accuracy_ci"])
    traces = [r["trace_ids"] for r in fine]
    counts = collections.Counter(t for z in traces for t in z)
    p = np.asarray(list(counts.values()), float) / sum(counts.values())
    assert d["entropy_nats"] == pytest.approx(float(-(p * np.log(p)).sum()))
    assert d["entropy_max_nats"] == pytest.approx(math.log(64))
    assert d["distinct_traces"] == len({tuple(z) for z in traces}) and d["n_traces"] == len(traces)
    lengths = [len(z) for z in traces]
    assert d["trace_length"]["mean"] == pytest.approx(np.mean(lengths))
    assert (d["trace_length"]["min"], d["trace_length"]["max"]) == (min(lengths), max(lengths))
    hist = d["trace_length"]["histogram"]
    assert hist["n"] == len(lengths) == sum(hist["counts"])
    for lo, hi, c in zip(hist["edges"], hist["edges"][1:], hist["counts"]):
        assert c == sum(lo <= x < hi for x in lengths)  # the last edge lies above every length
    assert d["verdict"] == E.verdict(d)


def test_abstract_summary_is_recomputed_from_results(abstract_run, problems):
    _, out, vocab = abstract_run
    results, summary = read_outputs(out)
    check_summary(results, summary, K, vocab.abstract_ids)
    assert summary["dataset"] == "fixture.jsonl" and summary["mode"] == "abstract"
    assert [r["id"] for r in results] == [p.unique_id for p in problems for _ in range(K)]
    # Hand values from the script: 12 samples; errors: (4,1) error, (5,0) malformed, (5,1) missing.
    expected = [main_outcome(i, j) == "right" for i in range(6) for j in range(K)]
    assert [r["correct"] for r in results] == expected
    assert summary["accuracy"] == pytest.approx(sum(expected) / 12) == pytest.approx(6 / 12)
    assert summary["errors"] == 3 and summary["finish_reasons"] == {"error": 3, "length": 1, "stop": 8}
    assert set(summary["error_messages"]) == {
        "CUDA out of memory", "the engine returned no result for this request",
        "malformed engine result: ValueError: invalid literal for int() with base 10: 'x'"}
    d = summary["diagnostics"]
    assert d["random_accuracy"] == pytest.approx(2 / 12)  # problem 1, both samples
    assert d["shuffled_accuracy"] == pytest.approx(4 / 12)  # problems 1 and 2
    assert d["variant_errors"] == 1 and d["n_traces"] == 9 and d["distinct_traces"] == 8
    by_key = {(r["id"], r["sample"]): r for r in results}
    assert by_key[(problems[2].unique_id, 1)]["random_trace_error"] == "variant exploded"
    assert by_key[(problems[5].unique_id, 0)]["random_trace_correct"] is None  # no trace to vary


def test_abstract_requests(abstract_run, problems, tokenizer):
    engine, out, vocab = abstract_run
    main_calls, variant_calls = engine.calls
    assert len(main_calls) == 12 and len({r.seed for r in main_calls}) == 12
    for r in main_calls:
        assert (r.mode, r.temperature, r.answer_temperature, r.m_min, r.m_max, r.max_new_tokens) == (
            "trace_answer", 0.7, 0.0, 3, 10, 64)
        text = tokenizer.decode(r.prompt_ids)
        assert E.EVAL_SYSTEM_PROMPT in text and text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # Variants only for the 9 samples with a result, two each: greedy verbal answers after a forced trace.
    results, _ = read_outputs(out)
    own = {f"{r['id']}#{r['sample']}": r["trace_ids"] for r in results}
    prompts = {r.id: r.prompt_ids for r in main_calls}
    assert len(variant_calls) == 18
    for r in variant_calls:
        base, name = r.id.rsplit("/", 1)
        n = len(prompts[base])
        assert r.mode == "verbal" and r.temperature == 0.0
        assert r.prompt_ids[:n] == prompts[base]
        assert r.prompt_ids[n] == vocab.begin_id and r.prompt_ids[-1] == vocab.end_id
        z = r.prompt_ids[n + 1:-1]
        assert len(z) == len(own[base]) and r.max_new_tokens == 64 - len(z) - 2
        if name == "shuffled":
            assert sorted(z) == sorted(own[base])
        else:
            assert set(z) <= set(vocab.abstract_ids)
    randoms = [r.prompt_ids for r in variant_calls if r.id.endswith("/random")]
    assert len({tuple(p) for p in randoms}) == len(randoms)  # fresh random traces, not copies


def test_verbal_and_direct_prompts_and_grading(problems, tokenizer, tmp_path):
    gold = [p.answer for p in problems[:3]]
    texts = [  # verbal: the whole text is graded, the last box counts
        f"<think>\nstep \\boxed{{{gold[0]}}}\n</think>\n\nso it is",  # a box in the CoT only: counts
        f"<think>\nstep \\boxed{{{gold[1]}}}\n</think>\n\n\\boxed{{999}}",  # a later wrong box wins
        "no box at all",
    ]
    by_uid = {p.unique_id: t for p, t in zip(problems, texts)}
    engine = FakeEngine(lambda r: ok_result(r.id, by_uid[r.id.split("#")[0]]))
    seen = {}
    for mode in ("verbal", "direct"):
        records, summary = E.evaluate(engine, tokenizer, problems[:3], mode=mode, max_new_tokens=32)
        seen[mode] = engine.calls[-1]
        assert [r["correct"] for r in records] == [True, False, False]
        assert all(r.mode == "verbal" and r.temperature == 0.0 and r.max_new_tokens == 32 for r in seen[mode])
        E.write_results(tmp_path / mode, records, summary)
        check_summary(*read_outputs(tmp_path / mode), k=1)
        assert summary["settings"]["direct_prefix"] == (E.DIRECT_PREFIX if mode == "direct" else None)
    assert len(engine.calls) == 2  # no diagnostics outside abstract mode
    for verbal, direct in zip(seen["verbal"], seen["direct"]):
        # direct = the same prompt followed by an empty, closed CoT block
        assert tokenizer.decode(direct.prompt_ids) == tokenizer.decode(verbal.prompt_ids) + "<think>\n\n</think>\n\n"


def test_samples_of_one_problem_and_no_diagnostics(problems, tokenizer):
    vocab = abstract_vocab(tokenizer)
    engine = FakeEngine(make_script(problems, vocab.abstract_ids))
    records, summary = E.evaluate(engine, tokenizer, problems[:2], mode="abstract", m_min=3, m_max=10,
                                  diagnostics=False)
    assert len(engine.calls) == 1 and summary["diagnostics"] is None and summary["pass_at_1"] is None
    assert len(records) == 2 and "random_trace_correct" not in records[0]


def test_verdicts():
    base = {"n_traces": 100, "own_accuracy": 0.62, "own_accuracy_ci": [0.52, 0.71], "shuffled_accuracy": 0.2}
    assert E.verdict({**base, "random_accuracy": 0.11}).startswith(
        "trace carries information: own 0.62 [0.52, 0.71] vs random 0.11 vs shuffled 0.20")
    assert "order carries none" in E.verdict({**base, "random_accuracy": 0.11, "shuffled_accuracy": 0.6})
    assert E.verdict({**base, "random_accuracy": 0.6}).startswith(
        "TRACE CARRIES NO INFORMATION: accuracy with a random trace (0.60) is within the 95% CI")
    assert E.verdict({**base, "random_accuracy": 0.8}).startswith("RANDOM TRACES BEAT THE MODEL'S OWN")
    assert E.verdict({**base, "n_traces": 0, "random_accuracy": 0.0}).startswith("NO TRACES")


def test_bad_arguments(problems, tokenizer, tiny_tokenizer):
    engine = FakeEngine(lambda r: None)
    with pytest.raises(ValueError, match="mode"):
        E.evaluate(engine, tokenizer, problems, mode="cot")
    with pytest.raises(ValueError, match="no problems"):
        E.evaluate(engine, tokenizer, [], mode="verbal")
    with pytest.raises(VocabError):  # no abstract tokens: no trace
        E.evaluate(engine, tiny_tokenizer, problems, mode="abstract")
    with pytest.raises(RequestError, match="m_min"):
        E.evaluate(engine, tokenizer, problems, mode="abstract", m_min=20, m_max=10)
    assert engine.calls == []
    records, summary = E.evaluate(engine, tokenizer, problems[:2], mode="verbal")  # engine returns nothing
    assert summary["errors"] == 2 and summary["accuracy"] == 0.0 and summary["mean_generated_tokens"] is None
    records, summary = E.evaluate(engine, tokenizer, problems[:2], mode="abstract", m_min=3, m_max=10)
    assert len(engine.calls) == 2  # nothing to vary: no diagnostic requests
    assert summary["diagnostics"]["verdict"].startswith("NO TRACES") and summary["diagnostics"]["entropy_nats"] is None


def test_dataset_name():
    assert E.dataset_name("math500") == E.dataset_name("HuggingFaceH4/MATH-500") == "MATH-500"
    assert E.dataset_name("/data/toy/eval.jsonl") == "eval.jsonl"


# ---- the command line on the tiny model ---------------------------------------------------------

@pytest.mark.slow
def test_cli_end_to_end(model_dir, tmp_path, capsys):
    """Both modes on 3 fixture problems with the JAX engine: the files and their consistency."""
    for mode in ("abstract", "verbal"):
        out = tmp_path / mode
        rc = main(["--model", str(model_dir), "--data", str(FIXTURE), "--mode", mode, "--out", str(out),
                   "--limit", "3", "--m-min", "2", "--m-max", "6", "--max-new-tokens", "16", "--max-batch", "8"])
        assert rc == 0, capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == ["results.jsonl", "summary.json"]
        results, summary = read_outputs(out)
        abstract_ids = abstract_vocab(AutoTokenizer.from_pretrained(str(model_dir))).abstract_ids
        check_summary(results, summary, k=1, abstract_ids=abstract_ids if mode == "abstract" else None)
        assert summary["dataset"] == "math500_fixture.jsonl" and summary["model"] == str(model_dir)
        assert len(results) == 3 and summary["errors"] == 0
        for r in results:
            assert r["generated_tokens"] <= 16
            if mode == "abstract":
                assert r["response"].startswith("<beginabstract>") and 2 <= r["trace_length"] <= 6
                assert isinstance(r["random_trace_correct"], bool) and isinstance(r["shuffled_trace_correct"], bool)
            else:
                assert r["trace_length"] == 0 and "<beginabstract>" not in r["response"]
        assert summary["mode"] in capsys.readouterr().out


def test_cli_user_errors(tiny_hf_dir, tmp_path, capsys):
    cases = [
        (["--model", str(tmp_path / "nope"), "--data", str(FIXTURE), "--mode", "verbal"], "no config.json"),
        (["--model", str(tiny_hf_dir), "--data", str(tmp_path / "missing.jsonl"), "--mode", "verbal"], "not found"),
        (["--model", str(tiny_hf_dir), "--data", str(FIXTURE), "--mode", "abstract"], "has no abstract tokens"),
        (["--model", str(tiny_hf_dir), "--data", str(FIXTURE), "--mode", "verbal", "--limit", "0"], "--limit"),
    ]
    for args, message in cases:
        assert main([*args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_existing_out(tmp_path, capsys):
    """Results already in --out: one error line, exit 2, and the directory as it was (the model,
    which does not exist here, is never read)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("earlier\n")
    assert main(["--model", str(tmp_path / "nope"), "--data", str(FIXTURE), "--mode", "verbal", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.splitlines() == [
        f"error: --out {out} already holds summary.json; pass --overwrite to replace them, or another --out"]
    assert [p.name for p in out.iterdir()] == ["summary.json"] and (out / "summary.json").read_text() == "earlier\n"


@pytest.mark.slow
def test_cli_run_evaluates_as_the_run_does(model_dir, tmp_path, capsys):
    """`--run DIR` takes DIR/config.yaml's evaluation settings (none of them the command's defaults):
    the same records and summary as the run's own evaluation stage of that model."""
    from abscot_jax.config import load_config, to_dict
    from abscot_jax.stages import evaluation
    from abscot_jax.stages.context import RunContext

    cfg = load_config(None, ["name=tiny", f"run_dir={tmp_path}", f"data.eval={FIXTURE}", "eval.limit=3",
                             "eval.samples=2", "eval.m_min=2", "data.m_max=6", "eval.max_new_tokens=12",
                             "eval.trace_temperature=1.3", "train.seed=7", "sampler.max_batch=8"])
    run_dir = tmp_path / "tiny"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    stage_out = run_dir / "round_1" / "eval"
    evaluation.evaluate(RunContext(cfg), model_dir, "abstract", stage_out)  # the run's own evaluation
    stage_results, stage_summary = read_outputs(stage_out)
    assert stage_summary["settings"]["m_max"] == 6 and stage_summary["n_samples"] == 6

    args = ["--run", str(run_dir), "--model", str(model_dir), "--mode", "abstract", "--out", str(stage_out)]
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err  # the stage's results are there
    assert main([*args, "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        f"settings ({run_dir / 'config.yaml'}, unless given): data {FIXTURE}, limit 3, samples 2, seed 7, "
        "max_new_tokens 12, m_min 2, m_max 6, trace_temperature 1.3, engine jax, max_batch 8")
    results, summary = read_outputs(stage_out)
    assert results == stage_results
    assert summary.pop("model") == str(model_dir) and summary.pop("run") == str(run_dir)
    assert summary == stage_summary


def test_help_shows_the_defaults_a_run_would_use(capsys):
    """--help states each setting's default: the run config's (abscot_jax/config.py)."""
    from abscot_jax.config import RunConfig

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    e = RunConfig().eval
    assert f"(trace and answer together) (default: {e.max_new_tokens})" in text
    assert f"shortest trace (abstract mode) (default: {e.m_min})" in text
    assert "verbal: the model writes freely" in text  # --mode says what each mode is


@pytest.mark.slow
def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "abscot_jax.eval", "--model", str(tmp_path), "--data", "math500",
                           "--mode", "verbal", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path} is not a model directory (no config.json); pass an exported HF directory"]
