"""Lazy access to tensorflow-datasets: TensorFlow is imported only on this code path, and
never takes the GPU (``tf.config.set_visible_devices([], "GPU")``)."""

from __future__ import annotations

import socket


class DataUnavailableError(RuntimeError):
    """A data set is neither prepared nor obtainable here (no network, no local copy)."""


def import_tfds():
    """Import ``tensorflow_datasets`` with TensorFlow hidden from every GPU."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    import tensorflow_datasets as tfds

    return tfds


def network_reachable(host: str, port: int = 443, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout_s`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False
