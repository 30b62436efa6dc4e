"""python -m abscot_jax.train --config FILE (--round N | --rounds all) [--stage NAME ...] [--set a.b=v ...]
   python -m abscot_jax.train --config FILE --stage rl [--set a.b=v ...]   (GRPO after the last round,
                                                                             then its evaluation)

The ledger of abscot_jax/rounds.py: each stage runs in its own process, this one starts no JAX backend."""
import argparse
import sys

from abscot_jax import rounds
from abscot_jax.config import load_config
from abscot_jax.errors import USER_ERRORS, RunError, run_cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m abscot_jax.train", description="Run Abstract-CoT rounds.")
    p.add_argument("--config", required=True, help="YAML run configuration (configs/*.yaml)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--round", type=int, help="run round N (rounds before it must be finished)")
    which.add_argument("--rounds", choices=["all"], help="run every round of the config")
    p.add_argument("--stage", action="append",
                   help=f"run only these stages of the round (repeatable): {', '.join(rounds.ROUND_STAGES)}; "
                        f"{rounds.RL_STAGE} (GRPO after the last round, then {rounds.RL_EVAL_STAGE}: its "
                        f"evaluation) and {rounds.RL_EVAL_STAGE} also run without --round")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    args = p.parse_args(argv)
    if args.round is None and args.rounds is None and not (args.stage and set(args.stage) <= set(rounds.RL_STAGES)):
        p.error("one of the arguments --round --rounds is required (only --stage rl and --stage rl_eval run "
                "without them)")

    def train(_):
        cfg = load_config(args.config, args.set)
        which = list(range(1, cfg.rounds + 1)) if args.rounds else [] if args.round is None else [args.round]
        if args.round is not None and not 1 <= args.round <= cfg.rounds:
            raise RunError(f"--round {args.round} is outside 1..{cfg.rounds} (config rounds={cfg.rounds})")
        rounds.run(cfg, which, tuple(args.stage) if args.stage else rounds.ROUND_STAGES)

    return run_cli(train, None, (*USER_ERRORS, RunError), interrupt_line=True)


if __name__ == "__main__":
    sys.exit(main())
