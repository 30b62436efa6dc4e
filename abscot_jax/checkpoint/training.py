"""Training-phase checkpoints (written by `abscot_jax.train.runner.run_phase`) -> HF directory.

A phase checkpoint holds only what trained: in LoRA mode the adapters and the new-token rows, not
the frozen base. So the runner writes `phase.json` beside `checkpoints/`: the base model's HF
directory, the parameter dtype, the training mode and the LoRA structure (targets, rank, scale,
new-token rows). The export rebuilds that model (base + adapters), restores the trained
parameters of one step into it, merges the adapters into the base weights and writes HF.

    PHASE_DIR/phase.json
    PHASE_DIR/checkpoints/<step>/state/   {"trainable": ..., "optimizer": ...}  (Orbax PyTree)
"""
from __future__ import annotations

import json
from pathlib import Path

from abscot_jax.errors import CheckpointError
from abscot_jax.files import replace_json

PHASE_META = "phase.json"
CHECKPOINTS = "checkpoints"
# Config fields that fix every parameter's shape: the base must agree with the trained model on these.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings")


def phase_meta(model, mode: str, train_embedding: bool, base_dir: str | Path | None) -> dict:
    """What an export needs to rebuild `model` (the model a phase trains) around its base."""
    from abscot_jax.model.qwen3 import PROJECTIONS

    cfg = model.config.replace(vocab_size=model.embed.shape[0])
    targets = [name for name in PROJECTIONS if name in model.lora]
    lora = None
    if targets:
        rank = model.lora[targets[0]].a.shape[-1]
        lora = {"targets": targets, "rank": int(rank), "scale": float(model.lora_scale),
                "dropout": float(model.lora_dropout), "new_token_start": None, "num_new_tokens": 0}
        if model.embed_delta is not None:
            lora.update(new_token_start=int(model.new_token_start), num_new_tokens=int(model.embed_delta.shape[0]))
    return {"base_dir": None if base_dir is None else str(Path(base_dir).absolute()), "mode": mode,
            "train_embedding": train_embedding, "param_dtype": cfg.param_dtype, "config": cfg.to_hf_dict(),
            "lora": lora}


def write_phase_meta(phase_dir: str | Path, meta: dict) -> None:
    replace_json(Path(phase_dir) / PHASE_META, meta)


def find_phase_checkpoint(path: str | Path) -> tuple[Path, Path] | None:
    """(phase directory, step directory) if `path` is a phase directory (its latest step) or one
    step directory `PHASE/checkpoints/<step>`; None if it is neither."""
    path = Path(path).absolute()
    if (path / CHECKPOINTS).is_dir():
        steps = [p for p in (path / CHECKPOINTS).iterdir() if p.name.isdigit() and (p / "state").is_dir()]
        if not steps:
            raise CheckpointError(f"{path / CHECKPOINTS} holds no finished checkpoint; train the phase first")
        return path, max(steps, key=lambda p: int(p.name))
    if path.parent.name == CHECKPOINTS and path.name.isdigit() and (path / "state").is_dir():
        return path.parent.parent, path
    return None


def read_phase_meta(phase_dir: Path) -> dict:
    path = phase_dir / PHASE_META
    if not path.is_file():
        raise CheckpointError(f"{path} not found: this phase was trained before the runner recorded its model; "
                              "export it from the training driver instead (save_hf after merge_lora)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); it is written by the runner, do not edit it") from e


def _check_base(base_cfg, meta: dict, base_dir: Path) -> None:
    trained = meta["config"]
    base = base_cfg.to_hf_dict()
    for field in SHAPE_FIELDS:
        if base.get(field) != trained.get(field):
            raise CheckpointError(
                f"base model {base_dir} has {field}={base.get(field)} but the phase trained a model with "
                f"{field}={trained.get(field)}; pass the base the phase started from with --base-dir")


