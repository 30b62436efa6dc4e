"""A stage process for the driver tests (rounds.STAGE_COMMAND points here): the real one,
`python -m abscot_jax.stages RUN_DIR KEY`, with a fault injected where ABSCOT_KILL_IN says.

ABSCOT_KILL_IN is WHO:WHERE. WHO is `stage` (this process SIGKILLs itself), `driver` (it SIGKILLs
the ledger process, which takes this one with it) or `interrupt` (it sends the ledger SIGINT, as
Ctrl-C would, and waits there until the ledger passes the signal on, so the stage stops at that
point however slowly the ledger is scheduled). WHERE:
  phase_a_step   after an optimizer step (the second or later) of round 1's Phase A
  phase_b_step   the same in round 1's Phase B
  export         while writing the safetensors of round 1's first HF export
  traces_a_r2    inside round 2's Phase A traces (sampled from round 1's model)
  eval           inside the last evaluation, before its files are written
A marker file in the run's parent directory makes each fault fire once."""
import os
import signal
import sys
import time
from pathlib import Path


def main(run_dir: str, key: str) -> int:
    who, _, where = os.environ.get("ABSCOT_KILL_IN", "").partition(":")
    marker = Path(run_dir).parent / f"killed_{who}_{where}"

    def kill_once():
        if not marker.exists():
            marker.write_text("killed")
            if who == "interrupt":
                os.kill(os.getppid(), signal.SIGINT)
                while True:  # until the forwarded SIGINT raises KeyboardInterrupt here
                    time.sleep(0.1)
            if who == "driver":
                os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)

    if where in ("phase_a_step", "phase_b_step") and key == f"round_1/phase_{where[6]}":
        from abscot_jax.train import step

        call = step.TrainStep.__call__

        def killing_call(self, batch):
            out = call(self, batch)
            if self.step >= 2:  # a resumed phase: its first step after the checkpoint
                kill_once()
            return out

        step.TrainStep.__call__ = killing_call
    elif where == "export":
        from abscot_jax.checkpoint import hf

        write = hf.write_safetensors

        def killing_write(path, *args, **kwargs):
            write(path, *args, **kwargs)
            if "round_1" in str(path):
                kill_once()

        hf.write_safetensors = killing_write
    elif where == "traces_a_r2" and key == "round_2/traces_a":
        from abscot_jax import trace_sources

        make_traces = trace_sources.make_traces

        def killing_traces(*args, **kwargs):
            kill_once()
            return make_traces(*args, **kwargs)

        trace_sources.make_traces = killing_traces
    elif where == "eval":
        from abscot_jax.eval import evaluate

        write_results = evaluate.write_results

        def killing_write_results(out_dir, *args, **kwargs):
            if "round_2" in str(out_dir):
                kill_once()
            return write_results(out_dir, *args, **kwargs)

        evaluate.write_results = killing_write_results

    from abscot_jax.stages.__main__ import main as stage_main

    return stage_main([run_dir, key])


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
