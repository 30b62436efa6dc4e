"""The host memory policy (abscot_jax/hostmem.py): a large block freed by the process is reused
by the next allocation instead of being unmapped and faulted in afresh."""
import os
import subprocess
import sys

import pytest

# Allocates and frees a 64 MiB block, then allocates one again and prints the minor page faults
# of the second allocation, under the policy unless the environment opts out.
# (glibc's malloc directly: numpy may ask for transparent huge pages, which fault per 2 MiB.)
CHILD = """
import ctypes, resource
from abscot_jax.hostmem import keep_freed_memory
keep_freed_memory()
libc = ctypes.CDLL(None)
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, so faults count alike under any THP setting
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
size = 64 << 20
block = libc.malloc(size)
ctypes.memset(block, 1, size)
libc.free(block)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(size)
ctypes.memset(block, 1, size)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults_of_second_block(keep: str) -> int:
    env = {**os.environ, "ABSCOT_KEEP_FREED_MEMORY": keep}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the policy is glibc's mallopt")
def test_freed_block_is_reused():
    block_pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    # Without the policy glibc maps the block afresh (every page faults again); with it, the freed
    # block comes back from the heap and almost nothing faults.
    assert page_faults_of_second_block("0") >= block_pages
    assert page_faults_of_second_block("1") < block_pages // 10


def test_the_policy_applies_only_where_jax_computes_on_the_cpu(monkeypatch):
    import jax

    from abscot_jax import hostmem

    applied = []
    monkeypatch.setattr(hostmem, "keep_freed_memory", lambda: applied.append(True) or True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not hostmem.keep_freed_memory_on_cpu() and not applied  # an accelerator: left alone
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert hostmem.keep_freed_memory_on_cpu() and applied == [True]
