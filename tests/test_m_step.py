"""Phase B's trace sources (the M-step), the stepwise-internalisation curriculum and the pause
baseline: each checked against an independent construction of what it must produce."""
import json

import numpy as np
import pytest

from abscot_jax import rounds
from abscot_jax import variants as V
from abscot_jax.config import load_config
from abscot_jax.data.dolci import DataError, DolciExample
from abscot_jax.data.roles import Role
from abscot_jax.data.sequences import BuildConfig, SequenceBuilder
from abscot_jax.data.toy import write_toy_data
from abscot_jax.errors import ConfigError
from abscot_jax.layouts import build_phase_examples
from abscot_jax.sampling.protocol import SamplingResult
from abscot_jax.stages.base import prepare_base
from abscot_jax.stages.context import RunContext
from abscot_jax.stages.traces import phase_traces
from abscot_jax.stages.training import curriculum_steps
from abscot_jax.trace_sources import trace_source
from abscot_jax.trace_sources.pause import pause_trace
from tests.test_variants import toy_examples


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def toy_run(tmp_path, hf_dir, *overrides, rows=16):
    train, _ = write_toy_data(tmp_path, train_size=rows, eval_size=1, min_digits=3, max_digits=5)
    cfg = load_config(None, [
        f"run_dir={tmp_path}", "name=m", "rounds=1", f"model.hf_dir={hf_dir}", f"data.train={train}",
        "data.examples_per_phase=6", "data.m_max=8", "eval.m_min=4", "train.seq_len=128", "train.batch_size=2", "sampler.max_batch=8",
        *overrides])
    run = RunContext(cfg)
    prepare_base(run)
    return run


