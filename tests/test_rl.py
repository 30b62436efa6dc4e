"""GRPO (abscot_jax/rl): advantages and the clipped loss against hand-computed values, the rollout
policy's log-probs against a dense forward, zero gradients without signal, the reference policy,
rewards (the judge behind a local HTTP server that fails some calls), data skips and bad input."""
from __future__ import annotations

import http.server
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from abscot_jax.checkpoint.hf import load_hf
from abscot_jax import rounds
from abscot_jax.config import RLSection, load_config
from abscot_jax.data.roles import Role
from abscot_jax.data.toy import write_toy_data
from abscot_jax.errors import ConfigError, RunError
from abscot_jax.files import replace_json
from abscot_jax.fixtures import make_checkpoint
from abscot_jax.model.lora import LoRAConfig, apply_lora
from abscot_jax.rl.data import PromptStream, RLPrompt, load_rl_prompts
from abscot_jax.rl.grpo import (FREE, TRACE_ONLY, TRACE_OR_END, clipped_objective, group_advantages,
                                token_logprobs, uninformative_groups)
from abscot_jax.rl.loop import RolloutStep, rollout_sampler, sample
from abscot_jax.rl.rewards import Judge, make_reward, toy_correct
from abscot_jax.rl.rollouts import Rollout, packed_rollouts, rollout_example, rollout_requests, rollout_seed
from abscot_jax.rl.trainer import PolicyTrainer, reference_params
from abscot_jax.sampling.protocol import SamplingResult
from abscot_jax.sampling.sampler import TraceTokens
from abscot_jax.report import load_run, render_markdown
from abscot_jax.sharding import MeshConfig, make_mesh
from abscot_jax.train.__main__ import main as train_main
from abscot_jax.vocab import abstract_vocab


# ---- advantages and the clipped loss ----------------------------------------------------------

def test_group_advantages_use_the_population_std_and_skip_missing_rewards():
    nan = float("nan")
    rewards = np.array([[1.0, 0.0, 0.0, 1.0],  # mean 1/2, population std 1/2
                        [0.5, 0.5, 0.5, nan],  # no spread: no signal
                        [1.0, nan, 0.0, 0.0]])  # scored: 1, 0, 0: mean 1/3, std sqrt(2/9)
    eps = 1e-4
    s = math.sqrt(2 / 9)
    expected = [[0.5 / (0.5 + eps), -0.5 / (0.5 + eps), -0.5 / (0.5 + eps), 0.5 / (0.5 + eps)],
                [0.0, 0.0, 0.0, 0.0],
                [(2 / 3) / (s + eps), 0.0, (-1 / 3) / (s + eps), (-1 / 3) / (s + eps)]]
    np.testing.assert_allclose(group_advantages(rewards, eps), expected, rtol=1e-12)
    assert uninformative_groups(rewards) == pytest.approx(1 / 3)
    assert uninformative_groups(np.array([[nan, nan], [1.0, 1.0], [0.0, 1.0]])) == pytest.approx(2 / 3)


def test_clipped_objective_matches_hand_computed_values():
    # Four tokens of one rollout row; the last has no weight and values that would overflow exp().
    logp = np.array([[-1.0, -2.0, -0.5, -50.0]], np.float32)
    old = np.array([[-1.2, -1.5, -0.5, 0.0]], np.float32)
    ref = np.array([[-1.1, -2.0, -0.3, 60.0]], np.float32)
    adv = np.array([[2.0, 2.0, -1.0, 3.0]], np.float32)
    w = np.array([[1.0, 1.0, 1.0, 0.0]], np.float32)
    eps, beta = 0.2, 0.5
    # token 1: ratio e^0.2 = 1.2214 > 1.2, A > 0: the clipped surrogate 1.2 * 2 is the smaller
    pg1 = -min(math.exp(0.2) * 2, 1.2 * 2)
    # token 2: ratio e^-0.5 = 0.6065 < 0.8, A > 0: the unclipped 0.6065 * 2 is the smaller
    pg2 = -min(math.exp(-0.5) * 2, 0.8 * 2)
    pg3 = 1.0  # ratio 1, A = -1
    kl1 = math.exp(-0.1) + 0.1 - 1  # ref - logp = -0.1
    kl2 = 0.0
    kl3 = math.exp(0.2) - 0.2 - 1
    sums = {k: float(v) for k, v in clipped_objective(logp, old, ref, adv, w, clip_eps=eps, kl_weight=beta).items()}
    assert sums["pg"] == pytest.approx(pg1 + pg2 + pg3, rel=1e-6)
    assert sums["kl"] == pytest.approx(kl1 + kl2 + kl3, rel=1e-5)
    assert sums["loss"] == pytest.approx(pg1 + pg2 + pg3 + beta * (kl1 + kl2 + kl3), rel=1e-6)
    assert sums["weight"] == 3.0
    assert sums["clipped"] == 2.0  # tokens 1 and 2 lie outside [0.8, 1.2]


