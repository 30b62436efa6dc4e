"""Variants (issue 7): the two-pass bottleneck keeps c out of the answer pass; best-of-k keeps the
trace under which the answer is most likely; CoT codes carry the CoT's content; config keys."""
import json

import numpy as np
import pytest
from flax import nnx

from abscot_jax.checkpoint.hf import load_hf
from abscot_jax.config import VariantsSection, load_config
from abscot_jax.data.dolci import DolciExample
from abscot_jax.data.pipeline import pack_row
from abscot_jax.data.roles import Role
from abscot_jax.data.sequences import BuildConfig, SequenceBuilder
from abscot_jax.data.toy import running_sum_problem
from abscot_jax.errors import ConfigError
from abscot_jax.sampling.engines.jax import JaxEngine
from abscot_jax.sampling.protocol import SamplingRequest
from abscot_jax import variants as V
from abscot_jax.layouts import build_phase_examples, two_pass


def toy_examples(n, seed=0, min_digits=4, max_digits=6):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = running_sum_problem(rng, min_digits, max_digits)
        out.append(DolciExample(f"toy-{i}", ({"role": "user", "content": p["question"]},), p["cot"],
                                f"\\boxed{{{p['answer']}}}"))
    return out


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def model(model_dir):
    return load_hf(model_dir)


@nnx.jit
def logits_of(model, tokens, positions, segment_ids, roles):
    return model(tokens, positions, segment_ids, roles)


def forward(model, rows):
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    return np.asarray(logits_of(model, batch["tokens"], batch["positions"], batch["segment_ids"], batch["roles"]))


# ---- two_pass -----------------------------------------------------------------------------------

def perturbed_rows(row, positions):
    """The row, then one copy per position with that token replaced."""
    rows = [row]
    for p in positions:
        r = {k: v.copy() for k, v in row.items()}
        r["tokens"][p] = 100 if r["tokens"][p] != 100 else 101
        rows.append(r)
    return rows


def test_two_pass_answer_pass_never_sees_the_cot(tok, model):
    builder = SequenceBuilder(tok, BuildConfig(seq_len=128, m_max=8))
    example = toy_examples(1)[0]
    trace = list(builder.vocab.abstract_ids[5:10])
    trace_pass, answer_pass = two_pass.phase_a(builder, example, trace)
    phase_a = builder.phase_a(example, trace)

    # Layout: the trace pass is Phase A without y, loss on z; the answer pass is the Phase B
    # sequence [x; z; y], loss on y only.
    n = len(trace_pass)
    assert np.array_equal(trace_pass.tokens, phase_a.tokens[:n]) and np.array_equal(trace_pass.roles, phase_a.roles[:n])
    assert Role.ANSWER not in trace_pass.roles
    assert np.array_equal(trace_pass.loss_mask[:-1], trace_pass.roles[1:] == Role.ABSTRACT)
    phase_b = builder.phase_b(example, trace)
    assert np.array_equal(answer_pass.tokens, phase_b.tokens) and np.array_equal(answer_pass.roles, phase_b.roles)
    assert np.array_equal(answer_pass.loss_mask[:-1], answer_pass.roles[1:] == Role.ANSWER)

    # Packed in one row; every CoT token changed in turn.
    row = pack_row([trace_pass, answer_pass], 128)
    cot = np.flatnonzero((row["segment_ids"] == 1) & (row["roles"] == Role.COT))
    z = np.flatnonzero((row["segment_ids"] == 1) & (row["roles"] == Role.ABSTRACT))
    answer = row["segment_ids"] == 2
    logits = forward(model, perturbed_rows(row, cot))
    for r in range(1, len(cot) + 1):
        assert np.array_equal(logits[r][answer], logits[0][answer])  # bit-identical: nothing of c arrives
        assert np.abs(logits[r][z] - logits[0][z]).max() > 1e-4  # the trace pass does see c

    # The paper's single pass, by contrast: answer positions read c through z's hidden states.
    row = pack_row([phase_a], 128)
    cot = np.flatnonzero(row["roles"] == Role.COT)
    answer = row["roles"] == Role.ANSWER
    logits = forward(model, perturbed_rows(row, cot))
    assert all(np.abs(logits[r][answer] - logits[0][answer]).max() > 1e-4 for r in range(1, len(cot) + 1))


