"""The GRPO loop: per step, P prompts x K rollouts sampled with the JAX sampler from the current
weights (no export), rewards, group-normalised advantages, `rl.updates_per_step` optimizer steps of
the clipped loss + KL; metrics per step; Orbax checkpoints with exact resume.

Exact resume: a checkpoint holds the step, the trainable parameters, the optimizer state and the
prompt stream's position (the frozen base, in LoRA mode, is what the stage started from). Rollout
seeds derive from (seed, step, prompt slot, prompt id, k) and nothing else varies, so a run
resumed after a kill samples the same rollouts and ends with the same weights, bit for bit on CPU.

    OUT/phase.json, checkpoints/<step>/, metrics.jsonl, tensorboard/
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from abscot_jax.checkpoint.training import phase_meta, write_phase_meta
from abscot_jax.errors import RunError
from abscot_jax.progress import Progress, say
from abscot_jax.rl.data import PromptStream
from abscot_jax.rl.grpo import group_advantages, length_penalised, uninformative_groups
from abscot_jax.rl.rollouts import Rollout, packed_rollouts, rollout_example, rollout_requests
from abscot_jax.rl.trainer import PolicyTrainer
from abscot_jax.sampling.engines.base import end_of_turn_id, load_abstract_vocab
from abscot_jax.sampling.protocol import SamplingResult, make_result
from abscot_jax.sampling.sampler import Sampler, TraceTokens
from abscot_jax.train.runner import MetricsLog, restore_latest, save_step


def step_line(record: dict, steps: int) -> str:
    """One line of a step's figures (printed at the first and the last step)."""
    def figure(key, fmt):
        return "—" if record.get(key) is None else format(record[key], fmt)

    return (f"rl step {record['step']}/{steps}: reward {figure('reward', '.4f')}, accuracy {figure('accuracy', '.1%')}, "
            f"kl {figure('kl', '.4g')}, trace length {figure('trace_length', '.1f')}, "
            f"answer length {figure('answer_length', '.1f')}")


def rollout_sampler(model, tokenizer, rl, mesh) -> Sampler:
    """The JAX sampler for a step's rollouts: the trace constraint of the tokenizer's abstract
    vocabulary, end of turn as the stop token, rl.rollout_batch rows at a time."""
    return Sampler(model, trace=TraceTokens.of(load_abstract_vocab(tokenizer)), eos_id=end_of_turn_id(tokenizer),
                   mesh=mesh, max_batch=rl.rollout_batch)


def sample(sampler: Sampler, requests, tokenizer) -> list[SamplingResult]:
    """Each request's result. The requests are built here from checked prompts (data.py), so the
    engines' per-request checks have nothing to catch, and a failure stops the stage."""
    outputs = sampler.generate([r.prompt_ids for r in requests], requests, [r.budget() for r in requests])
    trace = sampler.trace
    return [make_result(request, tokens, "stop" if stopped else "length", tokenizer, trace.begin_id, trace.end_id,
                        sampler.eos_id) for request, (tokens, stopped) in zip(requests, outputs)]