# ---- rollouts as training rows ----------------------------------------------------------------

BEGIN, END, EOS = 100, 101, 2
A1, A2, A3 = 90, 91, 92


def test_rollout_example_weights_sampled_tokens_and_marks_the_constraint():
    result = SamplingResult("r", token_ids=[BEGIN, A1, A2, A3, END, 7, 8, EOS], trace_ids=[A1, A2, A3], trace_length=3,
                            finish_reason="stop")
    example, allowed = rollout_example([5, 6, 4], result, abstract=True, m_min=2, m_max=3, example_id="r")
    P, Z, Y = Role.PROMPT, Role.ABSTRACT, Role.ANSWER
    assert example.roles.tolist() == [P, P, P, Z, Z, Z, Z, Z, Y, Y, Y]
    assert example.targets[:-1].tolist() == [6, 4, BEGIN, A1, A2, A3, END, 7, 8, EOS]
    # `<beginabstract>` (predicted at position 2) and `<endabstract>` after m_max = 3 tokens are forced
    assert example.loss_mask.tolist() == [0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0]
    # 0 and 1 trace tokens before: below m_min, only abstract tokens; 2: `<endabstract>` allowed too
    assert allowed.tolist() == [FREE] * 3 + [TRACE_ONLY, TRACE_ONLY, TRACE_OR_END] + [FREE] * 5

    cut = SamplingResult("c", token_ids=[BEGIN, A1, A2], trace_ids=[A1, A2], trace_length=2, finish_reason="length")
    example, allowed = rollout_example([5, 6], cut, abstract=True, m_min=1, m_max=8, example_id="c")
    assert example.roles.tolist() == [P, P, Z, Z, Z]
    assert example.loss_mask.tolist() == [0, 0, 1, 1, 0]
    assert allowed.tolist() == [FREE, FREE, TRACE_ONLY, TRACE_OR_END, FREE]

    verbal = SamplingResult("v", token_ids=[7, 8, EOS], finish_reason="stop")
    example, allowed = rollout_example([5, 6], verbal, abstract=False, m_min=1, m_max=8, example_id="v")
    assert example.roles.tolist() == [P, P, Y, Y, Y] and example.loss_mask.tolist() == [0, 1, 1, 1, 0]
    assert allowed.tolist() == [FREE] * 5


def test_rollout_seeds_are_fixed_by_seed_step_prompt_and_k():
    seeds = {rollout_seed(0, step, slot, "p", k) for step in range(3) for slot in range(3) for k in range(4)}
    assert len(seeds) == 36
    assert rollout_seed(0, 1, 2, "p", 3) == rollout_seed(0, 1, 2, "p", 3) != rollout_seed(1, 1, 2, "p", 3)
    stream, again = PromptStream(5, seed=3), PromptStream(5, seed=3)
    first = stream.take(7)  # an epoch (a permutation) and the start of the next
    assert sorted(first[:5]) == list(range(5))
    again.set_state(stream.get_state())
    assert again.take(4) == stream.take(4)


# ---- the policy's log-probs and the trainer -----------------------------------------------------

@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    return write_toy_data(tmp_path_factory.mktemp("rl_toy"), train_size=12, eval_size=3, min_digits=3, max_digits=4)


