"""The host allocator's tuning (genjax.train.host): freed per-step buffers stay on warm pages."""

import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(not sys.platform.startswith("linux")
                           or platform.libc_ver()[0] != "glibc", reason="needs glibc")

# Like XLA:CPU's steps on a pool thread (its own malloc arena): two long-lived 25 MiB blocks
# (the state) fill most of the arena's 64 MiB heap, then rounds of a 21 MiB block (the step's
# temporaries) are written whole and freed; the minor page faults of a round, after three.
_PROBE = r"""
import ctypes, resource, sys, threading
from genjax.train.host import tune_host_allocator
applied = tune_host_allocator()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
MiB = 1024 * 1024
def write(n):
    p = libc.malloc(n); ctypes.memset(p, 1, n); return p
faults = []
def steps():
    libc.free(write(26 * MiB))  # raises glibc's own mmap threshold to 26 MiB
    state = [write(25 * MiB), write(25 * MiB)]
    for _ in range(3):
        libc.free(write(21 * MiB))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        libc.free(write(21 * MiB))
    faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
thread = threading.Thread(target=steps); thread.start(); thread.join()
print(applied, faults[0])
"""


def _probe(**env):
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "GENJAX_TUNE_MALLOC")}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", float(out[1])


@glibc
def test_tuned_malloc_reuses_the_pages_of_a_freed_step_buffer():
    applied, faults = _probe()
    assert applied
    assert faults < 50  # the same pages every round
    pages = 21 * 1024 * 1024 / 4096
    # glibc's defaults, and the thresholds without the top pad: the block does not fit in the
    # arena's heap, goes to a new heap each round, which glibc unmaps when the block is freed.
    applied, faults = _probe(GENJAX_TUNE_MALLOC="0")
    assert not applied
    assert faults > pages / 2
    applied, faults = _probe(MALLOC_MMAP_THRESHOLD_=str(32 * 1024 * 1024),
                             MALLOC_TRIM_THRESHOLD_=str(1024 ** 3))
    assert faults > pages / 2


@glibc
def test_malloc_settings_of_the_environment_are_left_alone():
    assert _probe(MALLOC_ARENA_MAX="4")[0] is False
    assert _probe(GLIBC_TUNABLES="glibc.malloc.trim_threshold=100000")[0] is False
    assert _probe(GLIBC_TUNABLES="glibc.rtld.nns=2")[0] is True


def test_experiments_tune_the_allocator_on_a_cpu_backend(tmp_path, monkeypatch):
    import genjax.train.host as host
    from experiments import gpt_shakespeare as exp
    from genjax.train.cli import start_run

    calls = []
    monkeypatch.setattr(host, "tune_host_allocator", lambda: calls.append(1) or True)
    start_run(exp.Train(run_dir=str(tmp_path / "new")), 12, "gpt_shakespeare", check=False)
    assert calls == [1]
