"""The rl_eval stage: the rl stage's model evaluated exactly as a round's model (abstract mode, with
the random and shuffled trace diagnostics) or as the verbal baseline (verbal mode): the same
records and summary as those stages give the same model."""
from __future__ import annotations

import json

import pytest

from abscot_jax.config import load_config
from abscot_jax.data.toy import write_toy_data
from abscot_jax.stages.context import RunContext
from abscot_jax.stages.evaluation import baseline, rl_eval, round_eval


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    return write_toy_data(tmp_path_factory.mktemp("rl_eval_data"), train_size=4, eval_size=3, min_digits=3,
                          max_digits=4)[1]


def run_context(root, eval_file, model_dir, mode: str) -> RunContext:
    """A run whose starting model, round 1 model and rl model are all the fixture model."""
    cfg = load_config(None, [f"run_dir={root}", f"name={mode}", "rounds=1", f"data.eval={eval_file}", "data.m_max=6",
                             "eval.m_min=2", "eval.max_new_tokens=16", "sampler.max_batch=4",
                             f"rl.mode={mode}"])
    ctx = RunContext(cfg)
    for path in ("base", "round_1/model_b", "rl/model"):
        (ctx.dir / path).parent.mkdir(parents=True, exist_ok=True)
        (ctx.dir / path).symlink_to(model_dir)
    return ctx


def files(out_dir) -> tuple[dict, str]:
    return json.loads((out_dir / "summary.json").read_text()), (out_dir / "results.jsonl").read_text()


@pytest.mark.slow
def test_abstract_rl_eval_is_the_round_eval_with_trace_diagnostics(tmp_path, eval_file, model_dir):
    ctx = run_context(tmp_path, eval_file, model_dir, "abstract")
    assert rl_eval(ctx) == round_eval(ctx, 1)
    summary, records = files(ctx.dir / "rl" / "eval")
    assert (summary, records) == files(ctx.round_dir(1) / "eval")
    assert summary["mode"] == "abstract" and summary["n_problems"] == 3
    d = summary["diagnostics"]
    assert d["own_accuracy"] == summary["accuracy"] and d["n_traces"] == 3
    assert all("random_trace_correct" in json.loads(line) for line in records.splitlines())


@pytest.mark.slow
def test_verbal_rl_eval_is_the_verbal_baseline(tmp_path, eval_file, model_dir):
    ctx = run_context(tmp_path, eval_file, model_dir, "verbal")
    assert rl_eval(ctx) == baseline(ctx, "verbal")
    summary, records = files(ctx.dir / "rl" / "eval")
    assert (summary, records) == files(ctx.dir / "baseline" / "verbal")
    assert summary["mode"] == "verbal" and summary["diagnostics"] is None and summary["n_problems"] == 3
