"""The JAX sampler: greedy parity with HF `generate`, the trace constraint's properties, the
sampling distribution, seeds, sharding and bounded compilation."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import jax
import jax.numpy as jnp
from flax import nnx

from abscot_jax.checkpoint.hf import load_hf
from abscot_jax.sampling import constraints as C
from abscot_jax.sampling.protocol import SamplingRequest
from abscot_jax.sampling.sampler import DecodeState, Rows, Sampler, TraceTokens, bucket, decode_step
from abscot_jax.vocab import add_abstract_tokens

@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    # No checkpoint defaults: its eos (<|im_end|>) would be suppressed by min_new_tokens.
    model.generation_config = GenerationConfig(pad_token_id=0)
    return model


@pytest.fixture(scope="module")
def vocab(model_dir):
    from transformers import AutoTokenizer

    return add_abstract_tokens(AutoTokenizer.from_pretrained(str(model_dir)))


EOS = 2  # <|im_end|> in the fixture tokenizer
# Fixed buckets (batch 64, prompt 32, budget 32): every test below that fits them runs the same
# compiled program, so the file pays for one compilation, not one per test.
BUCKETS = dict(max_batch=64, min_batch=64, min_prompt_bucket=32, min_new_bucket=32)


@pytest.fixture(scope="module")
def sampler(model_dir, vocab):
    return Sampler(load_hf(model_dir), trace=TraceTokens.of(vocab), eos_id=EOS, **BUCKETS)


def verbal(i, prompt, n, **kw):
    return SamplingRequest(id=str(i), prompt_ids=prompt, max_new_tokens=n, stop_token_ids=[], **kw)


def hf_greedy(hf_model, prompts, new_tokens):
    """Reference: HF generate, greedy, left-padded batch, no stop token."""
    from transformers import GenerationConfig

    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        out = hf_model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return out[:, width:].tolist()


@pytest.mark.slow
def test_greedy_matches_hf_generate(sampler, hf_model):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 500, n).tolist() for n in (3, 11, 17, 6, 30)]  # one batch, lengths differ
    ours = sampler.generate(prompts, [verbal(i, p, 24) for i, p in enumerate(prompts)], [24] * len(prompts))
    reference = hf_greedy(hf_model, prompts, 24)
    assert [tokens for tokens, _ in ours] == reference
    assert len({tuple(r) for r in reference}) == len(prompts)  # a test on varied text, not one repeated token
    assert all(len(set(r)) > 5 for r in reference)
    assert not any(stopped for _, stopped in ours)  # no stop token: every row ran to length


def test_stop_token_and_per_row_budget(sampler, hf_model):
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    free = hf_greedy(hf_model, prompts, 12)
    stop = free[0][4]  # a token the first row emits at index 4 (and maybe earlier)
    first = free[0].index(stop)
    requests = [SamplingRequest(id="0", prompt_ids=prompts[0], max_new_tokens=12, stop_token_ids=[stop]),
                verbal(1, prompts[1], 5)]
    out = sampler.generate(prompts, requests, [12, 5])
    assert out[0] == (free[0][:first + 1], True)  # stops on (and keeps) the stop token
    assert out[1] == (free[1][:5], False)  # its own budget, not the batch's


# ---- the constraint -----------------------------------------------------------------------------

def run_decode_steps(logits_fn, requests, trace, max_new):
    """decode_step in a loop over synthetic logits (no model): the constraint alone."""
    rows = jax.tree.map(jnp.asarray, Rows.build(requests, [r.budget() for r in requests], eos_id=None))
    state = DecodeState.init(rows, max_new)
    step = jax.jit(decode_step, static_argnames="trace")
    while int(state.step) < max_new and not bool(jnp.all(state.done)):
        state = step(state, logits_fn(int(state.step)), rows, trace=trace)
    return [[int(t) for t in row if t >= 0] for row in np.asarray(state.tokens)]


TOY = TraceTokens(abstract_ids=tuple(range(10, 74)), begin_id=74, end_id=75)


@pytest.mark.parametrize("end_logit, expect", [(50.0, "m_min"), (-50.0, "m_max")])
def test_end_forbidden_before_m_min_and_forced_at_m_max(end_logit, expect):
    base = np.random.default_rng(1).normal(size=(3, 80)).astype(np.float32)
    base[:, TOY.end_id] = end_logit  # the model wants to end at once / never
    bounds = [(0, 4), (3, 3), (2, 7)]
    requests = [SamplingRequest(id=str(i), prompt_ids=[1], mode="trace", m_min=lo, m_max=hi)
                for i, (lo, hi) in enumerate(bounds)]
    out = run_decode_steps(lambda _: base, requests, TOY, 16)
    for tokens, (lo, hi) in zip(out, bounds):
        want = lo if expect == "m_min" else hi
        assert tokens[0] == TOY.begin_id and tokens[-1] == TOY.end_id
        assert len(tokens) - 2 == want
        assert set(tokens[1:-1]) <= set(TOY.abstract_ids)


def qwen3_trace(qwen3_tokenizer_dir) -> tuple[TraceTokens, int]:
    """The trace ids Qwen3's real tokenizer gets, and Qwen3-4B's 151,936 embedding rows."""
    from transformers import AutoTokenizer

    from abscot_jax.plan import PRESETS

    vocab = add_abstract_tokens(AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir)))
    return TraceTokens.of(vocab), PRESETS["qwen3-4b"]["vocab_size"]


@pytest.mark.parametrize("which", ["toy", "qwen3"])
def test_allowed_tokens_table(which, request):
    trace, size = (TOY, 80) if which == "toy" else qwen3_trace(request.getfixturevalue("qwen3_tokenizer_dir"))
    phase = jnp.array([C.BEFORE_TRACE, C.IN_TRACE, C.IN_TRACE, C.IN_TRACE, C.ANSWER])
    trace_len = jnp.array([0, 1, 2, 5, 9])
    m_min, m_max = jnp.full(5, 2), jnp.full(5, 5)
    allowed = np.asarray(C.allowed_tokens(phase, trace_len, m_min, m_max, jnp.asarray(trace.abstract_ids),
                                          trace.begin_id, trace.end_id, size))
    abstract = np.zeros(size, bool)
    abstract[list(trace.abstract_ids)] = True
    only = lambda i: np.arange(size) == i  # noqa: E731
    np.testing.assert_array_equal(allowed[0], only(trace.begin_id))  # begin forced
    np.testing.assert_array_equal(allowed[1], abstract)  # below m_min: no end
    np.testing.assert_array_equal(allowed[2], abstract | only(trace.end_id))
    np.testing.assert_array_equal(allowed[3], only(trace.end_id))  # at m_max: end forced
    assert allowed[4].all()  # answer: free


def random_params(like, seed, std):
    """New random weights for the fixture's architecture: N(0, std) matrices, norms 1 + N(0, 0.1)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    new = []
    for key, (path, leaf) in zip(keys, flat):
        noise = jax.random.normal(key, leaf.shape, leaf.dtype)
        new.append(1 + 0.1 * noise if "norm" in jax.tree_util.keystr(path) else std * noise)
    return jax.tree_util.tree_unflatten(treedef, new)


