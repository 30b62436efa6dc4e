"""Subprocess worker for the multi-host tests: one JAX process of a run on localhost CPUs.

    python multihost_worker.py OUT_DIR PROCESS_ID NUM_PROCESSES PORT

trains a tiny model with run_phase over the global mesh of all processes' devices and, on process
0, writes the final parameters to OUT_DIR/final.npz. NUM_PROCESSES=1 with ABSCOT_AS_SHARDS=N is
the single-process reference: it feeds, at every step, the global batch that N processes would
assemble from their shards. ABSCOT_KILL_AT_STEP=N SIGKILLs the process right after step N
(train_worker.py's switch). The caller sets XLA_FLAGS (devices per process) and JAX_PLATFORMS.
"""
import os
import sys

import numpy as np

HEARTBEAT_TIMEOUT_S = 10  # how soon the survivors of a dead process stop (jax's default: 100 s)


class ConcatenatedShards:
    """The data N processes would read, as one iterator: each step's rows are the N shards' local
    rows side by side per micro-batch, the layout `_global_batch` gives the global array."""

    def __init__(self, make_dataset, examples, batch_size, num_shards, grad_accum, **kwargs):
        self.iters = [iter(make_dataset(examples, batch_size=batch_size // num_shards, shard_index=i,
                                        shard_count=num_shards, **kwargs)) for i in range(num_shards)]
        self.grad_accum = grad_accum

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(it) for it in self.iters]
        out = {}
        for key in parts[0]:
            micro = [p[key].reshape(self.grad_accum, -1, *p[key].shape[1:]) for p in parts]
            out[key] = np.concatenate(micro, axis=1).reshape(-1, *parts[0][key].shape[1:])
        return out

    def get_state(self):
        return {"shards": [it.get_state() for it in self.iters]}

    def set_state(self, state):
        for it, s in zip(self.iters, state["shards"]):
            it.set_state(s)


def main(out_dir: str, process_id: int, num_processes: int, port: int):
    import jax

    from abscot_jax.sharding import configure_logging, initialize_distributed

    if num_processes > 1:
        initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id,
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    configure_logging()

    from abscot_jax.config import load_config
    from abscot_jax.sharding import MeshConfig, gather_params, make_mesh
    from abscot_jax.train import runner
    from train_worker import kill_after_step_from_env, save_params, tiny_examples, tiny_model

    kill_after_step_from_env()
    as_shards = int(os.environ.get("ABSCOT_AS_SHARDS", 0))
    cfg = load_config(None, ["train.mode=lora", "train.seq_len=48", "train.batch_size=4", "train.grad_accum=2",
                             "train.epochs=10", "train.max_steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=2",
                             "train.loss_chunk=40", "optim.learning_rate=3e-3", "lora.rank=4", "lora.dropout=0.1"])
    if as_shards:
        make_dataset = runner.make_dataset

        def sharded_as_one(examples, *, batch_size, shard_index=None, shard_count=None, **kwargs):
            if shard_count is not None:  # count_steps: the whole data set, unchanged
                return make_dataset(examples, batch_size=batch_size, shard_index=shard_index,
                                    shard_count=shard_count, **kwargs)
            return ConcatenatedShards(make_dataset, examples, batch_size, as_shards, cfg.train.grad_accum, **kwargs)

        runner.make_dataset = sharded_as_one
    mesh = make_mesh(MeshConfig())  # fsdp over every device of every process
    trained, summary = runner.run_phase(tiny_model(lora=True), tiny_examples(24), cfg, out_dir, mesh, progress=False)
    gather_params(trained)  # as the HF export does
    if jax.process_index() == 0:
        save_params(trained, out_dir)
    print("summary", summary, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:5]))
