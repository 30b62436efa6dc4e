"""python -m abscot_jax.train --config FILE (--round N | --rounds all) [--stage NAME ...] [--set a.b=v ...]"""
import argparse
import sys

from abscot_jax.checkpoint import USER_ERRORS, run_cli
from abscot_jax.config import load_config
from abscot_jax.hostmem import keep_freed_memory


def main(argv=None) -> int:
    keep_freed_memory()  # XLA's per-call temporaries: see abscot_jax/hostmem.py
    p = argparse.ArgumentParser(prog="python -m abscot_jax.train", description="Run Abstract-CoT rounds.")
    p.add_argument("--config", required=True, help="YAML run configuration (configs/*.yaml)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--round", type=int, help="run round N (rounds before it must be finished)")
    which.add_argument("--rounds", choices=["all"], help="run every round of the config")
    p.add_argument("--stage", action="append", help="run only these stages of the round (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    args = p.parse_args(argv)
    from abscot_jax import rounds
    from abscot_jax.data.dolci import DataError
    from abscot_jax.train.runner import ProcessLost, TrainingDiverged
    from abscot_jax.vocab import VocabError

    def train(_):
        from abscot_jax.sharding import configure_logging, initialize_distributed, set_device_memory_fraction

        cfg = load_config(args.config, args.set)
        set_device_memory_fraction(cfg.train.device_memory_fraction)  # before JAX starts its devices
        initialize_distributed()
        configure_logging()
        which = list(range(1, cfg.rounds + 1)) if args.rounds else [args.round]
        if args.round is not None and not 1 <= args.round <= cfg.rounds:
            raise rounds.RunError(f"--round {args.round} is outside 1..{cfg.rounds} (config rounds={cfg.rounds})")
        rounds.run(cfg, which, tuple(args.stage) if args.stage else rounds.ROUND_STAGES)

    return run_cli(train, None, (*USER_ERRORS, DataError, VocabError, rounds.RunError, TrainingDiverged, ProcessLost))


if __name__ == "__main__":
    sys.exit(main())