def rebuild_trained_model(step_dir: Path, meta: dict, base_dir: str | Path | None = None):
    """The model as it was at `step_dir`: base (in full mode none is read: every parameter was
    saved) + the LoRA structure of `meta`, with the trained parameters restored. Returns
    (model, base HF directory if there is one: its config and tokenizer go with the export)."""
    import jax
    from flax import nnx
    import orbax.checkpoint as ocp

    from abscot_jax.checkpoint.hf import abstract_model, assemble, load_hf
    from abscot_jax.model.config import Qwen3Config
    from abscot_jax.model.lora import LoRAConfig, apply_lora
    from abscot_jax.train.step import trainable_filter

    lora = meta["lora"]
    base_dir = base_dir or meta["base_dir"]
    if meta["mode"] == "full":  # every parameter is in the checkpoint: no base to read
        cfg = Qwen3Config.from_hf_dict(meta["config"], param_dtype=meta["param_dtype"],
                                       compute_dtype=meta["param_dtype"])
        graphdef, state = abstract_model(cfg)
        model = assemble(graphdef, state, {name: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
                                           for name, leaf in state.to_pure_dict().items()})
    else:
        if base_dir is None:
            raise CheckpointError(f"{step_dir.parent.parent / PHASE_META} names no base model (the phase was "
                                  "trained from a model built in memory); pass its HF directory with --base-dir")
        if not Path(base_dir).is_dir():
            raise CheckpointError(f"base model {base_dir} of this phase is not a directory; pass the base the "
                                  "phase started from with --base-dir")
        model = load_hf(base_dir, param_dtype=meta["param_dtype"])
        _check_base(model.config.replace(vocab_size=model.embed.shape[0]), meta, Path(base_dir))
        if lora is not None:
            apply_lora(model, LoRAConfig(rank=lora["rank"], alpha=lora["scale"] * lora["rank"],
                                         dropout=lora["dropout"], targets=tuple(lora["targets"]),
                                         train_new_token_rows=lora["num_new_tokens"] > 0),
                       new_token_start=lora["new_token_start"], num_new_tokens=lora["num_new_tokens"])
            model.lora_scale = lora["scale"]  # exactly as trained (alpha / rank need not round-trip)
    trainable = nnx.state(model, trainable_filter(meta["mode"], meta["train_embedding"]))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"trainable": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                        trainable.to_pure_dict())}
    try:  # the runner's CheckpointManager item, read with the same (v0) API; not the optimizer state
        with ocp.PyTreeCheckpointer() as checkpointer:
            restored = checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))["trainable"]
    except (ValueError, KeyError, FileNotFoundError) as e:  # Orbax explains mismatches in many lines
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CheckpointError(f"{step_dir} does not match {step_dir.parent.parent / PHASE_META} "
                              f"({first.strip()}); the checkpoint is incomplete or from another phase") from e
    trainable.replace_by_pure_dict(restored)
    nnx.update(model, trainable)
    return model, (Path(base_dir) if base_dir is not None and Path(base_dir).is_dir() else None)


def export_phase_checkpoint(phase_dir: Path, step_dir: Path, out_dir: str | Path, *, merge_lora: bool,
                            base_dir: str | Path | None = None, dtype: str | None = None,
                            max_shard_size: str | int = "5GB", overwrite: bool = False) -> Path:
    """A phase checkpoint (see `find_phase_checkpoint`) -> HF directory, adapters merged. `dtype`
    defaults to the model's parameter dtype (the base's, for LoRA: merged in fp32, cast back)."""
    from abscot_jax.checkpoint.hf import ensure_new_dir, save_hf
    from abscot_jax.checkpoint.orbax_io import read_hf_config
    from abscot_jax.model import lora as lora_lib

    ensure_new_dir(out_dir, overwrite)  # fail before the slow part
    meta = read_phase_meta(phase_dir)
    if meta["lora"] is not None and not merge_lora:
        raise CheckpointError(f"{phase_dir} is a LoRA training checkpoint (adapters over a frozen base); "
                              "pass --merge-lora to fold the adapters into the base weights and export")
    model, base = rebuild_trained_model(step_dir, meta, base_dir)
    lora_lib.merge_lora(model)
    return save_hf(model, out_dir, tokenizer_dir=base, dtype=dtype or model.config.param_dtype,
                   max_shard_size=max_shard_size,
                   base_config=read_hf_config(base) if base is not None else meta["config"], overwrite=overwrite)