def test_build_phase_examples_dispatch(tok):
    builder = SequenceBuilder(tok, BuildConfig(seq_len=128, m_max=8))
    examples = toy_examples(3)
    traces = {e.id: list(builder.vocab.abstract_ids[i:i + 3]) for i, e in enumerate(examples)}
    paper = build_phase_examples(builder, examples, "A", traces, VariantsSection())
    plain = builder.build_all(examples, "A", traces)
    assert [e.tokens.tolist() for e in paper] == [e.tokens.tolist() for e in plain]
    two = build_phase_examples(builder, examples, "A", traces, VariantsSection(bottleneck="two_pass"))
    assert len(two) == 6 and [Role.COT in e.roles for e in two] == [True, False] * 3
    # Phase B is never split.
    assert len(build_phase_examples(builder, examples, "B", traces, VariantsSection(bottleneck="two_pass"))) == 3


def test_weighted_candidates_scale_the_loss_mask(tok, tmp_path):
    builder = SequenceBuilder(tok, BuildConfig(seq_len=128, m_max=8))
    example = toy_examples(1)[0]
    ids = builder.vocab.abstract_ids
    scores = [-3.0, -1.0, -2.0]
    path = tmp_path / "cands.json"
    path.write_text(json.dumps({example.id: {"traces": [[ids[0]], [ids[1]], [ids[2]]], "scores": scores}}))
    built = build_phase_examples(builder, [example], "B", {}, VariantsSection(trace_selection="best_of_k",
                                                                              weight_by_score=True), path)
    expected = np.exp(scores) / np.exp(scores).sum()
    unweighted = builder.phase_b(example, [ids[0]]).loss_mask
    for ex, w, t in zip(built, expected, ids):
        assert ex.trace == (t,)
        np.testing.assert_allclose(ex.loss_mask, unweighted * w, rtol=1e-6)


# ---- best_of_k ----------------------------------------------------------------------------------

def independent_logliks(model, builder, example, trace, length=96):
    """One plain causal forward of [x; <beginabstract> z <endabstract>; y] alone (padded at the end
    to `length`, which causal attention never looks at); log-softmax summed over y's tokens, and
    over z's tokens and <endabstract> (the trace given x and <beginabstract>)."""
    x, y = builder.prompt_ids(example), builder.answer_ids(example)
    z = [builder.vocab.begin_id, *trace, builder.vocab.end_id]
    n = len(x) + len(z) + len(y)
    seq = np.zeros((1, length), np.int32)
    seq[0, :n] = x + z + y
    logits = np.asarray(logits_of(model, seq, np.arange(length)[None], (np.arange(length) < n)[None].astype(np.int32),
                                  np.zeros_like(seq)), np.float64)[0]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    first = len(x) + len(z)
    answer = sum(logp[i - 1, seq[0, i]] for i in range(first, n))
    trace = sum(logp[i - 1, seq[0, i]] for i in range(len(x) + 1, first))
    return answer, trace