def rl_config(toy_files, *overrides):
    train, evaluation = toy_files
    return load_config(None, [f"data.train={train}", f"data.eval={evaluation}", "train.seq_len=96",
                              "train.batch_size=2", "train.loss_chunk=16", "rl.reward=toy", "rl.prompts_per_step=2",
                              "rl.rollouts_per_prompt=3", "rl.max_new_tokens=20", "rl.temperature=0.8",
                              "eval.m_min=2", "data.m_max=6", "rl.learning_rate=1e-2", *overrides])


@pytest.fixture(scope="module")
def one_device():
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def rollout_batches(model_dir, tokenizer, toy_files):
    """Rollouts of the fixture model for four prompts (abstract mode), as packed batches."""
    cfg = rl_config(toy_files)
    prompts, _ = load_rl_prompts(cfg, tokenizer, make_reward(cfg.rl))
    requests = rollout_requests(prompts[:4], 0, cfg)
    results = sample(rollout_sampler(load_hf(model_dir), tokenizer, cfg.rl, mesh=None), requests, tokenizer)
    assert {r.finish_reason for r in results} <= {"stop", "length"} and all(r.trace_length >= 2 for r in results)
    rollouts = [Rollout(*rollout_example(prompts[i // 3].prompt_ids, r, abstract=True, m_min=2, m_max=6, example_id=r.id),
                        advantage=float(i % 3) - 1.0) for i, r in enumerate(results)]
    return packed_rollouts(rollouts, cfg.train.seq_len, cfg.train.batch_size)


@pytest.mark.slow
def test_token_logprobs_match_a_dense_forward_under_the_constraint(model_dir, tokenizer, rollout_batches):
    model, vocab = load_hf(model_dir), abstract_vocab(tokenizer)
    temperature = 0.8
    policy_logprobs = jax.jit(lambda m, b: token_logprobs(m, b, temperature=temperature, chunk=16,
                                                         abstract_ids=vocab.abstract_ids, end_id=vocab.end_id))
    for batch in rollout_batches:
        logp, entropy = policy_logprobs(model, batch)
        logits = np.asarray(model(batch["tokens"], batch["positions"], batch["segment_ids"], batch["roles"]),
                            np.float64) / temperature
        allowed = np.ones(logits.shape, bool)
        trace = np.zeros(logits.shape[-1], bool)
        trace[list(vocab.abstract_ids)] = True
        allowed[batch["allowed"] == TRACE_ONLY] = trace
        allowed[batch["allowed"] == TRACE_OR_END] = trace | (np.arange(logits.shape[-1]) == vocab.end_id)
        masked = np.where(allowed, logits, -np.inf)
        shift = masked.max(-1, keepdims=True)
        log_probs = masked - shift - np.log(np.exp(masked - shift).sum(-1, keepdims=True))
        expected = np.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
        expected_entropy = -np.sum(np.exp(log_probs) * np.where(allowed, log_probs, 0), axis=-1)
        on = batch["weights"] > 0
        assert on.sum() > 0 and (batch["allowed"][on] != FREE).sum() > 0
        np.testing.assert_allclose(np.asarray(logp)[on], expected[on], atol=2e-5)
        np.testing.assert_allclose(np.asarray(entropy)[on], expected_entropy[on], atol=2e-5)


def zero_advantages(batches):
    return [{**b, "advantages": np.zeros_like(b["advantages"])} for b in batches]


def params_of(trainer):
    return [np.asarray(x) for x in jax.tree.leaves(trainer.trainable())]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_no_advantage_no_kl_means_an_exactly_zero_gradient(model_dir, tokenizer, toy_files, rollout_batches, one_device,
                                                            mode):
    vocab = abstract_vocab(tokenizer)
    trainer = PolicyTrainer(lora_model(model_dir, vocab) if mode == "lora" else load_hf(model_dir),
                            rl_config(toy_files, f"train.mode={mode}", "rl.kl_weight=0"), 4, one_device,
                            TraceTokens.of(vocab))
    before = params_of(trainer)
    figures = trainer.step(zero_advantages(rollout_batches), updates=1)
    assert figures["grad_norm"] == 0.0 and figures["tokens"] > 0
    for old, new in zip(before, params_of(trainer)):
        np.testing.assert_array_equal(old, new)
    figures = trainer.step(rollout_batches, updates=1)  # the same rollouts with advantages: they train
    assert figures["grad_norm"] > 0
    assert any(not np.array_equal(old, new) for old, new in zip(before, params_of(trainer)))


def lora_model(model_dir, vocab):
    model = load_hf(model_dir)
    return apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "up_proj")),
                      new_token_start=min(vocab.all_new_ids), num_new_tokens=len(vocab.all_new_ids))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_kl_is_zero_at_the_reference_weights_and_grows_after_updates(model_dir, tokenizer, toy_files,
                                                                      rollout_batches, one_device, mode):
    vocab = abstract_vocab(tokenizer)
    model = lora_model(model_dir, vocab) if mode == "lora" else load_hf(model_dir)
    trainer = PolicyTrainer(model, rl_config(toy_files, f"train.mode={mode}", "rl.kl_weight=0.1"), 8, one_device,
                            TraceTokens.of(vocab))
    at_start = trainer.step(zero_advantages(rollout_batches), updates=1)
    assert at_start["kl"] == 0.0 and at_start["grad_norm"] == 0.0  # the KL's gradient vanishes there too
    for _ in range(2):
        trainer.step(rollout_batches, updates=2)
    assert trainer.step(rollout_batches, updates=1)["kl"] > 0


