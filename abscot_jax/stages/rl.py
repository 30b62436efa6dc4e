"""The rl stage: GRPO (abscot_jax/rl) from the last round's final model (rl.mode=abstract) or the
warm-up model (verbal), in RUN/rl/ (checkpoints, metrics.jsonl, phase.json), ending with the merged
HF export RUN/rl/model (a stage whose export was interrupted resumes from its final checkpoint)."""
from __future__ import annotations

import jax

from abscot_jax.errors import RunError
from abscot_jax.rl.data import load_rl_prompts
from abscot_jax.rl.loop import run_rl
from abscot_jax.rl.rewards import make_reward
from abscot_jax.rounds import rl_stage
from abscot_jax.sharding import make_mesh
from abscot_jax.stages.context import RunContext
from abscot_jax.stages.training import export, load_for_training


def rl(ctx: RunContext) -> dict:
    cfg = ctx.cfg
    if jax.process_count() > 1:
        raise RunError("the rl stage runs in one process (its rollouts are read on the host that samples them); "
                       "run it on one host, with that host's devices as the mesh")
    start = ctx.dir / rl_stage(cfg).reads[0]
    reward = make_reward(cfg.rl)
    reward.check()
    prompts, skipped = load_rl_prompts(cfg, ctx.tokenizer, reward)
    out = ctx.dir / "rl"
    model, summary = run_rl(load_for_training(ctx, start), prompts, reward, cfg, out, make_mesh(cfg.mesh),
                            tokenizer=ctx.tokenizer, base_dir=start)
    export(ctx, model, out / "model")
    return {**summary, "mode": cfg.rl.mode, "reward": cfg.rl.reward, "prompts": len(prompts),
            "skipped_rows": dict(skipped)}
