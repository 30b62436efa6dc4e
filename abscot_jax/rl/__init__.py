"""GRPO after the warm-up (the paper's second stage), run by the ledger's `rl` stage
(abscot_jax/stages/rl.py):

  data.py      prompts with gold answers, disjoint from the evaluation set
  rewards.py   math_verify | toy | judge, behind one interface
  rollouts.py  sampling requests with per-rollout seeds; rollouts as packed training rows
  grpo.py      group-normalised advantages, per-token log-probs, the clipped loss + KL
  trainer.py   the policy's (model, optimizer) state, reference policy, jitted gradient and update
  loop.py      the step loop: rollouts, rewards, updates, metrics, checkpoints, exact resume
  curves.py    the per-step figures of metrics.jsonl and their plot (the run report's RL section)

This module imports nothing heavy: the run configuration reads the names below.
"""
MODES = ("abstract", "verbal")  # constrained trace then answer | the verbal-CoT baseline (SFT + RL)
REWARDS = ("math_verify", "toy", "judge")
DATA_FORMATS = ("dolci", "math")  # the schema of rl.data: Dolci-Think rows or MATH-500-style rows
