"""The host allocator's tuning (genjax.train.host): freed per-step buffers stay on warm pages."""

import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(not sys.platform.startswith("linux")
                           or platform.libc_ver()[0] != "glibc", reason="needs glibc")

# Like XLA:CPU's steps: rounds of step buffers written whole and freed; prints whether the
# tuning applied and the minor page faults per round, after three rounds. "thread": on a
# thread (its own malloc arena), two long-lived 25 MiB blocks (the state) fill most of the
# arena's 64 MiB heap, then each round a 21 MiB block (the step's temporaries). "main": on the
# main thread, three 30 MiB blocks a round, more than the top pad keeps. Transparent huge
# pages are off, so that every 4 KiB page counts as on any host.
_PROBE = r"""
import ctypes, resource, sys, threading
libc = ctypes.CDLL("libc.so.6")
assert libc.prctl(41, 1, 0, 0, 0) == 0  # PR_SET_THP_DISABLE
from genjax.train.host import tune_host_allocator
applied = tune_host_allocator()
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
MiB = 1024 * 1024
def write(n):
    p = libc.malloc(n); ctypes.memset(p, 1, n); return p
def one_round(sizes):
    for p in [write(n) for n in sizes]:
        libc.free(p)
faults = []
def steps(sizes):
    for _ in range(3):
        one_round(sizes)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        one_round(sizes)
    faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
def on_a_thread():
    libc.free(write(26 * MiB))  # raises glibc's own mmap threshold to 26 MiB
    state = [write(25 * MiB), write(25 * MiB)]
    steps([21 * MiB])
if sys.argv[1] == "thread":
    thread = threading.Thread(target=on_a_thread); thread.start(); thread.join()
else:
    steps([30 * MiB] * 3)
print(applied, faults[0])
"""


def _probe(mode="thread", **env):
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "GENJAX_TUNE_MALLOC")}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env={**clean, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", float(out[1])


@glibc
def test_tuned_malloc_reuses_the_pages_of_a_freed_step_buffer():
    applied, faults = _probe()
    assert applied and faults < 50, faults  # the same pages every round
    pages = 21 * 1024 * 1024 / 4096
    # glibc's defaults, and the thresholds without the top pad: the block does not fit in the
    # arena's heap, goes to a new heap each round, which glibc unmaps when the block is freed.
    applied, faults = _probe(GENJAX_TUNE_MALLOC="0")
    assert not applied
    assert faults > pages / 2
    applied, faults = _probe(MALLOC_MMAP_THRESHOLD_=str(32 * 1024 * 1024),
                             MALLOC_TRIM_THRESHOLD_=str(1024 ** 3))
    assert not applied
    assert faults > pages / 2


@glibc
def test_tuned_malloc_keeps_the_freed_main_heap():
    applied, faults = _probe("main")
    assert applied and faults < 50, faults
    # glibc's defaults, and the tuning without its trim threshold: the heap above the top pad
    # goes back to the kernel at each round's end.
    for env in ({"GENJAX_TUNE_MALLOC": "0"},
                {"MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),
                 "MALLOC_TOP_PAD_": str(64 * 1024 * 1024)}):
        applied, faults = _probe("main", **env)
        assert not applied
        assert faults > 20 * 1024 * 1024 / 4096, env


@glibc
def test_malloc_settings_of_the_environment_are_left_alone():
    assert _probe(MALLOC_ARENA_MAX="4")[0] is False
    assert _probe(GLIBC_TUNABLES="glibc.malloc.trim_threshold=100000")[0] is False
    assert _probe(GENJAX_TUNE_MALLOC="off")[0] is False
    assert _probe(GLIBC_TUNABLES="glibc.rtld.nns=2")[0] is True


def test_experiments_tune_the_allocator_on_a_cpu_backend(tmp_path, monkeypatch):
    import jax

    import genjax.train.host as host

    if jax.default_backend() != "cpu":
        pytest.skip("the tuning is for a CPU backend")
    from experiments import gpt_shakespeare as exp
    from genjax.train.cli import start_run

    calls = []
    monkeypatch.setattr(host, "tune_host_allocator", lambda: calls.append(1) or True)
    start_run(exp.Train(run_dir=str(tmp_path / "new")), 12, "gpt_shakespeare", check=False)
    assert calls == [1]