_random_params = jax.jit(random_params)


request_strategy = st.builds(
    lambda mode, lo, extra, answer_room, temperature, answer_t, top_k, top_p, seed, prompt: SamplingRequest(
        id="r", prompt_ids=prompt, mode=mode, m_min=lo, m_max=lo + extra, max_new_tokens=lo + extra + 2 + answer_room,
        temperature=temperature, answer_temperature=answer_t, top_k=top_k, top_p=top_p, seed=seed),
    mode=st.sampled_from(["trace", "trace_answer"]),
    lo=st.integers(0, 10), extra=st.integers(0, 6), answer_room=st.integers(0, 8),
    temperature=st.sampled_from([0.0, 0.7, 1.5]), answer_t=st.sampled_from([None, 0.0, 1.0]),
    top_k=st.sampled_from([0, 5]), top_p=st.sampled_from([1.0, 0.8]), seed=st.integers(0, 2**32 - 1),
    prompt=st.lists(st.integers(0, 639), min_size=1, max_size=32),
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_seed=st.integers(0, 2**31 - 1), std=st.sampled_from([0.02, 0.2, 0.6]),
       requests=st.lists(request_strategy, min_size=1, max_size=8))
@pytest.mark.slow
def test_trace_properties_over_random_models(sampler, model_seed, std, requests):
    random = sampler.with_model(nnx.merge(sampler.graphdef, _random_params(sampler.params, model_seed, std)))
    out = random.generate([r.prompt_ids for r in requests], requests, [r.budget() for r in requests])
    trace = sampler.trace
    for r, (tokens, stopped) in zip(requests, out):
        assert tokens[0] == trace.begin_id
        assert trace.end_id in tokens  # the budget always leaves room for the end
        end = tokens.index(trace.end_id)
        z, answer = tokens[1:end], tokens[end + 1:]
        assert r.m_min <= len(z) <= r.m_max
        assert set(z) <= set(trace.abstract_ids)
        if r.mode == "trace":
            assert answer == [] and stopped
        else:  # an answer follows, until end of turn or the budget
            assert len(tokens) <= r.max_new_tokens
            if stopped:
                assert answer and answer[-1] == EOS and EOS not in answer[:-1]
            else:
                assert len(tokens) == r.max_new_tokens and EOS not in answer
            if r.max_new_tokens > len(z) + 2:
                assert answer


