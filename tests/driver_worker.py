"""Subprocess worker for the driver tests: the whole round driver on a tiny model and toy data.

ABSCOT_KILL_IN names a place where the process SIGKILLs itself once, mid-stage:
  phase_a_step   after the second optimizer step of round 1's Phase A
  phase_b_step   after the second optimizer step of round 1's Phase B
  export         while writing the safetensors of the first HF export after the warm-up/base
  traces_a_r2    inside round 2's trace sampling (Phase A traces from round 1's model)
  eval           inside the last evaluation, before its files are written
A marker file makes each fault fire only in the first process that reaches it."""
import os
import signal
import sys
from pathlib import Path


def kill_once(marker: Path):
    if not marker.exists():
        marker.write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)


def main(run_root: str, data_dir: str, rounds: int):
    from abscot_jax import rounds as driver
    from abscot_jax.config import load_config

    fault = os.environ.get("ABSCOT_KILL_IN", "")
    marker = Path(run_root) / f"killed_{fault}"
    if fault in ("phase_a_step", "phase_b_step"):
        from abscot_jax.train import step

        call, train_phase = step.TrainStep.__call__, driver.Run.train_and_export_phase
        current_phase = []

        def tracking_phase(self, t, phase):
            current_phase[:] = [phase]
            return train_phase(self, t, phase)

        def killing_call(self, batch):
            out = call(self, batch)
            if current_phase == [fault[6]] and self.step == 2:
                kill_once(marker)
            return out

        driver.Run.train_and_export_phase = tracking_phase
        step.TrainStep.__call__ = killing_call
    elif fault == "export":
        from abscot_jax.checkpoint import hf

        write = hf.write_safetensors

        def killing_write(path, *args, **kwargs):
            write(path, *args, **kwargs)
            if "round_1" in str(path):
                kill_once(marker)

        hf.write_safetensors = killing_write
    elif fault == "traces_a_r2":
        run_round = driver.Run._traces_a

        def killing_traces(self, t):
            if t == 2:
                kill_once(marker)
            return run_round(self, t)

        driver.Run._traces_a = killing_traces
    elif fault == "eval":
        from abscot_jax.eval import evaluate

        write_results = evaluate.write_results

        def killing_write_results(out_dir, *args, **kwargs):
            if "round_2" in str(out_dir):
                kill_once(marker)
            return write_results(out_dir, *args, **kwargs)

        evaluate.write_results = killing_write_results

    data = Path(data_dir)
    cfg = load_config(None, [
        f"run_dir={run_root}", "name=tiny", f"rounds={rounds}", f"model.hf_dir={data / 'model'}",
        f"data.train={data / 'train.jsonl'}", f"data.eval={data / 'eval.jsonl'}", "data.examples_per_phase=8",
        "data.m_max=6", "train.mode=lora", "lora.rank=4", "lora.alpha=8", "train.seq_len=128",
        "train.batch_size=4", "train.epochs=2", "train.checkpoint_every=1", "optim.learning_rate=1e-2", "eval.limit=3",
        "eval.m_min=2", "eval.max_new_tokens=10", "sampler.max_batch=16",
    ])
    driver.run(cfg, list(range(1, rounds + 1)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
