"""Host memory policy: freed memory stays in the process for the next allocation.

XLA's CPU runtime allocates every temporary buffer of a computation afresh on each call, and
glibc serves large blocks with mmap and unmaps them on free, so each training step touches its
temporaries as new pages: on the 2-core development VM (gVisor) a step of the benchmark model took
~500k page faults and 4-6 s of kernel time out of ~14 s of CPU. With one malloc arena, no mmap
for large blocks and no trimming of the heap, freed blocks are reused and the faults disappear.
The price: the process keeps its peak heap until it exits, and that peak can be about two calls'
temporaries (XLA may allocate a call's before freeing the previous call's). So the commands that
run computations over and over on the CPU apply it (the round driver's stage processes when JAX
computes on the CPU, eval, the step benchmarks; never an engine process, whose allocator belongs to
its engine); the conversions, whose point is a small peak, do not (flax_to_hf
with it: peak RSS 0.96 -> 1.70 GB, no faster). Opt out with ABSCOT_KEEP_FREED_MEMORY=0.
"""
from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
NEVER = -1  # as M_TRIM_THRESHOLD: never return the heap's top to the kernel (mallopt(3))


def keep_freed_memory() -> bool:
    """Apply the policy to this process (glibc only); True if it was applied. Call it before
    threads allocate: arenas that already exist are kept."""
    if os.environ.get("ABSCOT_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return all(mallopt(param, value) == 1 for param, value in (
        (M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER)))


def keep_freed_memory_on_cpu() -> bool:
    """The policy where JAX computes on the CPU, else nothing (an accelerator's buffers are not
    the host allocator's). Starts JAX's backend: call it after jax.distributed.initialize."""
    import jax  # this module is imported by processes that never start JAX

    return jax.default_backend() == "cpu" and keep_freed_memory()