@pytest.mark.slow
def test_lora_reference_is_the_base_with_adapters_off(model_dir, tokenizer, rollout_batches):
    vocab = abstract_vocab(tokenizer)
    batch = rollout_batches[0]
    inputs = (batch["tokens"], batch["positions"], batch["segment_ids"], batch["roles"])
    base_logits = np.asarray(load_hf(model_dir)(*inputs))
    model = lora_model(model_dir, vocab)
    trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                           nnx.state(model, nnx.LoRAParam))
    nnx.update(model, trained)  # adapters and new-token rows as after training: the logits move
    assert not np.allclose(np.asarray(model(*inputs)), base_logits, atol=1e-3)
    adapters_off, copied = reference_params(model, nnx.LoRAParam)
    assert not jax.tree.leaves(copied)  # no copy of anything in LoRA mode
    reference = nnx.merge(*nnx.split(model))
    nnx.update(reference, adapters_off, copied)
    np.testing.assert_array_equal(np.asarray(reference(*inputs)), base_logits)


# ---- rewards ----------------------------------------------------------------------------------

class JudgeServer:
    """An OpenAI-style chat-completions endpoint on localhost. The response under review decides:
    FAIL -> HTTP 500 always; GARBAGE -> a reply without a score; FLAKY -> 500 on its first call,
    then 7; ALTERNATE -> every other call fails; anything else -> "Score: 8"."""

    def __init__(self):
        self.calls, self.lock = [], threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][-1]["content"]
                with server.lock:
                    server.calls.append(text)
                    seen, count = server.calls.count(text), len(server.calls)
                if "FAIL" in text or ("FLAKY" in text and seen == 1) or ("ALTERNATE" in text and count % 2):
                    self.send_response(500)
                    self.end_headers()
                    return
                content = "I cannot grade this" if "GARBAGE" in text else "7" if "FLAKY" in text else "Score: 8"
                reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/chat/completions"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def judge_server():
    server = JudgeServer()
    yield server
    server.close()


def test_judge_failures_are_counted_and_dropped_never_scored_zero(judge_server):
    judge = Judge(judge_server.url, "judge-model", timeout=5, retries=1, pause=0)
    prompts = [RLPrompt(f"p{i}", "What is 1 + 2?", "3", ()) for i in range(4)]
    outcomes = judge.score(prompts, ["It is \\boxed{3}", "FAIL \\boxed{3}", "GARBAGE", "FLAKY \\boxed{4}"])
    assert [o.reward for o in outcomes] == [0.8, None, None, 0.7]
    assert [o.correct for o in outcomes] == [True, True, False, False]
    assert judge.failures == 2 and "no score" in judge.last_error
    assert len(judge_server.calls) == 1 + 2 + 2 + 2  # each failed call retried once


