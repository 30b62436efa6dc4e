"""python -m abscot_jax.stages RUN_DIR KEY: one stage of a run, in this process (the ledger starts
it; abscot_jax/rounds.py). Reads RUN_DIR/config.yaml; writes what the stage returns to
RUN_DIR/stage_results/, which the ledger records in state.json."""
import signal
import sys
from pathlib import Path

import jax

from abscot_jax import rounds
from abscot_jax.config import load_config
from abscot_jax.data.dolci import DataError
from abscot_jax.errors import USER_ERRORS, RunError, run_cli
from abscot_jax.hostmem import keep_freed_memory_on_cpu
from abscot_jax.sharding import configure_logging, initialize_distributed, set_device_memory_fraction
from abscot_jax.stages.base import prepare_base
from abscot_jax.stages.context import RunContext, write_json_atomic
from abscot_jax.stages.evaluation import baseline, rl_eval, round_eval
from abscot_jax.stages.rl import rl
from abscot_jax.stages.traces import phase_traces
from abscot_jax.stages.training import train_phase, warmup
from abscot_jax.train.runner import ProcessLost, TrainingDiverged
from abscot_jax.vocab import VocabError

# Stage.kind -> its function
STAGE_FUNCTIONS = {"prepare_base": prepare_base, "warmup": warmup, "baseline": baseline, "traces": phase_traces,
                   "phase": train_phase, "eval": round_eval, "rl": rl, "rl_eval": rl_eval}


def run_stage(run_dir: Path, key: str) -> None:
    cfg = load_config(run_dir / "config.yaml")
    set_device_memory_fraction(cfg.train.device_memory_fraction)  # before JAX starts its devices
    # Each stage is a new process: compiled programs come from the run's cache, not a recompilation.
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(run_dir / "xla_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    initialize_distributed()
    keep_freed_memory_on_cpu()  # XLA's per-call temporaries: see abscot_jax/hostmem.py
    configure_logging()
    stage = rounds.find_stage(cfg, key)
    result = STAGE_FUNCTIONS[stage.kind](RunContext(cfg), **stage.args) or {}
    write_json_atomic(rounds.result_path(run_dir, key), result)


def main(argv=None) -> int:
    run_dir, key = argv if argv is not None else sys.argv[1:]
    # SIGTERM as Ctrl-C: stop at the next Python instruction; every file is written whole or not at
    # all, and the ledger says where the run stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return run_cli(lambda _: run_stage(Path(run_dir), key), None,
                       (*USER_ERRORS, DataError, VocabError, RunError, TrainingDiverged, ProcessLost))
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
