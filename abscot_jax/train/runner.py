"""The phase runner: epochs over packed examples, metrics, Orbax checkpoints, exact resume.

A checkpoint holds what changes during training: the trainable parameters, the optimizer state
(with its step) and the data iterator's position. The frozen base (LoRA mode) is not written again:
it is whatever the phase started from. Dropout keys derive from (seed, step), so restoring the
step restores the randomness. A resumed run is bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from abscot_jax.config import RunConfig
from abscot_jax.data.pipeline import make_dataset
from abscot_jax.errors import ConfigError
from abscot_jax.files import replace_jsonl
from abscot_jax.progress import Progress
from abscot_jax.train.flops import peak_tflops, throughput
from abscot_jax.train.step import BATCH_KEYS, TrainStep, trainable_filter

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


class ProcessLost(RuntimeError):
    """A step across several processes failed, most likely because one of them died."""


def count_steps(examples, cfg: RunConfig) -> int:
    """Optimizer steps for the configured epochs: packing decides how many rows there are."""
    t = cfg.train
    rows_per_step = t.batch_size * t.grad_accum
    dataset = make_dataset(examples, batch_size=rows_per_step, seq_len=t.seq_len, seed=t.seed,
                           num_epochs=t.epochs, shard_index=0, shard_count=1)
    steps = sum(1 for _ in dataset)
    return min(steps, t.max_steps) if t.max_steps else steps


class MetricsLog:
    """metrics.jsonl (truncated to the resumed step, so a resumed log has no duplicates) + TensorBoard."""

    def __init__(self, out_dir: Path, resume_step: int):
        self.path = out_dir / "metrics.jsonl"
        self.records = []  # every step's record so far, the resumed ones included
        if self.path.exists():
            self.records = [r for r in map(json.loads, filter(str.strip, self.path.read_text().splitlines()))
                            if r["step"] <= resume_step]
        self.tb = None
        if jax.process_index() == 0:
            replace_jsonl(self.path, self.records)  # replaced whole: other processes read it now
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        self.records.append(record)
        if jax.process_index() != 0:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                self.tb.add_scalar(key, value, record["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _global_batch(local: dict, grad_accum: int, mesh) -> dict:
    """[accum * B_local, T] host rows -> [accum, B, T] arrays sharded over the batch axes."""
    from abscot_jax.sharding import batch_sharding

    spec = batch_sharding(mesh).spec
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *spec))
    out = {}
    for key in BATCH_KEYS:
        x = local[key]
        x = x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, x)
    return out


def run_phase(model, examples, cfg: RunConfig, out_dir: str | Path, mesh, *, progress: bool = True,
              base_dir: str | Path | None = None):
    """Train `model` on `examples` (SequenceExample list) per cfg.train; resumes from out_dir's
    latest checkpoint. Returns (trained model, summary dict). `base_dir`: the HF directory `model`
    was loaded from, recorded in out_dir/phase.json so convert/flax_to_hf.py can export a checkpoint."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t = cfg.train
    if jax.process_index() == 0:
        from abscot_jax.checkpoint.training import phase_meta, write_phase_meta

        write_phase_meta(out_dir, phase_meta(model, t.mode, t.train_embedding, base_dir))
    if t.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of the process count {jax.process_count()}")
    total_steps = count_steps(examples, cfg)
    if total_steps == 0:
        raise ConfigError(f"{len(examples)} examples give no full batch of {t.batch_size * t.grad_accum} rows; "
                         "lower train.batch_size / train.grad_accum or add data")
    trainer = TrainStep.create(model, cfg.optim, t, total_steps, mesh, seed=t.seed)
    local_rows = t.batch_size // jax.process_count() * t.grad_accum
    # An endless stream cut at total_steps: each process packs its own shard into a slightly
    # different number of rows, so "until exhausted" would let the processes fall out of step.
    data_iter = iter(make_dataset(examples, batch_size=local_rows, seq_len=t.seq_len, seed=t.seed))

    wrt = trainable_filter(t.mode, t.train_embedding)
    manager = ocp.CheckpointManager(
        (out_dir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=t.keep_checkpoints, create=True,
                                             enable_async_checkpointing=False),
    )

    def saved_part():
        model, optimizer = nnx.merge(trainer.graphdef, trainer.state)
        return {"trainable": nnx.state(model, wrt).to_pure_dict(), "optimizer": nnx.state(optimizer).to_pure_dict()}

    start = 0
    restored_step = restore_latest(manager, trainer, saved_part, data_iter, wrt)
    if restored_step is not None:
        start = restored_step
        log.info("resumed from step %d", start)
    metrics_log = MetricsLog(out_dir, start)
    peak = peak_tflops(jax.local_devices()[0].device_kind, t.peak_tflops_per_device)
    lora = (cfg.lora.rank, cfg.lora.targets) if t.mode == "lora" else (0, ())

    bar = Progress(phase_label(out_dir), total_steps, unit="steps", initial=start,
                   enabled=progress and jax.process_index() == 0)
    tokens = 0  # processed this attempt
    try:
        for step in range(start, total_steps):
            tick = time.perf_counter()
            local = next(data_iter)
            batch = _global_batch(local, t.grad_accum, mesh)
            try:
                metrics = {k: float(v) for k, v in trainer(batch).items()}
            except jax.errors.JaxRuntimeError as e:
                if jax.process_count() == 1:
                    raise
                # A dead peer shows as a failed collective (e.g. "Connection reset by peer").
                raise ProcessLost(
                    f"process {jax.process_index()}: step {step + 1} failed in a computation across the "
                    f"{jax.process_count()} processes ({str(e).splitlines()[0][:200]}); another process has most "
                    f"likely died, see its log. Restart all of them to resume; last checkpoint: "
                    f"{_last_checkpoint(manager, out_dir)}") from e
            elapsed = time.perf_counter() - tick
            if not math.isfinite(metrics["loss"]):
                latest = _last_checkpoint(manager, out_dir)
                manager.close()
                raise TrainingDiverged(f"loss is {metrics['loss']} at step {step + 1}; stopped. Last good checkpoint: "
                                       f"{latest}; lower optim.learning_rate or check the data")
            record = {"step": step + 1, **metrics, "seconds": elapsed,
                      **throughput(model.config, local, elapsed, peak, lora_rank=lora[0], lora_targets=lora[1])}
            metrics_log.write(record)
            tokens += record["processed_tokens"]
            bar.update(1, loss=metrics["loss"], **{"tokens/s": f"{record['tokens_per_s']:,.0f}"})
            if (step + 1) % t.checkpoint_every == 0 or step + 1 == total_steps:
                save_step(manager, step + 1, saved_part(), data_iter)
    except BaseException:
        bar.close(summary=False)  # the error says where it stopped
        raise
    metrics_log.close()
    manager.close()
    first, last = (metrics_log.records[0], metrics_log.records[-1]) if metrics_log.records else ({}, {})
    bar.close(tokens=f"{tokens:,}", loss=f"{first.get('loss', float('nan')):.4f} -> {last.get('loss', float('nan')):.4f}")
    summary = {"steps": total_steps, "resumed_from": start, "first_loss": first.get("loss"),
               "final_loss": last.get("loss"), "final_trace_loss": last.get("trace_loss"),
               "final_answer_loss": last.get("answer_loss")}
    return trainer.model(), summary