@pytest.mark.slow
def test_a_step_trains_only_on_rollouts_the_judge_scored(model_dir, tokenizer, toy_files, judge_server):
    cfg = rl_config(toy_files, "rl.reward=judge", f"rl.judge_url={judge_server.url}", "rl.judge_model=m",
                    "rl.judge_retries=0", "rl.judge_concurrency=1", "rl.rollouts_per_prompt=2")
    prompts, _ = load_rl_prompts(cfg, tokenizer, make_reward(cfg.rl))
    judge = make_reward(cfg.rl)
    judge.messages = lambda question, gold, answer: [{"role": "user", "content": f"ALTERNATE {answer}"}]

    class Recorder:  # the trainer's interface, recording what it is given
        def model(self):
            return load_hf(model_dir)

        def step(self, batches, updates):
            self.batches = batches
            return {}

    trainer = Recorder()
    sampler = rollout_sampler(load_hf(model_dir), tokenizer, cfg.rl, mesh=None)
    record = RolloutStep(sampler, trainer, judge, cfg, tokenizer)(0, prompts[:2])
    assert record["reward_failures"] == 2 == judge.failures  # calls 1 and 3 of 4 failed
    assert record["reward"] == pytest.approx(0.8)
    trained = sum(len(set(row[row > 0].tolist())) for b in trainer.batches for row in b["segment_ids"])
    assert trained == 2  # packed rollouts: one segment each


def test_toy_reward_checks_the_running_sum_of_the_question():
    assert toy_correct("Running sum mod 10 of: 7 5 9", "so \\boxed{1}")  # 7 + 5 + 9 = 21
    assert not toy_correct("Running sum mod 10 of: 7 5 9", "\\boxed{2}")
    assert not toy_correct("Running sum mod 10 of: 7 5 9", "1")  # no box
    reward = make_reward(load_config(None, ["rl.reward=toy"]).rl)
    assert reward.skip_reason(RLPrompt("x", "What is 2 + 2?", "4", ())) == "not_a_toy_problem"


# ---- data and bad input -----------------------------------------------------------------------

def test_rows_without_a_gold_answer_or_in_the_eval_set_are_skipped_and_counted(tmp_path, tokenizer, toy_files):
    train, evaluation = toy_files
    held_out = json.loads(evaluation.read_text().splitlines()[0])["problem"]

    def row(i, question, answer):
        return {"id": f"r{i}", "messages": [{"role": "user", "content": question},
                                            {"role": "assistant", "content": f"<think>\nsteps\n</think>\n\n{answer}"}]}

    rows = [row(0, "Running sum mod 10 of: 1 2", "\\boxed{3}"), row(1, "Running sum mod 10 of: 3 3", "six, unboxed"),
            row(2, held_out, "\\boxed{0}"), row(3, "What is 2 + 2?", "\\boxed{4}"), {"id": "r4", "messages": "oops"},
            row(5, "Running sum mod 10 of: " + " ".join(["9"] * 60), "\\boxed{0}")]
    path = tmp_path / "rl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"rl.data={path}", f"data.eval={evaluation}", "rl.reward=toy", "rl.prompts_per_step=1",
                             "train.seq_len=64", "rl.max_new_tokens=16"])
    prompts, skipped = load_rl_prompts(cfg, tokenizer, make_reward(cfg.rl))
    assert [(p.id, p.gold) for p in prompts] == [("r0", "3")]
    assert dict(skipped) == {"no_gold_answer": 1, "in_eval_set": 1, "not_a_toy_problem": 1, "bad_messages": 1,
                             "too_long": 1}

    def limited(tokens):  # rl.max_prompt_tokens keeps a prompt of that many tokens, not one more
        return load_config(None, [f"rl.data={path}", f"data.eval={evaluation}", "rl.reward=toy", "rl.prompts_per_step=1",
                                  "train.seq_len=64", "rl.max_new_tokens=16", f"rl.max_prompt_tokens={tokens}"])
    length = len(prompts[0].prompt_ids)
    prompts, skipped = load_rl_prompts(limited(length), tokenizer, make_reward(cfg.rl))
    assert [p.id for p in prompts] == ["r0"] and skipped["too_long"] == 1
    with pytest.raises(RunError, match=r"0 usable RL prompts .*too_long=2"):
        load_rl_prompts(limited(length - 1), tokenizer, make_reward(cfg.rl))
    math_rows = tmp_path / "math.jsonl"
    math_rows.write_text(json.dumps({"problem": "1 + 1?", "answer": "2"}) + "\n" + json.dumps({"problem": "2 + 2?"}) + "\n")
    cfg = load_config(None, [f"rl.data={math_rows}", "rl.data_format=math", f"data.eval={evaluation}",
                             "rl.prompts_per_step=2", "train.seq_len=64", "rl.max_new_tokens=16"])
    with pytest.raises(RunError, match=r"1 usable RL prompts .*missing answer=1.*rl.prompts_per_step=2"):
        load_rl_prompts(cfg, tokenizer, make_reward(cfg.rl))