def test_phase_b_cot_codes_are_each_examples_own_step_codes(tmp_path, tiny_hf_dir):
    run = toy_run(tmp_path, tiny_hf_dir, "variants.round1_traces=cot_codes", "variants.phase_b_traces=cot_codes",
                  "variants.code_layer=0")
    assert trace_source(run.cfg.variants, 1, "b") == "cot_codes"
    assert rounds.find_stage(run.cfg, "round_1/traces_b").reads == ("base",)  # the starting model encodes
    assert phase_traces(run, 1, "a", "cot_codes")["codebook"] == "fitted"
    assert phase_traces(run, 1, "b", "cot_codes")["codebook"] == "given"  # one codebook across the round
    traces = json.loads((run.round_dir(1) / "traces_b.json").read_text())
    # Independently: at layer 0 a step's vector is the mean embedding of its tokens; its code is
    # the nearest centroid of the saved codebook.
    codebook = np.load(run.round_dir(1) / "codebook.npz")["codebooks"][0].astype(np.float64)
    from safetensors.numpy import load_file

    (embed,) = [v.astype(np.float64) for f in sorted((run.dir / "base").glob("*.safetensors"))
                for k, v in load_file(str(f)).items() if k.endswith("embed_tokens.weight")]
    builder = run.builder()
    abstract = builder.vocab.abstract_ids
    examples = run.split("round_1_b")
    for e in examples:
        c, spans = V.step_spans(builder, e)
        vectors = np.stack([embed[c[a:b]].mean(0) for a, b in spans])
        nearest = ((vectors[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(1)
        assert traces[e.id] == [abstract[i] for i in nearest]
    # Phase B trains exactly these traces: [x; <beginabstract> codes <endabstract>; y].
    built = build_phase_examples(builder, examples, "B", traces, run.cfg.variants)
    assert {b.id: list(b.trace) for b in built} == {e.id: traces[e.id] for e in examples}


class RecordingEngine:
    def __init__(self, model_dir, trace):
        self.model_dir, self.trace, self.requests = model_dir, trace, []

    def run_requests(self, requests):
        self.requests += requests
        return [SamplingResult(r.id, trace_ids=self.trace, finish_reason="stop") for r in requests]


def test_posterior_requests_condition_on_the_cot_of_the_phase_a_model(tmp_path, tiny_hf_dir, monkeypatch):
    run = toy_run(tmp_path, tiny_hf_dir, "variants.phase_b_traces=posterior", "variants.posterior_temperature=0.5")
    assert trace_source(run.cfg.variants, 1, "b") == "posterior"
    abstract = run.builder().vocab.abstract_ids
    engines = []
    monkeypatch.setattr(RunContext, "engine",
                        lambda self, d: engines.append(RecordingEngine(d, abstract[:3])) or engines[-1])
    result = phase_traces(run, 1, "b", "posterior")
    (engine,) = engines
    assert engine.model_dir == run.round_dir(1) / "model_a"
    builder, examples = run.builder(), run.split("round_1_b")
    assert result["traces"] == len(engine.requests) == len(examples)
    for request, e in zip(engine.requests, examples):
        x, c = builder.prompt_ids(e), builder.cot_pieces(e)
        assert request.prompt_ids == [int(t) for t in x + c.open + c.cot + c.close]  # x; c (the sampler adds <ba>)
        assert request.mode == "trace" and request.temperature == 0.5


def test_curriculum_stage_k_replaces_exactly_the_first_k_steps(tok):
    builder = SequenceBuilder(tok, BuildConfig(seq_len=256, m_max=32))
    (example,) = toy_examples(1, min_digits=5, max_digits=5)
    steps = example.cot.split("\n")
    codes = [[builder.vocab.abstract_ids[10 + i]] for i in range(len(steps))]
    x, y = builder.prompt_ids(example), builder.answer_ids(example)
    for k in range(len(steps) + 1):
        seq = builder.curriculum(example, codes, k)
        ids = [int(t) for t in seq.tokens]
        z = [builder.vocab.begin_id, *(c[0] for c in codes[:k]), builder.vocab.end_id]
        assert ids[:len(x) + len(z)] == x + z and ids[len(ids) - len(y):] == y
        rest = tok.decode(ids[len(x) + len(z):len(ids) - len(y)])
        if k < len(steps):  # the verbal CoT of the steps after k, in its think block
            assert rest == "<think>\n" + "\n".join(steps[k:]) + "\n</think>\n\n"
        else:
            assert rest == ""
        assert list(seq.trace) == z[1:-1]
        assert set(seq.roles[len(x):len(x) + len(z)]) == {Role.ABSTRACT}
        assert set(seq.roles[len(x) + len(z):]) <= {Role.ANSWER}
    full, b = builder.curriculum(example, codes, len(steps)), builder.phase_b(example, [c[0] for c in codes])
    for field in ("tokens", "roles", "targets", "loss_mask"):  # every step replaced: Phase B's sequence
        assert np.array_equal(getattr(full, field), getattr(b, field))
    removed = builder.curriculum(example, [[] for _ in steps], 2)  # curriculum_fill=none: no codes
    assert list(removed.trace) == []
    assert [int(t) for t in removed.tokens[:len(x) + 2]] == x + [builder.vocab.begin_id, builder.vocab.end_id]
    assert tok.decode(removed.tokens[len(x) + 2:len(removed) - len(y)]) == "<think>\n" + "\n".join(steps[2:]) + "\n</think>\n\n"
    assert builder.curriculum(DolciExample("empty", example.prompt_messages, "", example.answer), codes, 1) is None
    assert builder.report.dropped["no_cot_steps"] == 1
    # The schedule: every sub-phase internalises more, the last all of them.
    for n in (1, 5, 12):
        ks = [curriculum_steps(s, 4, n) for s in range(1, 5)]
        assert ks == sorted(ks) and ks[-1] == n and ks[0] >= 1


def test_pause_trace_is_one_token_repeated_as_long_as_the_random_rule(tok):
    builder = SequenceBuilder(tok, BuildConfig(seq_len=256, m_max=32))
    for e in toy_examples(10):
        trace = pause_trace(builder, e)
        assert len(set(trace)) == 1 and trace[0] in builder.vocab.abstract_ids
        assert len(trace) == len(builder.random_trace(e))
    cfg = load_config(None, ["variants.trace_source=pause", "rounds=2"])
    assert {trace_source(cfg.variants, t, p) for t in (1, 2) for p in "ab"} == {"pause"}
    assert rounds.find_stage(cfg, "round_2/traces_b").reads == ("base",)


def test_the_curriculum_plan_has_no_phase_a():
    cfg = load_config(None, ["rounds=2", "data.warmup_examples=4", "variants.curriculum=stepwise"])
    round_2 = {s.key: s for s in rounds.round_stages(cfg, 2)}
    assert list(round_2) == ["round_2/traces_b", "round_2/phase_b", "round_2/eval"]
    assert round_2["round_2/traces_b"].args["source"] == "cot_codes"
    assert round_2["round_2/phase_b"].reads == ("round_1/model_b", "round_2/traces_b.json")
    assert rounds.phase_start(cfg, 1, "b") == "warmup/model"


def test_m_step_config_keys_and_bad_values():
    cfg = load_config(None, ["variants.phase_b_traces=posterior", "variants.posterior_temperature=0.7",
                             "variants.curriculum=stepwise", "variants.curriculum_fill=none",
                             "variants.curriculum_stages=6"])
    v = cfg.variants
    assert (v.phase_b_traces, v.posterior_temperature, v.curriculum, v.curriculum_fill, v.curriculum_stages) == (
        "posterior", 0.7, "stepwise", "none", 6)
    for overrides, message in [
        (["variants.phase_b_traces=codes"], "variants.phase_b_traces must be one of sampled, cot_codes, posterior"),
        (["variants.posterior_temperature=0"], "variants.posterior_temperature must be > 0"),
        (["variants.trace_source=silence"], "variants.trace_source must be 'rules' or 'pause'"),
        (["variants.curriculum=stepwize"], "variants.curriculum must be 'none' or 'stepwise'"),
        (["variants.curriculum_stages=0"], "variants.curriculum_stages must be >= 1"),
        (["variants.curriculum=stepwise", "variants.trace_source=pause"], "takes no trace_source=pause"),
        (["variants.trace_selection=best_of_k", "variants.select_phase_b=true", "variants.phase_b_traces=posterior"],
         "needs variants.phase_b_traces=sampled"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)


def test_codes_of_a_cot_without_steps_is_one_clear_error(tok, model):
    builder = SequenceBuilder(tok, BuildConfig(seq_len=128, m_max=8))
    (example,) = toy_examples(1)
    empty = DolciExample("empty", example.prompt_messages, "", example.answer)
    with pytest.raises(DataError, match="cot_codes: no CoT steps to encode"):
        V.cot_code_traces(model, builder, [empty], code_layer=0)


@pytest.fixture(scope="module")
def model(model_dir):
    from abscot_jax.checkpoint.hf import load_hf

    return load_hf(model_dir)


def test_an_unknown_study_arm_is_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "toy_study.py"
    result = subprocess.run([sys.executable, str(script), "--arms", "m_step,control,stepwise_nope", "--out",
                             str(tmp_path / "study")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and not (tmp_path / "study").exists()
    last = result.stderr.strip().splitlines()[-1]
    assert "unknown arm(s) ['stepwise_nope']; choose from variants, m_step," in last and "control" in last


def test_phase_b_epochs_apply_to_phase_b_only():
    from abscot_jax.stages.training import phase_config

    cfg = load_config(None, ["train.epochs=2", "train.phase_b_epochs=16"])
    assert [phase_config(cfg, p).train.epochs for p in ("warmup", "a", "b")] == [2, 2, 16]
    assert phase_config(load_config(None, ["train.epochs=3"]), "b").train.epochs == 3  # 0: train.epochs
    with pytest.raises(ConfigError, match="train.phase_b_epochs >= 0"):
        load_config(None, ["train.phase_b_epochs=-1"])


def test_step_separator_follows_every_steps_code(tok, model, tmp_path):
    builder = SequenceBuilder(tok, BuildConfig(seq_len=128, m_max=32))
    examples = toy_examples(20)
    plain, _ = V.cot_code_traces(model, builder, examples, code_layer=0, out_dir=tmp_path / "plain")
    separated, stats = V.cot_code_traces(model, builder, examples, code_layer=0, separator=True,
                                         out_dir=tmp_path / "separated")
    sep = builder.vocab.abstract_ids[-1]
    for e in examples:
        trace = separated[e.id]
        assert trace[1::2] == [sep] * len(e.cot.split("\n")) and sep not in trace[::2]
        # the same partition of the steps as without the separator (at layer 0: one code per distinct digit)
        assert len(set(zip(trace[::2], plain[e.id]))) == len(set(plain[e.id]))
    assert np.load(tmp_path / "separated" / "codebook.npz")["codebooks"].shape[1] == 63 and stats["separator"]
    with pytest.raises(DataError, match="need 1 levels of at most 63"):  # a 64-code book would use the separator
        V.cot_code_traces(model, builder, examples, code_layer=0, separator=True,
                          codebooks=np.load(tmp_path / "plain" / "codebook.npz")["codebooks"])
