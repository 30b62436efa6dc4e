"""Engines behind one interface: the HF engine through the JSONL file protocol (another process)
against the JAX sampler, vLLM's request building (and vLLM itself where it is installed), bad
input, and the protocol files."""
from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

from abscot_jax.checkpoint.hf import load_hf
from abscot_jax.data.sequences import render_prompt
from abscot_jax.sampling.engines.__main__ import main
from abscot_jax.sampling.engines.jax import JaxEngine
from abscot_jax.sampling.engines.process import SubprocessEngine
from abscot_jax.sampling.engines.vllm import (
    VllmOptions, run_two_stage, vllm_answer_params, vllm_engine, vllm_trace_params,
)
from abscot_jax.vocab import abstract_vocab
from abscot_jax.sampling.protocol import (
    SamplingRequest, SamplingResult, make_result, read_requests, read_results, write_requests, write_results,
)

EOS = 2  # <|im_end|>


@pytest.fixture(scope="module")
def jax_engine(model_dir, tokenizer):
    # Fixed buckets: every call in this file runs one compiled program.
    return JaxEngine(load_hf(model_dir), tokenizer, max_batch=16, min_batch=16, min_prompt_bucket=64,
                       min_new_bucket=64)


def prompt_text(tokenizer, question, cot=None):
    x = render_prompt(tokenizer, [{"role": "user", "content": question}])
    return x if cot is None else x + cot  # Phase A conditions the trace on (x, c)


@pytest.fixture(scope="module")
def requests(tokenizer):
    R = SamplingRequest
    return [
        R(id="verbal", prompt=prompt_text(tokenizer, "what is the sum of 3 and 4"), max_new_tokens=24),
        R(id="verbal-ids", prompt_ids=[5, 77, 301, 12, 9, 40], max_new_tokens=30),
        R(id="phase-a", prompt=prompt_text(tokenizer, "find the total", "first add 3 then 4\nso 7"), mode="trace",
          m_min=2, m_max=6),
        R(id="phase-b", prompt=prompt_text(tokenizer, "find the total"), mode="trace", m_min=0, m_max=9),
        R(id="eval", prompt=prompt_text(tokenizer, "what is 12 times 3"), mode="trace_answer", m_min=3, m_max=8,
          max_new_tokens=40),
        R(id="eval-exact", prompt=prompt_text(tokenizer, "how many digits"), mode="trace_answer", m_min=5, m_max=5,
          max_new_tokens=20),
        R(id="empty", prompt=""),
        R(id="eval-sampled", prompt=prompt_text(tokenizer, "solve the problem"), mode="trace_answer", m_min=4,
          m_max=8, temperature=0.7, answer_temperature=0.0, seed=5, max_new_tokens=40),
        R(id="verbal-sampled", prompt_ids=[9, 8, 7, 6], temperature=1.0, top_k=20, top_p=0.9, seed=3,
          max_new_tokens=16),
    ]


@pytest.fixture(scope="module")
def jax_results(jax_engine, requests):
    return jax_engine.run_requests(requests)


@pytest.mark.slow
def test_jax_results_are_well_formed(jax_results, requests, tokenizer):
    by_id = {r.id: r for r in jax_results}
    assert [r.id for r in jax_results] == [r.id for r in requests]
    assert by_id["empty"].finish_reason == "error" and "empty prompt" in by_id["empty"].error
    for request, result in zip(requests, jax_results):
        if request.id == "empty":
            continue
        assert result.error is None and result.finish_reason in ("stop", "length")
        assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=False)
        if request.has_trace:
            assert request.m_min <= result.trace_length == len(result.trace_ids) <= request.m_max
    assert by_id["phase-a"].answer_ids == [] and by_id["phase-a"].finish_reason == "stop"
    assert by_id["eval-exact"].trace_length == 5
    eval_, vocab = by_id["eval"], abstract_vocab(tokenizer)
    assert eval_.token_ids[:eval_.trace_length + 2] == [vocab.begin_id, *eval_.trace_ids, vocab.end_id]
    assert eval_.answer_length == len(eval_.answer_ids) > 0


@pytest.mark.slow
def test_hf_engine_through_files_matches_jax(model_dir, requests, jax_results):
    """Another process, JSONL in and out, HF's model and cache: the same traces and answers."""
    hf_results = SubprocessEngine("hf", model_dir).run_requests(requests)
    assert [dataclasses.asdict(r) for r in hf_results] == [dataclasses.asdict(r) for r in jax_results]


