"""Device mesh, partition rules and multi-host start.

Every parameter declares logical axes beside itself (`axes=` metadata in the model); the rules
below map logical axes to the mesh axes `data`, `fsdp`, `tensor`. A dimension that the mesh axis
does not divide stays replicated, so the same rules serve a 2-layer toy and Qwen3-4B.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from abscot_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both; fsdp also splits the weights

# logical axis -> mesh axis or axes (None = replicated). Weights and activations share the names:
# an activation dimension that comes from a weight dimension is split like it.
LOGICAL_RULES = {
    "batch": BATCH_AXES,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "lora_rank": None,
    "new_tokens": None,
}

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one of them may be -1 to take the remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ConfigError("mesh: at most one of data/fsdp/tensor may be -1")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ConfigError(f"mesh {self} cannot fill {num_devices} devices: {num_devices} is not a multiple of {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ConfigError(
                f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
                f"but {num_devices} are available; set the sizes to multiply to {num_devices} (or use -1 for one axis)"
            )
        return tuple(sizes)


def check_tensor_split(num_heads: int, tensor: int) -> None:
    """Tensor parallelism splits attention by query heads: the tensor axis must divide them (key/value
    heads it does not divide stay whole on every device)."""
    if num_heads % tensor:
        raise ConfigError(f"mesh.tensor={tensor} must divide the model's {num_heads} attention heads; "
                          f"use a tensor size that divides {num_heads}")


def make_mesh(config: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = config.shape(len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def spec_for(axes: tuple[str | None, ...] | None, shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec for an array with the given logical axes; non-dividing axes stay replicated."""
    if not axes:
        return P()
    used = set()
    parts = []
    for name, size in zip(axes, shape):
        mesh_axes = LOGICAL_RULES.get(name) if name else None
        group = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        ways = math.prod(mesh.shape[a] for a in group)
        if not group or used.intersection(group) or size % ways:
            parts.append(None)
        else:
            parts.append(mesh_axes)
            used.update(group)
    return P(*parts)


def state_shardings(state: nnx.State, mesh: Mesh):
    """NamedShardings matching an `nnx.State` (params or optimizer state), from the `axes` metadata.

    Optimizer moments are Variables that inherit the metadata of their parameter, so the same
    rules shard them like the parameter they follow.
    """
    def one(var):
        if isinstance(var, nnx.Variable):
            value = var.get_value() if hasattr(var, "get_value") else var.value
            axes = var.get_metadata().get("axes")
            spec = spec_for(axes, getattr(value, "shape", ()), mesh) if axes and np.ndim(value) else P()
            return var.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Under a set mesh (`jax.set_mesh`), lay `x` out as its logical axes say, e.g. activations
    ("batch", None, "heads", None); a no-op without one. Without these constraints XLA is free to
    split activations over the feature axes and all-gather them, instead of doing FSDP/TP."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(axes, x.shape, mesh))


def gathered(w: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """A weight as FSDP uses it: whole over fsdp (all-gathered just before use, and its gradient
    reduce-scattered), still split over tensor. A no-op without a set mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return w
    spec = spec_for(axes, w.shape, mesh)
    return jax.lax.with_sharding_constraint(w, P(*(None if part == "fsdp" else part for part in spec)))


def set_device_memory_fraction(fraction: float) -> None:
    """Let XLA take `fraction` of each accelerator's memory. It is read when JAX starts its backends,
    so this must run before anything touches a device; afterwards it raises rather than do nothing."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"device memory fraction {fraction} is outside (0, 1]")
    from jax._src import xla_bridge

    if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
        raise RuntimeError("set_device_memory_fraction must run before JAX initialises its devices")
    previous = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    if previous is not None and float(previous) != fraction:
        log.info("XLA_PYTHON_CLIENT_MEM_FRACTION=%s replaced by train.device_memory_fraction=%s", previous, fraction)
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(fraction)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, **options) -> None:
    """Start multi-host JAX from flags, else the environment (ABSCOT_COORDINATOR, ABSCOT_NUM_PROCESSES,
    ABSCOT_PROCESS_ID), else the cluster environments jax detects itself (SLURM, ...).
    Does nothing for a single process. `options` go to `jax.distributed.initialize`
    (e.g. heartbeat_timeout_seconds: how soon the others stop when a process dies)."""
    coordinator_address = coordinator_address or os.environ.get("ABSCOT_COORDINATOR")
    if num_processes is None and "ABSCOT_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["ABSCOT_NUM_PROCESSES"])
    if process_id is None and "ABSCOT_PROCESS_ID" in os.environ:
        process_id = int(os.environ["ABSCOT_PROCESS_ID"])
    if coordinator_address is None and num_processes is None:
        if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            jax.distributed.initialize(**options)  # jax reads SLURM's variables itself
        return
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **options)
    log.info("process %d of %d started", jax.process_index(), jax.process_count())


def configure_logging(level: int = logging.INFO) -> None:
    """Send this package's log lines to stderr, tagged with the process index: several processes'
    logs are often read interleaved."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(
        f"[process {jax.process_index()}/{jax.process_count()}] %(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("abscot_jax")
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # a root handler (some libraries install one) would print each line again


def sync_processes(name: str) -> None:
    """Wait until every process gets here (no-op for one): what one process wrote before is there for all."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def gather_params(model: nnx.Module) -> None:
    """Replace `model`'s parameters, parts of which live on other processes, with whole copies on
    this process (a collective: every process calls it), so that it can be read or exported.
    A no-op for one process, whose devices are all addressable."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    params = multihost_utils.process_allgather(nnx.state(model, nnx.Param), tiled=True)
    nnx.update(model, jax.tree.map(jnp.asarray, params))