class RolloutStep:
    """One GRPO step: rollouts from the trainer's current weights, rewards, advantages, updates."""

    def __init__(self, sampler: Sampler, trainer: PolicyTrainer, reward, cfg, tokenizer):
        self.sampler, self.trainer, self.reward, self.cfg, self.tokenizer = sampler, trainer, reward, cfg, tokenizer

    def __call__(self, step: int, prompts: list) -> dict:
        rl, k = self.cfg.rl, self.cfg.rl.rollouts_per_prompt
        self.sampler = self.sampler.with_model(self.trainer.model())  # the current weights
        requests = rollout_requests(prompts, step, self.cfg)
        results = sample(self.sampler, requests, self.tokenizer)
        outcomes = self.reward.score([prompts[i // k] for i in range(len(results))], [r.answer_text for r in results])
        rewards = np.array([np.nan if o.reward is None else o.reward for o in outcomes])
        scored = np.flatnonzero(~np.isnan(rewards))
        if not len(scored):
            raise RunError(f"rl step {step + 1}: none of {len(results)} rollouts got a reward ({self.reward.last_error}); "
                           "fix the judge (rl.judge_*) and rerun: the stage resumes from its last checkpoint")
        lengths = np.array([len(r.token_ids) for r in results])
        shaped = length_penalised(rewards, lengths, rl.length_penalty, rl.max_new_tokens)
        advantages = group_advantages(shaped.reshape(-1, k)).reshape(-1)
        rollouts = []
        for i in scored:
            example, allowed = rollout_example(prompts[i // k].prompt_ids, results[i], abstract=rl.mode == "abstract",
                                               m_min=self.cfg.eval.m_min, m_max=self.cfg.data.m_max,
                                               example_id=requests[i].id)
            rollouts.append(Rollout(example, allowed, float(advantages[i])))
        t = self.cfg.train
        figures = self.trainer.step(packed_rollouts(rollouts, t.seq_len, t.batch_size), rl.updates_per_step)
        return {
            "step": step + 1, "reward": float(np.mean(rewards[scored])),
            "accuracy": float(np.mean([outcomes[i].correct for i in scored])),
            **figures,
            "trace_length": float(np.mean([results[i].trace_length for i in scored])) if rl.mode == "abstract" else None,
            "answer_length": float(np.mean([results[i].answer_length for i in scored])),
            "zero_advantage_groups": uninformative_groups(shaped.reshape(-1, k)),
            "reward_failures": len(results) - len(scored),
        }


def run_rl(model, prompts: list, reward, cfg, out_dir: str | Path, mesh, *, tokenizer, base_dir=None):
    """Train `model` with GRPO on `prompts` (data.RLPrompt) per cfg.rl; resumes from out_dir's
    latest checkpoint. Returns (trained model, summary). `base_dir`: the HF directory `model` was
    loaded from (phase.json names it, for convert/flax_to_hf.py)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rl, t = cfg.rl, cfg.train
    write_phase_meta(out_dir, phase_meta(model, t.mode, t.train_embedding, base_dir))
    sampler = rollout_sampler(model, tokenizer, rl, mesh)
    trainer = PolicyTrainer(model, cfg, rl.steps * rl.updates_per_step, mesh, sampler.trace)
    stream = PromptStream(len(prompts), t.seed)
    manager = ocp.CheckpointManager((out_dir / "checkpoints").absolute(), options=ocp.CheckpointManagerOptions(
        max_to_keep=t.keep_checkpoints, create=True, enable_async_checkpointing=False))
    start = restore_latest(manager, trainer, trainer.saved_part, stream, trainer.wrt) or 0
    metrics_log = MetricsLog(out_dir, start)
    one_step = RolloutStep(sampler, trainer, reward, cfg, tokenizer)
    bar = Progress("rl", rl.steps, unit="steps", initial=start)
    try:
        for step in range(start, rl.steps):
            tick = time.perf_counter()
            record = one_step(step, [prompts[i] for i in stream.take(rl.prompts_per_step)])
            record["seconds"] = time.perf_counter() - tick
            metrics_log.write(record)
            bar.update(1, reward=record["reward"], accuracy=record["accuracy"])
            if step == 0 or step + 1 == rl.steps:
                say(step_line(record, rl.steps))
            if (step + 1) % rl.checkpoint_every == 0 or step + 1 == rl.steps:
                save_step(manager, step + 1, trainer.saved_part(), stream)
    except BaseException:
        bar.close(summary=False)  # the error says where it stopped
        raise
    metrics_log.close()
    manager.close()
    first, last = metrics_log.records[0], metrics_log.records[-1]
    bar.close(reward=f"{first['reward']:.4f} -> {last['reward']:.4f}",
              accuracy=f"{first['accuracy']:.1%} -> {last['accuracy']:.1%}")
    summary = {"steps": rl.steps, "resumed_from": start, "first_reward": first["reward"], "final_reward": last["reward"],
               "first_accuracy": first["accuracy"], "final_accuracy": last["accuracy"], "final_kl": last["kl"],
               "reward_failures": sum(r["reward_failures"] for r in metrics_log.records)}
    return trainer.model(), summary