@pytest.mark.slow
@pytest.mark.parametrize("prior", [0.0, 0.5])
def test_best_of_k_keeps_the_argmax_of_independent_scores(tok, model, prior):
    builder = SequenceBuilder(tok, BuildConfig(seq_len=96, m_max=6))
    examples = toy_examples(3)
    engine = JaxEngine(model, tok, max_batch=16)
    requests = [SamplingRequest(id=e.id, prompt_ids=[int(t) for t in builder.condition_ids(e)[:-1]], mode="trace",
                                temperature=1.0, m_min=1, m_max=6, max_new_tokens=8, seed=i)
                for i, e in enumerate(examples)]
    k = 4
    selection = V.select_traces(engine, lambda: model, builder, examples, requests, k, rows=2, trace_prior_weight=prior)
    assert selection.cost["samples"] == len(examples) * k
    assert selection.cost["scoring_tokens"] > 0 and selection.cost["tokens_generated"] > 0
    assert set(selection.best) == {e.id for e in examples}
    for example in examples:
        cands = selection.candidates[example.id]
        distinct = {tuple(t) for t in cands["traces"]}
        assert len(distinct) >= 2  # distinct seeds give distinct samples: the choice is a real one
        answer, trace = np.array([independent_logliks(model, builder, example, t) for t in cands["traces"]]).T
        np.testing.assert_allclose(cands["answer_logliks"], answer, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(cands["trace_logliks"], trace, rtol=1e-5, atol=1e-4)
        independent = answer + prior * trace
        np.testing.assert_allclose(cands["scores"], independent, rtol=1e-5, atol=1e-4)
        order = np.argsort(-independent)
        top, second = independent[order[0]], max((independent[i] for i in order
                                                   if tuple(cands["traces"][i]) != tuple(cands["traces"][order[0]])),
                                                  default=-np.inf)
        assert top - second > 1e-3  # a clear winner, not a float tie
        assert selection.best[example.id] == cands["traces"][order[0]]


def test_candidate_requests_have_distinct_seeds():
    base = [SamplingRequest(id=f"e{i}", prompt_ids=[1], mode="trace", seed=10 + i) for i in range(5)]
    out = V.candidate_requests(base, 3)
    assert len({r.seed for r in out}) == 15
    assert [r.seed for r in out[::3]] == [r.seed for r in base]  # copy 0 is the request itself


# ---- cot_codes ----------------------------------------------------------------------------------

def test_step_spans_follow_the_builders_step_split(tok):
    builder = SequenceBuilder(tok, BuildConfig(seq_len=256))
    multi = DolciExample("m", ({"role": "user", "content": "q"},),
                         "First 2 + 3 = 5.\n\nThen 5 + 4 = 9.\nSo the sum is 9.", "9")
    for example in [*toy_examples(3), multi]:
        ids, spans = V.step_spans(builder, example)
        pieces = builder.cot_pieces(example)
        assert ids == pieces.open + pieces.cot + pieces.close
        lines = [line for line in example.cot.split("\n") if line.strip()]
        assert [tok.decode(ids[a:b]).strip() for a, b in spans] == [line.strip() for line in lines]


def step_codes_and_sums(examples, traces, vocab):
    """Per step: (code, partial sum) for codes_per_step=1 traces (trace token i codes step i)."""
    index = {t: i for i, t in enumerate(vocab.abstract_ids)}
    codes, sums = [], []
    for e in examples:
        steps = e.cot.split("\n")
        assert len(traces[e.id]) == len(steps)
        codes += [index[t] for t in traces[e.id]]
        sums += steps
    return np.array(codes), np.array(sums)


def test_identical_steps_get_identical_codes(tok, model):
    builder = SequenceBuilder(tok, BuildConfig(seq_len=128, m_max=32))
    examples = toy_examples(30)
    # At layer 0 a step's vector is its tokens' mean embedding: same text, same code, anywhere.
    traces, _ = V.cot_code_traces(model, builder, examples, code_layer=0, rows=4)
    codes, sums = step_codes_and_sums(examples, traces, builder.vocab)
    by_text = {s: set(codes[sums == s]) for s in set(sums)}
    assert all(len(c) == 1 for c in by_text.values())  # identical steps, identical codes
    assert len({c.pop() for c in by_text.values()}) == len(by_text)  # different digits, different codes
    # At the middle layer the context matters, but the same example is coded the same wherever it sits.
    twin = DolciExample("twin", examples[0].prompt_messages, examples[0].cot, examples[0].answer)
    traces, _ = V.cot_code_traces(model, builder, [*examples, twin], rows=4)
    assert traces["twin"] == traces[examples[0].id]


def test_cot_codes_recover_the_partial_sums(tok, model, tmp_path):
    builder = SequenceBuilder(tok, BuildConfig(seq_len=256, m_max=32))
    examples = toy_examples(250, min_digits=6, max_digits=8)
    traces, stats = V.cot_code_traces(model, builder, examples, rows=8, seed=0, out_dir=tmp_path)
    codes, sums = step_codes_and_sums(examples, traces, builder.vocab)
    mi = V.mutual_information(codes, sums)
    # Independently: H(S) - H(S | C).
    def entropy(values):
        _, counts = np.unique(values, return_counts=True)
        p = counts / counts.sum()
        return -(p * np.log(p)).sum()
    conditional = sum((codes == c).mean() * entropy(sums[codes == c]) for c in np.unique(codes))
    assert mi == pytest.approx(entropy(sums) - conditional, abs=1e-9)
    # Baseline: the paper's random round-1 traces (one random token per one-token step here).
    random_codes, _ = step_codes_and_sums(examples, {e.id: builder.random_trace(e) for e in examples}, builder.vocab)
    mi_random = V.mutual_information(random_codes, sums)
    print(f"\nMI(code; partial sum) = {mi:.3f} nats (H = {entropy(sums):.3f}); random traces: {mi_random:.3f}")
    assert mi > 1.5 and mi > mi_random + 1.0

    saved = np.load(tmp_path / "codebook.npz")
    assert saved["codebooks"].shape == (1, 64, model.config.hidden_size) and int(saved["layer"]) == 1
    on_disk = json.loads((tmp_path / "codebook_stats.json").read_text())
    assert on_disk == json.loads(json.dumps(stats))
    level = on_disk["levels"][0]
    assert sum(level["histogram"]) == on_disk["steps"] == len(codes)
    assert np.array_equal(level["histogram"], np.bincount(codes, minlength=64))
    assert 1 <= level["perplexity"] <= level["codes_used"] <= 64 and level["inertia"] >= 0


def test_residual_codes_per_step(tok, model):
    builder = SequenceBuilder(tok, BuildConfig(seq_len=128, m_max=9))
    examples = toy_examples(20)
    traces, stats = V.cot_code_traces(model, builder, examples, codes_per_step=2, rows=4)
    for e in examples:
        assert len(traces[e.id]) == min(2 * len(e.cot.split("\n")), 9)  # two codes a step, capped at m_max
    first, second = stats["levels"]
    assert second["inertia"] <= first["inertia"]  # the second level explains part of what the first left
    assert stats["traces_capped_at_m_max"] == sum(2 * len(e.cot.split("\n")) > 9 for e in examples)


# ---- config -------------------------------------------------------------------------------------

def test_variants_config_keys_load_and_typos_are_named():
    cfg = load_config(None, ["variants.bottleneck=two_pass", "variants.trace_selection=best_of_k", "variants.k=4",
                             "variants.select_phase_b=true", "variants.weight_by_score=true",
                             "variants.round1_traces=cot_codes", "variants.code_layer=3", "variants.codes_per_step=2",
                             "variants.trace_prior_weight=0.5"])
    assert cfg.variants == VariantsSection(bottleneck="two_pass", trace_selection="best_of_k", k=4, select_phase_b=True,
                                           weight_by_score=True, round1_traces="cot_codes", code_layer=3,
                                           codes_per_step=2, trace_prior_weight=0.5)
    assert load_config(None, []).variants == VariantsSection()  # the paper's method by default
    for overrides, message in [
        (["variants.botleneck=two_pass"], "unknown config key 'variants.botleneck'; did you mean 'variants.bottleneck'?"),
        (["variants.bottleneck=three_pass"], "variants.bottleneck must be one of paper, two_pass"),
        (["variants.weight_by_score=true"], "need variants.trace_selection=best_of_k"),
        (["variants.trace_prior_weight=1"], "need variants.trace_selection=best_of_k"),
        (["variants.trace_selection=best_of_k", "variants.trace_prior_weight=-1"],
         "variants.trace_prior_weight must be >= 0"),
        (["variants.round1_traces=codes"], "variants.round1_traces must be one of random, cot_codes"),
        (["variants.codes_per_step=0"], "variants.codes_per_step (+1 with step_separator) must be in [1, data.m_max]"),
        (["variants.bottleneck=two_pass", "train.loss_on_trace=false"], "needs train.loss_on_trace=true"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(None, overrides)
        assert message in str(err.value)


# ---- the round driver calls them ----------------------------------------------------------------

@pytest.mark.slow
def test_driver_wiring_cot_codes_and_best_of_k(tmp_path, tiny_hf_dir):
    from abscot_jax.data.toy import write_toy_data
    from abscot_jax.stages.base import prepare_base
    from abscot_jax.stages.context import RunContext
    from abscot_jax.stages.traces import phase_traces
    from abscot_jax.trace_sources import trace_source

    train, _ = write_toy_data(tmp_path, train_size=12, eval_size=1, min_digits=3, max_digits=4)
    cfg = load_config(None, [
        f"run_dir={tmp_path}", "name=v", "rounds=2", f"model.hf_dir={tiny_hf_dir}", f"data.train={train}",
        "data.examples_per_phase=3", "data.m_max=6", "eval.m_min=4", "train.seq_len=128", "train.batch_size=2", "sampler.max_batch=8",
        "variants.round1_traces=cot_codes", "variants.trace_selection=best_of_k", "variants.k=2"])
    assert [trace_source(cfg.variants, t, p) for t, p in ((1, "a"), (1, "b"), (2, "a"), (2, "b"))] == [
        "cot_codes", "sampled", "best_of_k", "sampled"]
    run = RunContext(cfg)
    prepare_base(run)
    result = phase_traces(run, 1, "a", "cot_codes")
    assert result["rule"] == "cot_codes" and result["layer"] == 1
    round_1 = run.round_dir(1)
    assert (round_1 / "codebook.npz").exists() and (round_1 / "codebook_stats.json").exists()
    traces = json.loads((round_1 / "traces_a.json").read_text())
    assert set(traces) == {e.id for e in run.split("round_1_a")}
    # best_of_k on Phase A traces (rounds >= 2 sample on (x, c)): k samples per example, costs recorded.
    (round_1 / "model_b").symlink_to(run.dir / "base")  # round 1's final model: the base will do here
    examples = run.split("round_2_a")
    cost = phase_traces(run, 2, "a", "best_of_k")
    assert cost["selection"] == "best_of_2" and cost["samples"] == 2 * len(examples)
    assert cost["scoring_tokens"] > 0 and cost["tokens_generated"] > 0
    candidates = json.loads((run.round_dir(2) / "traces_a_candidates.json").read_text())
    chosen = json.loads((run.round_dir(2) / "traces_a.json").read_text())
    for example_id, c in candidates.items():
        assert chosen[example_id] == c["traces"][int(np.argmax(c["scores"]))]