# ---- vLLM -------------------------------------------------------------------------------------

def test_vllm_request_building(tokenizer):
    vocab = abstract_vocab(tokenizer)
    r = SamplingRequest(id="e", prompt="x", mode="trace_answer", m_min=16, m_max=128, temperature=0.7,
                        answer_temperature=0.0, top_k=0, seed=9, max_new_tokens=1024)
    trace = vllm_trace_params(r, vocab.abstract_ids, vocab.end_id, limit=1024)
    assert trace == {
        "n": 1, "temperature": 0.7, "top_p": 1.0, "top_k": -1, "seed": 9,
        "max_tokens": 128, "min_tokens": 16,  # end suppressed below m_min; at m_max we append it
        "allowed_token_ids": [*vocab.abstract_ids, vocab.end_id], "stop_token_ids": [vocab.end_id],
        "skip_special_tokens": False,
    }
    answer = vllm_answer_params(r, limit=1024 - 130, eos_id=EOS)
    assert answer["temperature"] == 0.0 and answer["max_tokens"] == 894
    assert answer["stop_token_ids"] == [EOS] and answer["ignore_eos"] is False
    custom = dataclasses.replace(r, stop_token_ids=[7])
    assert vllm_answer_params(custom, 10, EOS)["ignore_eos"] is True  # only the request's stops stop it
    small = vllm_trace_params(r, vocab.abstract_ids, vocab.end_id, limit=10)
    assert small["max_tokens"] == 9 and small["min_tokens"] == 9  # budget 10 = begin + 9


def test_vllm_engine_options_and_gpu_groups(tmp_path):
    options = VllmOptions(python="/opt/vllm/bin/python", tensor_parallel_size=2, data_parallel_size=2,
                            max_model_len=4096, enforce_eager=True)
    engine = vllm_engine(tmp_path, options)
    assert engine.python == "/opt/vllm/bin/python" and engine.shards == 2
    assert [env["CUDA_VISIBLE_DEVICES"] for env in engine.shard_env] == ["0,1", "2,3"]
    assert engine.args[:2] == ["--tensor-parallel-size", "2"] and "--enforce-eager" in engine.args
    assert options.llm_kwargs()["max_model_len"] == 4096
    with pytest.raises(ValueError, match="needs 4 GPUs"):
        vllm_engine(tmp_path, options, gpus=[0, 1])


def test_vllm_engine_takes_the_gpus_this_process_may_use(tmp_path, monkeypatch):
    options = VllmOptions(tensor_parallel_size=2, data_parallel_size=2, gpu_memory_utilization=0.6, dtype="bfloat16")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    engine = vllm_engine(tmp_path, options)
    assert [env["CUDA_VISIBLE_DEVICES"] for env in engine.shard_env] == ["4,5", "6,7"]
    assert engine.args[engine.args.index("--gpu-memory-utilization") + 1] == "0.6"
    assert engine.args[engine.args.index("--dtype") + 1] == "bfloat16"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(ValueError, match="needs 4 GPUs"):
        vllm_engine(tmp_path, options)


def fake_vllm(hf_model, eos_id, include_stop: bool):
    """vLLM's documented semantics of the SamplingParams we use, greedy, on HF's model:
    allowed_token_ids, min_tokens (stop tokens and eos suppressed), max_tokens, stop_token_ids,
    ignore_eos; finish_reason and stop_reason as vLLM reports them."""
    def generate(prompts, params):
        outs = []
        for prompt, p in zip(prompts, params):
            assert p["temperature"] == 0
            out, finish, reason = [], "length", None
            stops = set(p["stop_token_ids"]) | (set() if p.get("ignore_eos") else {eos_id})
            feed, past = list(prompt), None
            while len(out) < p["max_tokens"]:
                with torch.no_grad():
                    step = hf_model(torch.tensor([feed]), past_key_values=past, use_cache=True)
                logits, past = step.logits[0, -1].clone(), step.past_key_values
                if "allowed_token_ids" in p:
                    keep = torch.full_like(logits, -float("inf"))
                    keep[p["allowed_token_ids"]] = 0
                    logits += keep
                if len(out) < p.get("min_tokens", 0):
                    logits[list(stops)] = -float("inf")
                token = int(logits.argmax())
                out.append(token)
                feed = [token]
                if token in stops:
                    finish, reason = "stop", (token if token in p["stop_token_ids"] else None)
                    break
            if finish == "stop" and not include_stop:
                out = out[:-1]
            outs.append((out, finish, reason))
        return outs
    return generate