def phase_label(out_dir: Path) -> str:
    """What the progress lines call a phase: `round_1/phase_a`, or `warmup` (it trains in warmup/phase)."""
    return out_dir.parent.name if out_dir.name == "phase" else f"{out_dir.parent.name}/{out_dir.name}"


def _last_checkpoint(manager, out_dir: Path) -> str:
    latest = manager.latest_step()
    return f"{'step ' + str(latest) if latest is not None else 'none'} in {out_dir / 'checkpoints'}"


def save_step(manager, step: int, state: dict, data_iter) -> None:
    # Every process calls save: each writes its shards of the arrays. The JSON item is written by
    # process 0 alone, so it holds every process's data position (each reads its own shard).
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({"processes": _all_processes(data_iter.get_state())}),
    ))
    manager.wait_until_finished()


def _all_processes(state: dict) -> list[dict]:
    """This process's JSON-able `state` from every process, in process order (a collective)."""
    if jax.process_count() == 1:
        return [state]
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(state).encode(), np.uint8)
    size = int(np.max(multihost_utils.process_allgather(np.int32(blob.size))))
    blobs = multihost_utils.process_allgather(np.pad(blob, (0, size - blob.size)))
    return [json.loads(bytes(b).rstrip(b"\0")) for b in blobs]  # JSON text never contains NUL


def restore_latest(manager, trainer: TrainStep, saved_part, data_iter, wrt) -> int | None:
    """Restore the newest readable checkpoint; a corrupt one is skipped with a warning."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            target = jax.tree.map(ocp.utils.to_shape_dtype_struct, saved_part())
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to an older one
            log.warning("checkpoint at step %d is unreadable (%s); trying an older one", step,
                        str(e).splitlines()[0][:200])
            continue
        model, optimizer = nnx.merge(trainer.graphdef, trainer.state)
        for module, part in ((model, "trainable"), (optimizer, "optimizer")):
            state = nnx.state(module, wrt) if part == "trainable" else nnx.state(module)
            state.replace_by_pure_dict(restored["state"][part])
            nnx.update(module, state)
        trainer.state = nnx.state((model, optimizer))
        positions = restored["data"]["processes"]
        if len(positions) != jax.process_count():  # the shards differ: no data position to resume from
            raise ConfigError(f"the checkpoint at step {step} in {manager.directory} was written by {len(positions)} "
                              f"process(es), this run has {jax.process_count()}; resume with "
                              f"{len(positions)} or start the phase afresh in a new directory")
        data_iter.set_state(positions[jax.process_index()])
        return step
    return None
