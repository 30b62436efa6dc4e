"""Subprocess worker for the driver tests: the whole round driver on a tiny model and toy data,
its stage processes started through tests/stage_worker.py (faults: see there). The driver checks,
each time it starts a stage process and at the end, that it has started no JAX backend itself."""
import sys
from pathlib import Path


def assert_no_jax_backend(when: str) -> None:
    from jax._src import xla_bridge

    assert not xla_bridge.backends_are_initialized(), f"the driver process started a JAX backend ({when})"


def main(run_root: str, data_dir: str, rounds: int):
    from abscot_jax import rounds as driver
    from abscot_jax.config import load_config
    from abscot_jax.errors import RunError, run_cli

    launch = driver.launch

    def checked_launch(cmd, *args):
        assert_no_jax_backend(f"starting {cmd[-1]}")
        return launch(cmd, *args)

    driver.launch = checked_launch
    driver.STAGE_COMMAND = [sys.executable, str(Path(__file__).with_name("stage_worker.py"))]
    data = Path(data_dir)
    cfg = load_config(None, [
        f"run_dir={run_root}", "name=tiny", f"rounds={rounds}", f"model.hf_dir={data / 'model'}",
        f"data.train={data / 'train.jsonl'}", f"data.eval={data / 'eval.jsonl'}", "data.examples_per_phase=8",
        "data.m_max=6", "train.mode=lora", "lora.rank=4", "lora.alpha=8", "train.seq_len=128",
        "train.batch_size=4", "train.epochs=2", "train.checkpoint_every=1", "optim.learning_rate=1e-2", "eval.limit=3",
        "eval.m_min=2", "eval.max_new_tokens=10", "sampler.max_batch=16",
    ])
    code = run_cli(lambda _: driver.run(cfg, list(range(1, rounds + 1))), None, (RunError,))
    assert_no_jax_backend("after the run")
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