@pytest.mark.slow
@pytest.mark.parametrize("include_stop", [True, False])
def test_vllm_two_stage_logic_matches_jax(model_dir, tokenizer, requests, jax_results, include_stop):
    """The vLLM engine's stages, run on a stand-in with vLLM's semantics, give the sampler's greedy results."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    greedy = [i for i, r in enumerate(requests) if r.id != "empty" and r.temperature == 0 and r.answer_temp == 0]
    prompts = [tokenizer.encode(requests[i].prompt, add_special_tokens=False) if requests[i].prompt is not None
               else requests[i].prompt_ids for i in greedy]
    limits = [requests[i].budget() for i in greedy]
    outputs = run_two_stage(fake_vllm(hf_model, EOS, include_stop), [requests[i] for i in greedy], prompts,
                              limits, abstract_vocab(tokenizer), EOS)
    for i, (tokens, stopped) in zip(greedy, outputs):
        assert tokens == jax_results[i].token_ids, requests[i].id
        assert ("stop" if stopped else "length") == jax_results[i].finish_reason


def test_vllm_engine_runs_where_installed(model_dir, requests, jax_results):
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        pytest.skip(f"vllm is not importable in this environment ({e}); its request building and two-stage "
                    "logic are tested above")
    greedy = [i for i, r in enumerate(requests) if r.temperature == 0 and r.answer_temp == 0]
    options = VllmOptions(python=sys.executable, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3)
    results = vllm_engine(model_dir, options).run_requests([requests[i] for i in greedy])
    assert [r.token_ids for r in results] == [jax_results[i].token_ids for i in greedy]


# ---- bad input ----------------------------------------------------------------------------------

def test_bad_requests_fail_alone(jax_engine, tiny_hf_dir):
    R = SamplingRequest
    good = [R(id="good-1", prompt_ids=[11, 12, 13], max_new_tokens=8),
            R(id="good-2", prompt_ids=[21, 22], mode="trace_answer", m_min=1, m_max=4, max_new_tokens=12)]
    bad = {
        "empty-text": (R(id="empty-text", prompt=""), "empty prompt"),
        "empty-ids": (R(id="empty-ids", prompt_ids=[]), "empty prompt"),
        "too-long": (R(id="too-long", prompt_ids=[5] * 5000), "prompt has 5000 tokens but the context is 4096"),
        "id-too-big": (R(id="id-too-big", prompt_ids=[5, 640]), "token id 640 is outside the vocabulary [0, 640)"),
        "id-negative": (R(id="id-negative", prompt_ids=[-1, 5]), "token id -1 is outside the vocabulary"),
        "bad-bounds": (R(id="bad-bounds", prompt_ids=[5], mode="trace", m_min=9, m_max=3), "need 0 <= m_min <= m_max"),
        "bad-mode": (R(id="bad-mode", prompt_ids=[5], mode="chat"), "mode 'chat'"),
        "two-prompts": (R(id="two-prompts", prompt="a", prompt_ids=[5]), "exactly one of prompt"),
        "bad-stop": (R(id="bad-stop", prompt_ids=[5], stop_token_ids=[10**6]), "stop token id 1000000"),
        "bad-top-p": (R(id="bad-top-p", prompt_ids=[5], top_p=0.0), "top_p=0.0"),
        "wrong-type": (R(id="wrong-type", prompt_ids=[5], temperature="hot"), "wrong type"),
    }
    mixed = [good[0], *[r for r, _ in bad.values()], good[1]]
    results = {r.id: r for r in jax_engine.run_requests(mixed)}
    for name, (_, message) in bad.items():
        assert results[name].finish_reason == "error" and message in results[name].error, (name, results[name].error)
        assert results[name].token_ids == []
    alone = jax_engine.run_requests(good)
    assert [results[g.id] for g in good] == alone and all(r.error is None for r in alone)

    from transformers import AutoTokenizer

    plain = JaxEngine(load_hf(tiny_hf_dir), AutoTokenizer.from_pretrained(str(tiny_hf_dir)))
    [result] = plain.run_requests([R(id="no-vocab", prompt_ids=[5], mode="trace")])
    assert "needs the abstract tokens" in result.error


def test_cli_reports_malformed_lines_and_keeps_the_rest(model_dir, tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join([
        json.dumps({"id": "ok", "prompt_ids": [5, 6, 7], "max_new_tokens": 4}),
        "{not json",
        json.dumps({"id": "typo", "prompt_ids": [5], "temprature": 0.5}),
        json.dumps([1, 2]),
    ]) + "\n")
    out = tmp_path / "results.jsonl"
    assert main(["--engine", "hf", "--model", str(model_dir), "--requests", str(requests), "--out", str(out)]) == 0
    results = read_results(out)
    assert [r.id for r in results] == ["ok", "line-2", "typo", "line-4"]
    assert results[0].error is None and len(results[0].token_ids) == 4
    assert "invalid JSON" in results[1].error and "requests.jsonl:2" in results[1].error
    assert "unknown field(s) ['temprature']" in results[2].error
    assert "not a JSON object" in results[3].error


def test_cli_bad_model_dir_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "r.jsonl").write_text("")
    code = main(["--engine", "hf", "--model", str(tmp_path / "nope"), "--requests", str(tmp_path / "r.jsonl"),
                   "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "not a model directory" in err and "\n" not in err


def test_failed_process_fails_its_requests_with_the_reason(tmp_path):
    engine = SubprocessEngine("hf", tmp_path, python=sys.executable, args=["--no-such-flag"])
    results = engine.run_requests([SamplingRequest(id="a", prompt_ids=[1]), SamplingRequest(id="b", prompt_ids=[2])])
    assert [r.id for r in results] == ["a", "b"]
    assert all(r.finish_reason == "error" and "exited with 2" in r.error and "no-such-flag" in r.error
               for r in results)
    missing = vllm_engine(tmp_path, VllmOptions(python=str(tmp_path / "no-python")))
    [result] = missing.run_requests([SamplingRequest(id="c", prompt_ids=[1])])
    assert "cannot start" in result.error and "no-python" in result.error


# ---- protocol files -------------------------------------------------------------------------------

def test_protocol_files_round_trip(tmp_path):
    reqs = [SamplingRequest(id="1", prompt="hi", mode="trace_answer", temperature=0.7, answer_temperature=0.0),
            SamplingRequest(id="2", prompt_ids=[1, 2, 3], stop_token_ids=[7, 8])]
    write_requests(tmp_path / "r.jsonl", reqs)
    assert read_requests(tmp_path / "r.jsonl") == reqs
    res = [SamplingResult(id="1", token_ids=[1, 2], text="ab", finish_reason="stop"),
           SamplingResult.failure("2", "bad")]
    write_results(tmp_path / "o.jsonl", res)
    assert read_results(tmp_path / "o.jsonl") == res
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl", "r.jsonl"]  # no temporary left behind


def test_make_result_splits_trace_and_answer():
    r = SamplingRequest(id="x", prompt_ids=[1], mode="trace_answer")
    result = make_result(r, [76, 10, 11, 77, 5, 6, EOS], "stop", None, begin_id=76, end_id=77, eos_id=EOS)
    assert (result.trace_ids, result.answer_ids, result.trace_length, result.answer_length) == ([10, 11], [5, 6], 2, 2)
    cut = make_result(r, [76, 10, 11], "length", None, begin_id=76, end_id=77, eos_id=EOS)
    assert (cut.trace_ids, cut.answer_ids, cut.finish_reason) == ([10, 11], [], "length")
    verbal = make_result(SamplingRequest(id="v", prompt_ids=[1]), [5, 6, EOS], "stop", None, 76, 77, EOS)
    assert verbal.answer_ids == [5, 6] and verbal.token_ids == [5, 6, EOS]


def test_an_out_of_process_engine_refuses_to_start_while_jax_holds_an_accelerator(monkeypatch, tmp_path):
    """XLA keeps most of each device's memory until its process ends: a vLLM started beside it
    could not get the GPUs, so the engine stops before starting its process."""
    from jax._src import xla_bridge


    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    monkeypatch.setattr(xla_bridge, "backends", lambda: {"cpu": None, "cuda": None})
    engine = SubprocessEngine("vllm", tmp_path, python=str(tmp_path / "never_started"))
    with pytest.raises(RuntimeError, match="this process holds JAX cuda devices"):
        engine.run_requests([])
    monkeypatch.setattr(xla_bridge, "backends", lambda: {"cpu": None})
    assert engine.run_requests([]) == []  # the CPU backend holds no accelerator
