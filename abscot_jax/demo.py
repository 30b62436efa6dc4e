"""The whole pipeline on a tiny model, offline, on a CPU: `python -m abscot_jax.demo`.

It builds a tiny tokenizer and a random 2-layer Qwen3, writes the toy task (running sums mod 10,
in the Dolci-Think and MATH-500 schemas), teaches the model the verbal-CoT format, runs the
Abstract-CoT rounds through the same driver as `python -m abscot_jax.train`, evaluates verbal CoT,
direct answer and the abstract trace (with the trace diagnostics) on held-out problems, and
prints the report. Sizes are configurable (`--set`), so a longer study runs the same code.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


# The embedded default (configs/tiny_cpu.yaml holds the same settings for the train command).
DEMO_SETTINGS = {
    "name": "demo",
    "run_dir": "runs",
    "rounds": 2,
    "model": {"param_dtype": "float32", "compute_dtype": "float32"},
    "train": {"mode": "full", "seq_len": 256, "batch_size": 16, "epochs": 2, "seed": 0, "loss_chunk": 512,
              "checkpoint_every": 50},
    "optim": {"learning_rate": 3e-3, "warmup_ratio": 0.05, "min_lr_ratio": 0.1, "weight_decay": 0.0},
    "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
    # The evaluation's system line, so that training prompts are the evaluation's prompts.
    "data": {"examples_per_phase": 400, "warmup_examples": 9600, "m_max": 24,
             "system": "Please reason step by step, and put your final answer within \\boxed{}."},
    "sampler": {"engine": "jax", "max_batch": 64, "trace_temperature": 1.0},
    "eval": {"limit": 100, "m_min": 4, "max_new_tokens": 64, "baselines": ["verbal", "direct"]},
    "rl": {"enabled": False, "mode": "abstract", "reward": "toy", "prompts_per_step": 8, "rollouts_per_prompt": 8,
           "steps": 20, "learning_rate": 1e-4, "max_new_tokens": 64, "rollout_batch": 64, "checkpoint_every": 10},
}
# Shape of the tiny model and of the toy task. RoPE base 10,000 (not Qwen3's 1,000,000) and an
# untied head: from scratch, with Qwen3's 1e6 base and a head tied to a 640-row embedding, the
# warm-up sat at chance on the digits for 900 steps (docs/BENCHMARKS.md, "Toy study").
TINY_MODEL = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "tie_word_embeddings": False, "rope_theta": 10_000.0}
TOY_TASK = {"train_size": 12000, "eval_size": 200, "min_digits": 12, "max_digits": 12}


def demo_config(overrides=()):
    """The demo's RunConfig: the embedded settings, then `--set` overrides."""
    import tempfile

    import yaml

    from abscot_jax.config import load_config

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(DEMO_SETTINGS, f)
    try:
        return load_config(f.name, overrides)
    finally:
        Path(f.name).unlink()


def prepare_inputs(cfg, where: Path, train_size: int = TOY_TASK["train_size"]) -> None:
    """Write the tiny starting model (unless there) and the toy data (`train_size` training rows)
    under `where`, and point `cfg` (model.hf_dir, data.train, data.eval) at them."""
    from abscot_jax.data.toy import write_toy_data
    from abscot_jax.fixtures import make_checkpoint

    fixture = where / "fixture"
    if not (fixture / "config.json").exists():
        print(f"building the tiny tokenizer and a random Qwen3 in {fixture}", flush=True)
        make_checkpoint(fixture, seed=cfg.train.seed, **TINY_MODEL)
    train_file, eval_file = write_toy_data(where / "data", seed=cfg.train.seed, **{**TOY_TASK, "train_size": train_size})
    cfg.model.hf_dir = str(fixture)
    cfg.data.train = str(train_file)
    cfg.data.eval = str(eval_file)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m abscot_jax.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    args = p.parse_args(argv)

    from abscot_jax import rounds
    from abscot_jax.errors import USER_ERRORS, RunError, run_cli

    def demo(_):
        cfg = demo_config(args.set)
        prepare_inputs(cfg, Path(cfg.run_dir) / cfg.name)
        run = rounds.run(cfg, list(range(1, cfg.rounds + 1)))
        print((run.dir / "report.md").read_text())

    return run_cli(demo, None, (*USER_ERRORS, RunError), interrupt_line=True)


if __name__ == "__main__":
    sys.exit(main())
