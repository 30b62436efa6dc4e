"""Subprocess worker for the crash/resume tests: trains a tiny model on fixed random Phase A-like
examples with run_phase and writes the final trainable parameters to OUT/final.npz.

Fault injection (environment): ABSCOT_KILL_AT_STEP=N kills the process (SIGKILL) right after
optimizer step N; ABSCOT_KILL_IN_SAVE=N kills it in the middle of the checkpoint save at step N
(the state item written, the data item and the commit not)."""
import os
import signal
import sys

import numpy as np


def kill_after_step_from_env() -> None:
    """ABSCOT_KILL_AT_STEP=N: SIGKILL this process right after optimizer step N."""
    from abscot_jax.train import step as step_module

    kill_at = int(os.environ.get("ABSCOT_KILL_AT_STEP", 0))
    if kill_at:
        original_call = step_module.TrainStep.__call__

        def call(self, batch):
            metrics = original_call(self, batch)
            if self.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return metrics

        step_module.TrainStep.__call__ = call


def tiny_examples(count: int):
    """Fixed random Phase A-like examples (all four roles)."""
    from abscot_jax.data.roles import Role
    from abscot_jax.data.sequences import make_example

    rng = np.random.default_rng(0)
    examples = []
    for i in range(count):
        lengths = rng.integers(3, 8, size=4)
        pieces = [(rng.integers(0, 150, n), role) for n, role in zip(lengths, (Role.PROMPT, Role.COT, Role.ABSTRACT, Role.ANSWER))]
        examples.append(make_example(pieces, example_id=str(i), phase="A"))
    return examples


def tiny_model(lora: bool):
    from flax import nnx

    from abscot_jax.model.config import Qwen3Config
    from abscot_jax.model.lora import LoRAConfig, apply_lora
    from abscot_jax.model.qwen3 import Qwen3

    model = Qwen3(Qwen3Config(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8), rngs=nnx.Rngs(0))
    if lora:
        apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1), new_token_start=150, num_new_tokens=10)
    return model


def save_params(model, out_dir: str) -> None:
    import jax
    from flax import nnx

    flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in
            jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param).to_pure_dict())}
    np.savez(os.path.join(out_dir, "final.npz"), **flat)


def main(out_dir: str, mode: str):
    import jax
    import orbax.checkpoint as ocp

    from abscot_jax.config import load_config
    from abscot_jax.sharding import MeshConfig, make_mesh
    from abscot_jax.train import runner

    kill_after_step_from_env()
    kill_in_save = int(os.environ.get("ABSCOT_KILL_IN_SAVE", 0))
    if kill_in_save:
        original_json_save = ocp.JsonCheckpointHandler.async_save

        async def json_save(self, directory, *args, **kwargs):
            if directory.parent.name.startswith(str(kill_in_save)):
                os.kill(os.getpid(), signal.SIGKILL)
            return await original_json_save(self, directory, *args, **kwargs)

        ocp.JsonCheckpointHandler.async_save = json_save

    cfg = load_config(None, [f"train.mode={mode}", "train.seq_len=48", "train.batch_size=2", "train.grad_accum=2",
                             "train.epochs=4", "train.checkpoint_every=2", "train.keep_checkpoints=2",
                             "train.loss_chunk=40", "optim.learning_rate=3e-3", "lora.rank=4", "lora.dropout=0.1"])
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    trained, summary = runner.run_phase(tiny_model(mode == "lora"), tiny_examples(12), cfg, out_dir, mesh,
                                        progress=False)
    save_params(trained, out_dir)
    print("summary", summary)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
