"""Lazy access to tensorflow-datasets.

``tensorflow_datasets`` is imported only on the TFDS code path, and TensorFlow only where
TFDS needs it (preparing a data set, reading one through ``tf.data``); it never takes the
GPU (``tf.config.set_visible_devices([], "GPU")``). Data sets prepared as ArrayRecord are
read through ``tfds.data_source`` without TensorFlow (Tiny Shakespeare loads in 2.2 s
instead of 8.4 s on a 2-core machine).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket


class DataUnavailableError(RuntimeError):
    """A data set is neither prepared nor obtainable here (no network, no local copy)."""


def import_tfds(with_tensorflow: bool = True):
    """Import ``tensorflow_datasets``; with ``with_tensorflow``, import TensorFlow first
    and hide every GPU from it (TFDS itself imports TensorFlow lazily, on first use)."""
    _quiet_tensorflow_start()  # (TFDS may import TensorFlow itself)
    if with_tensorflow:
        import_tensorflow()
    import tensorflow_datasets as tfds

    return tfds


def import_tensorflow():
    """Import TensorFlow with every GPU hidden from it (JAX keeps the accelerators), its
    C++ informational logs off unless ``TF_CPP_MIN_LOG_LEVEL`` says otherwise."""
    _quiet_tensorflow_start()
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    return tf


def _quiet_tensorflow_start() -> None:
    """Unless set already: TensorFlow's C++ informational logs off, and its oneDNN
    kernels too (TensorFlow only prepares and reads data sets here, no numerics; the oneDNN
    notice is printed before any log setting applies)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def network_reachable(host: str, port: int = 443, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout_s`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def quietly(tfds):
    """Build or prepare a data set without TFDS's progress bars (their download speeds are
    meaningless for a local file), its "Downloading and preparing" prints, absl's warnings
    (a missing ``dataset_info.json`` of a data set not prepared yet) or TensorFlow's C++
    start-up notices: the caller says in one line what is prepared from where."""
    from absl import logging as absl_logging
    from tensorflow_datasets.core.utils import tqdm_utils

    verbosity, bars = absl_logging.get_verbosity(), tqdm_utils._active
    absl_logging.set_verbosity(absl_logging.ERROR)
    tfds.disable_progress_bar()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl_logging.set_verbosity(verbosity)
        tfds.display_progress_bar(bars)


def default_data_dir() -> str:
    """The folder TFDS prepares data sets in when none is given: ``$TFDS_DATA_DIR``, else
    ``~/tensorflow_datasets`` (TFDS's default), expanded."""
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