# ---- the sampling distribution ------------------------------------------------------------------

def first_trace_token_samples(sampler, prompt, n, **kw):
    requests = [SamplingRequest(id=str(s), prompt_ids=prompt, mode="trace", m_min=1, m_max=1, seed=s, **kw)
                for s in range(n)]
    out = sampler.generate([prompt] * n, requests, [3] * n)
    assert all(tokens[0] == sampler.trace.begin_id and tokens[2] == sampler.trace.end_id for tokens, _ in out)
    return np.array([tokens[1] for tokens, _ in out])


def reference_allowed_logits(hf_model, prompt, vocab):
    """HF's logits for the first trace token, restricted to V_abs (m_min = 1 forbids the end)."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([[*prompt, vocab.begin_id]])).logits[0, -1].double().numpy()
    return logits[list(vocab.abstract_ids)]


def chi_square_pvalue(counts, probs, min_expected=5.0):
    """Pearson's test; categories expected below `min_expected` are pooled so the chi-square
    approximation holds."""
    from scipy import stats

    expected = probs * counts.sum()
    order = np.argsort(expected)
    k = int((expected < min_expected).sum())
    while 0 < k < len(order) and expected[order[:k]].sum() < min_expected:
        k += 1
    small, keep = order[:k], order[k:]
    obs, exp = counts[keep], expected[keep]
    if k:
        obs, exp = np.append(obs, counts[small].sum()), np.append(exp, expected[small].sum())
    return stats.chisquare(obs, exp).pvalue


ALPHA = 1e-3  # false-alarm rate of the distribution test (seeds are fixed: the outcome is deterministic)


def test_first_trace_token_follows_softmax_over_allowed_set(sampler, hf_model, vocab):
    prompt, temperature, n = [7, 31, 99, 250, 12], 0.7, 4000
    samples = first_trace_token_samples(sampler, prompt, n, temperature=temperature)
    index = {t: i for i, t in enumerate(vocab.abstract_ids)}
    assert set(samples.tolist()) <= set(index)  # only V_abs (end forbidden below m_min)
    counts = np.bincount([index[t] for t in samples], minlength=64)
    logits = reference_allowed_logits(hf_model, prompt, vocab)
    softmax = lambda z: np.exp(z - z.max()) / np.exp(z - z.max()).sum()  # noqa: E731
    probs = softmax(logits / temperature)
    assert probs.max() < 0.5 and (probs > 0.01).sum() > 10  # a distribution worth testing
    assert chi_square_pvalue(counts, probs) > ALPHA
    # The test has power: the same counts reject a wrong temperature and the uniform distribution.
    assert chi_square_pvalue(counts, softmax(logits / 1.0)) < ALPHA
    assert chi_square_pvalue(counts, np.full(64, 1 / 64)) < ALPHA


def test_top_k_and_top_p_keep_only_their_sets(sampler, hf_model, vocab):
    prompt = [7, 31, 99, 250, 12]
    logits = reference_allowed_logits(hf_model, prompt, vocab)
    ranked = np.array(vocab.abstract_ids)[np.argsort(-logits)]
    top3 = first_trace_token_samples(sampler, prompt, 300, temperature=1.0, top_k=3)
    assert set(top3.tolist()) == set(ranked[:3].tolist())
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    nucleus = int(np.searchsorted(np.cumsum(np.sort(probs)[::-1]), 0.5) + 1)  # smallest set with mass >= 0.5
    top_p = first_trace_token_samples(sampler, prompt, 300, temperature=1.0, top_p=0.5)
    assert set(top_p.tolist()) <= set(ranked[:nucleus].tolist())
    assert len(set(top_p.tolist())) > 1


# ---- seeds, sharding, compilation ---------------------------------------------------------------

def test_a_request_samples_the_same_in_any_batch(sampler):
    r = SamplingRequest(id="x", prompt_ids=[4, 5, 6], mode="trace_answer", m_min=2, m_max=6,
                        temperature=1.0, seed=123, max_new_tokens=20)
    others = [SamplingRequest(id=str(i), prompt_ids=list(range(3, 3 + 2 * i)), temperature=1.0, seed=i,
                              max_new_tokens=20) for i in range(1, 5)]
    alone = sampler.generate([r.prompt_ids], [r], [20])[0]
    batch = [*others[:2], r, *others[2:]]
    together = sampler.generate([x.prompt_ids for x in batch], batch, [20] * 5)[2]
    assert alone == together
    other_seed = dataclasses.replace(r, seed=124)
    assert sampler.generate([r.prompt_ids], [other_seed], [20])[0] != alone


@pytest.mark.slow
def test_sharded_batch_matches_single_device(model_dir, vocab, sampler):
    from abscot_jax.sharding import MeshConfig, make_mesh

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (host) devices; conftest sets XLA_FLAGS before jax starts")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = Sampler(load_hf(model_dir), trace=TraceTokens.of(vocab), eos_id=EOS, mesh=mesh, max_batch=8)
    assert sharded.params["embed"][...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 500, n).tolist() for n in (4, 9, 13)]
    requests = [SamplingRequest(id=str(i), prompt_ids=p, mode="trace_answer", m_min=2, m_max=5, max_new_tokens=16,
                                temperature=0.8, answer_temperature=0.0, seed=i) for i, p in enumerate(prompts)]
    assert sharded.generate(prompts, requests, [16] * 3) == sampler.generate(prompts, requests, [16] * 3)


# ---- layer weights: split before the loop, or indexed inside it ---------------------------------

@pytest.mark.slow
def test_weights_indexed_in_the_loop_match_hf_generate(model_dir, hf_model):
    indexed = Sampler(load_hf(model_dir), eos_id=EOS, split_layers=False, **BUCKETS)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 500, n).tolist() for n in (3, 11, 17, 6, 30)]
    ours = indexed.generate(prompts, [verbal(i, p, 24) for i, p in enumerate(prompts)], [24] * len(prompts))
    assert [tokens for tokens, _ in ours] == hf_greedy(hf_model, prompts, 24)


@pytest.mark.slow
def test_bf16_weights_on_cpu_are_converted_one_layer_at_a_time():
    """XLA:CPU runs bf16 dots in fp32, converting each weight. Indexed in the loop (the default for
    bf16 on CPU), one layer's conversion is live at a time: adding layers adds only their KV cache to
    the program's temporaries. Split before the loop, or with the conversions hoisted or scheduled
    together, each added layer adds at least its fp32 weights."""
    from abscot_jax.model.config import Qwen3Config
    from abscot_jax.model.qwen3 import Qwen3, projection_shapes

    batch, prompt, new = 2, 16, 16

    def config(layers):
        return Qwen3Config(vocab_size=1024, hidden_size=512, intermediate_size=2048, num_hidden_layers=layers,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                           param_dtype="bfloat16", compute_dtype="bfloat16")

    def temporaries(layers, split_layers=None):  # compiled for abstract shapes: nothing is allocated
        sampler = Sampler(nnx.eval_shape(lambda: Qwen3(config(layers), rngs=nnx.Rngs(0))), split_layers=split_layers)
        requests = [SamplingRequest(id=str(i), prompt_ids=[1]) for i in range(batch)]
        rows = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), Rows.build(requests, [new] * batch, EOS))
        tokens = jax.ShapeDtypeStruct((batch, prompt), jnp.int32)
        compiled = sampler._compiled.lower(sampler.params, tokens, tokens, tokens, rows, max_new=new,
                                           trace=sampler.trace).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    if jax.default_backend() != "cpu":
        pytest.skip("a property of XLA's CPU backend")
    cfg = config(1)
    layer_fp32 = 4 * sum(i * o for i, o in projection_shapes(cfg).values())
    kv_cache = 2 * batch * cfg.num_key_value_heads * cfg.head_dim * (prompt + new) * 2  # keys and values, bf16
    added = 8
    assert temporaries(4 + added) - temporaries(4) <= added * kv_cache + layer_fp32
    assert temporaries(4 + added, split_layers=True) - temporaries(4, split_layers=True) >= added * layer_fp32


def test_bucketing_bounds_the_number_of_programs(sampler):
    before = sampler._compiled._cache_size()
    for n in (2, 5, 9, 14, 31):  # prompt lengths 2..31 and budgets 1..30 share the (32, 32) bucket
        sampler.generate([list(range(3, 3 + n))], [verbal(0, list(range(3, 3 + n)), n - 1)], [n - 1])
    assert sampler._compiled._cache_size() - before <= 1
    assert [bucket(n, 16) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
