"""Test set-up: 8 CPU devices (before JAX is imported), small data made here."""

import os
import pathlib

# Several devices on one CPU, so the data-parallel engines run in every test session. The
# tests' tiny programs run a few steps each: their time is compilation's, which XLA's
# backend optimisation level 0 roughly halves (the whole suite: 5 min 52 s -> 3 min 52 s
# on a 2-core machine), the same programs generated with less optimised machine code.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# The MNIST classifier's default folder: one of this session's, never the user's.
os.environ["GENJAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="genjax-test-cache-")

# Tests build the same tiny programs many times: share compilations through a cache, every
# program however quick to build (at level 0 most take 20-50 ms, under genjax's own 0.25 s
# threshold). The experiments the tests start in processes of their own take the same cache
# and threshold from the environment (genjax.train.cli.enable_compile_cache, JAX's config):
# a 6-step VAE run in its own process took 8.5 s, 6.9 s with its programs cached.
_XLA_CACHE = tempfile.mkdtemp(prefix="genjax-test-xla-")
os.environ["GENJAX_COMPILE_CACHE"] = _XLA_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"

# A short play-shaped text: speaker names, line breaks, a small vocabulary.
_LINES = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
    "All:\nSpeak, speak.\n\n",
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n",
    "All:\nResolved. resolved.\n\n",
    "MENENIUS:\nWhat work's, my countrymen, in hand? where go you?\n\n",
]


@pytest.fixture(scope="session")
def play_text() -> str:
    """About 6,000 characters of repeated dialogue."""
    return "".join(_LINES) * 20


@pytest.fixture()
def text_file(tmp_path, play_text) -> pathlib.Path:
    path = tmp_path / "play.txt"
    path.write_text(play_text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def shakespeare_dir(tmp_path_factory) -> pathlib.Path:
    """A data folder holding ``tinyshakespeare/input.txt``: ``../shared/data`` where present,
    else the copy embedded in genjax (so the real-data tests run everywhere)."""
    if (SHARED_DATA / "tinyshakespeare" / "input.txt").is_file():
        return SHARED_DATA
    from genjax.data import embedded

    base = tmp_path_factory.mktemp("shakespeare")
    (base / "tinyshakespeare").symlink_to(embedded.shakespeare_dir())
    return base


@pytest.fixture(scope="session")
def mnist_dir() -> pathlib.Path:
    """A data folder holding ``mnist/t10k-*``: ``../shared/data`` where present, else the
    MNIST test set embedded in genjax."""
    if (SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz").is_file():
        return SHARED_DATA
    from genjax.data import embedded

    return embedded.EMBEDDED


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> pathlib.Path:
    """A data folder of learnable fake MNIST (see ``helpers.fake_digits``): 200 images,
    split 180 / 20 as the offline test-set split."""
    from helpers import fake_digits

    base = tmp_path_factory.mktemp("digits")
    fake_digits(base / "mnist", n_test=200)
    return base


@pytest.fixture(scope="session")
def digits_classifier(digits_dir, tmp_path_factory) -> pathlib.Path:
    """The run directory of an MNIST classifier trained by ``experiments.mnist_classifier``
    on ``digits_dir`` (it reaches 100% held-out accuracy there in 40 steps)."""
    from experiments import mnist_classifier

    run = tmp_path_factory.mktemp("classifier") / "run"
    record = mnist_classifier.main(["--data-dir", str(digits_dir), "--run-dir", str(run),
                                    "--max-iters", "40", "--eval-interval", "40",
                                    "--batch-size", "16", "--warmup-iters", "1",
                                    "--learning-rate", "3e-3"])
    assert record["accuracy"] >= 0.9, record
    return run