@pytest.mark.parametrize("setting, message", [
    ("rl.rollouts_per_prompt=1", "rl.rollouts_per_prompt=1 gives no group"),
    ("rl.reward=bleu", "rl.reward='bleu' is not a reward; use one of math_verify, toy, judge"),
    ("rl.reward=judge", "rl.reward=judge needs rl.judge_url"),
])
def test_bad_rl_settings_give_one_line(tmp_path, capsys, setting, message):
    config = tmp_path / "run.yaml"
    config.write_text(f"run_dir: {tmp_path}\n")
    assert train_main(["--config", str(config), "--stage", "rl", "--set", setting]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_an_unknown_reward_name_is_a_config_error():
    with pytest.raises(ConfigError, match="rl.reward='bleu' is not a reward; use one of math_verify, toy, judge"):
        make_reward(RLSection(reward="bleu"))


def test_a_judge_that_does_not_answer_stops_the_stage_with_one_line():
    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = Judge(f"http://127.0.0.1:{port}/v1/chat/completions", "m", timeout=2, retries=1, pause=0)
    with pytest.raises(RunError) as refused:
        judge.check()
    assert "\n" not in str(refused.value) and f"rl.judge_url=http://127.0.0.1:{port}" in str(refused.value)
    assert "after 2 attempt(s)" in str(refused.value) and "start the judge server" in str(refused.value)
    with socket.socket() as silent:  # accepts connections, never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        judge = Judge(f"http://127.0.0.1:{silent.getsockname()[1]}/v1", "m", timeout=0.3, retries=0)
        with pytest.raises(RunError, match=r"after 1 attempt\(s\) \(.*timed out"):
            judge.check()


# ---- the stage in the ledger --------------------------------------------------------------------

def test_the_rl_stage_runs_after_the_last_round_or_alone(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(rounds.Ledger, "run", lambda self, stage: ran.append(stage.key) or {})
    monkeypatch.setattr(rounds.Ledger, "report", lambda self: None)

    def keys(settings, which, stages=rounds.ROUND_STAGES):
        ran.clear()
        rounds.run(load_config(None, [f"run_dir={tmp_path}", "rounds=2", "eval.baselines=[]", *settings]), which, stages)
        return ran[:]

    assert not {"rl", "rl_eval"} & set(keys([], [1, 2]))
    assert keys(["rl.enabled=true"], [1, 2])[-2:] == ["rl", "rl_eval"]
    assert "rl" not in keys(["rl.enabled=true"], [1])  # round 2 has not run
    assert "rl" not in keys(["rl.enabled=true"], [1, 2], ("eval",))
    assert keys([], [], ("rl",)) == ["prepare_base", "rl", "rl_eval"]
    assert keys([], [], ("rl_eval",)) == ["prepare_base", "rl_eval"]
    abstract = rounds.find_stage(load_config(None, ["rounds=2"]), "rl")
    assert abstract.reads == ("round_2/model_b",) and abstract.writes == ("rl/model",)
    verbal = rounds.find_stage(load_config(None, ["rl.mode=verbal", "data.warmup_examples=8"]), "rl")
    assert verbal.reads == ("warmup/model",) and verbal.checkpoints == "rl/checkpoints"
    evaluation = rounds.find_stage(load_config(None, ["sampler.engine=vllm", "sampler.python=/bin/python"]), "rl_eval")
    assert evaluation.reads == ("rl/model",) and evaluation.writes == ("rl/eval/summary.json",)
    assert not evaluation.accelerator  # an engine in another process has the GPUs


def test_rl_settings_may_change_until_the_rl_stage_has_run(tmp_path):
    def ledger(*settings):
        return rounds.Ledger(load_config(None, [f"run_dir={tmp_path}", "name=r", *settings]))

    first = ledger("rl.steps=5")
    first.state["done"]["prepare_base"] = {}
    replace_json(first.state_path, first.state)
    ledger("rl.steps=6", "rl.kl_weight=0.1")  # finished stages do not depend on rl settings
    with pytest.raises(RunError, match="train.seq_len: 1024 -> 512"):
        ledger("rl.steps=6", "train.seq_len=512")
    second = ledger("rl.steps=6")
    second.state["done"]["rl"] = {}
    replace_json(second.state_path, second.state)
    with pytest.raises(RunError, match="rl.steps: 6 -> 7"):
        ledger("rl.steps=7")


def test_the_report_shows_the_rl_stage(tmp_path):
    state = {"config": {"name": "r", "rounds": 1}, "done": {"rl": {
        "mode": "abstract", "reward": "toy", "steps": 20, "first_reward": 0.125, "final_reward": 0.25,
        "first_accuracy": 0.125, "final_accuracy": 0.25, "final_kl": 0.0123}}}
    (tmp_path / "state.json").write_text(json.dumps(state))
    text = render_markdown(load_run(tmp_path))
    assert "| abstract | toy | 20 | 0.1250 -> 0.2500 | 12.5% -> 25.0% | 0.0123 |" in text


# ---- the stage: resume after SIGKILL ------------------------------------------------------------

# The stage process, SIGKILLed right after its third optimizer step (a checkpoint came after the
# second), once: a marker beside the run directory says it happened.
KILLING_STAGE = """
import os, signal, sys
from pathlib import Path
from abscot_jax.rl import trainer
step, steps_done = trainer.PolicyTrainer.step, []
def killing_step(self, batches, updates):
    out = step(self, batches, updates)
    steps_done.append(1)
    marker = Path(sys.argv[1]).parent / "killed"
    if len(steps_done) == 3 and not marker.exists():
        marker.write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)
    return out
trainer.PolicyTrainer.step = killing_step
from abscot_jax.stages.__main__ import main
sys.exit(main(sys.argv[1:3]))
"""
# The train command with KILLING_STAGE as its stage process.
KILLING_LEDGER = f"""
import sys
from abscot_jax import rounds
rounds.STAGE_COMMAND = [sys.executable, "-c", {KILLING_STAGE!r}]
from abscot_jax.train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def train_command(config, run_root, *, killing=False):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "JAX_COMPILATION_CACHE_DIR": str(Path(run_root).parent / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    head = ["-c", KILLING_LEDGER] if killing else ["-m", "abscot_jax.train"]
    return subprocess.run([sys.executable, *head, "--config", str(config), "--stage", "rl", "--set", f"run_dir={run_root}"],
                          env=env, capture_output=True, text=True, timeout=900)


def safetensors_bytes(model_dir: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(model_dir.glob("*.safetensors"))]


def tiny_rl_config(tmp_path, toy_files) -> Path:
    make_checkpoint(tmp_path / "fixture", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1)
    train, evaluation = toy_files
    config = tmp_path / "rl.yaml"
    config.write_text(yaml.safe_dump({
        "name": "rl", "rounds": 1, "model": {"hf_dir": str(tmp_path / "fixture")},
        "train": {"mode": "full", "seq_len": 96, "batch_size": 2, "loss_chunk": 32},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "data": {"train": str(train), "eval": str(evaluation), "m_max": 6},
        "eval": {"baselines": [], "m_min": 2, "max_new_tokens": 16},
        # Random weights score 0 with the toy check: the length penalty gives the advantages a spread.
        "rl": {"mode": "abstract", "reward": "toy", "prompts_per_step": 2, "rollouts_per_prompt": 3, "steps": 4,
               "updates_per_step": 2, "learning_rate": 1e-2, "length_penalty": 0.5, "max_new_tokens": 16,
               "rollout_batch": 4, "checkpoint_every": 2}}))
    return config


def run_ready_for_rl(config: Path, root: Path) -> Path:
    """`--stage rl` on a fresh run stops for want of round 1's model; with the base model in its
    place (as if round 1 had run) the run directory is ready for the rl stage."""
    missing = train_command(config, root)
    assert missing.returncode == 2, missing.stderr[-3000:]
    assert missing.stderr.strip().splitlines()[-1] == (
        "error: stage rl needs round_1/model_b, which is not there; run the stages before it first")
    shutil.copytree(root / "rl" / "base", root / "rl" / "round_1" / "model_b")
    return root / "rl"


@pytest.mark.slow
def test_the_rl_stage_refuses_several_processes_with_one_line(tmp_path, toy_files):
    """Two JAX processes over localhost start the rl stage: each stops with one error line before
    it samples (its rollouts are read on one host)."""
    run = run_ready_for_rl(tiny_rl_config(tmp_path, toy_files), tmp_path / "runs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "abscot_jax.stages", str(run), "rl"], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
                                   "ABSCOT_COORDINATOR": f"127.0.0.1:{port}", "ABSCOT_NUM_PROCESSES": "2",
                                   "ABSCOT_PROCESS_ID": str(i)}) for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-3000:]
        assert err.strip().splitlines()[-1].startswith("error: the rl stage runs in one process"), err[-3000:]
    assert not (run / "rl").exists()


@pytest.mark.slow
def test_rl_stage_resumed_after_sigkill_ends_with_the_same_weights(tmp_path, toy_files):
    """`--stage rl` (abstract mode) through the ledger: the stage needs the last round's model; run,
    it prints the reward at its first and last step; SIGKILLed after step 3 of 4 and rerun, it
    resumes from the checkpoint of step 2 and ends bit-identical to the uninterrupted run. The
    rl_eval stage then evaluates the trained model with the trace diagnostics."""
    config = tiny_rl_config(tmp_path, toy_files)
    runs = {name: run_ready_for_rl(config, tmp_path / name / "runs") for name in ("reference", "killed")}

    reference = train_command(config, runs["reference"].parent)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "rl step 1/4: reward " in reference.stdout and "rl step 4/4: reward " in reference.stdout
    killed = train_command(config, runs["killed"].parent, killing=True)
    assert killed.returncode == 2 and "stage rl was killed by signal 9" in killed.stderr.strip().splitlines()[-1]
    resumed = train_command(config, runs["killed"].parent)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    done = {name: json.loads((run / "state.json").read_text())["done"]["rl"] for name, run in runs.items()}
    assert done["reference"]["resumed_from"] == 0 and done["killed"]["resumed_from"] == 2
    weights = {name: safetensors_bytes(run / "rl" / "model") for name, run in runs.items()}
    assert weights["killed"] == weights["reference"]
    assert weights["reference"] != safetensors_bytes(runs["reference"] / "base")  # it trained

    def metrics(run):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert metrics(runs["killed"]) == metrics(runs["reference"]) and len(metrics(runs["reference"])) == 4

    for run in runs.values():
        summary = json.loads((run / "rl" / "eval" / "summary.json").read_text())
        assert json.loads((run / "state.json").read_text())["done"]["rl_eval"] == {
            "accuracy": summary["accuracy"], "mean_tokens": summary["mean_generated_tokens"]}
        assert summary["mode"] == "abstract" and summary["diagnostics"]["n_traces"] == 3  # the 3 held-out problems
    assert (runs["killed"] / "rl" / "eval" / "results.jsonl").read_text() == (
        runs["reference"] / "rl" / "eval" / "results.jsonl").read_text()
