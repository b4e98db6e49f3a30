import gzip
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from genjax.data import mnist as M


def write_idx(path, array, magic=None, truncate=0):
    array = np.asarray(array, np.uint8)
    magic = magic if magic is not None else (0x803 if array.ndim == 3 else 0x801)
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + array.tobytes()
    raw = raw[:len(raw) - truncate] if truncate else raw
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def fake_mnist(folder, n_test=50, n_train=None, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    write_idx(folder / f"t10k-images-idx3-ubyte{ext}", rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(folder / f"t10k-labels-idx1-ubyte{ext}", np.arange(n_test) % 10)
    if n_train:
        write_idx(folder / f"train-images-idx3-ubyte{ext}", rng.integers(0, 256, (n_train, 28, 28)))
        write_idx(folder / f"train-labels-idx1-ubyte{ext}", np.arange(n_train) % 10)
    return folder


def test_idx_round_trip_gz_and_plain(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28))
    for name in ("a-idx3-ubyte", "b-idx3-ubyte.gz"):
        np.testing.assert_array_equal(M.read_idx(write_idx(tmp_path / name, images)), images)


def test_bad_idx_files_name_the_file(tmp_path):
    images = np.zeros((3, 28, 28))
    bad = write_idx(tmp_path / "magic-idx3-ubyte", images, magic=0x1234)
    with pytest.raises(ValueError, match="magic-idx3-ubyte: magic number 0x00001234"):
        M.read_idx(bad)
    cut = write_idx(tmp_path / "cut-idx3-ubyte.gz", images, truncate=100)
    with pytest.raises(ValueError, match="cut-idx3-ubyte.gz: header says \\(3, 28, 28\\)"):
        M.read_idx(cut)
    broken = tmp_path / "broken-idx3-ubyte.gz"
    broken.write_bytes(gzip.compress(b"x" * 100)[:20])
    with pytest.raises(ValueError, match="broken-idx3-ubyte.gz"):
        M.read_idx(broken)


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no MNIST IDX files"):
        M.load_mnist(tmp_path)


def test_full_idx_set_and_value_ranges(tmp_path):
    data = M.load_mnist(fake_mnist(tmp_path / "mnist", n_test=20, n_train=30), log=lambda s: None)
    assert data.train_images.shape == (30, 28, 28, 1) and data.test_images.shape == (20, 28, 28, 1)
    assert data.train_images.dtype == np.float32 and data.train_labels.dtype == np.int32
    assert 0.0 <= data.train_images.min() and data.train_images.max() <= 1.0


def test_test_set_only_is_split_9000_1000(mnist_dir):
    messages = []
    data = M.load_mnist(mnist_dir, log=messages.append)  # ../shared/data/mnist
    assert len(data.train_images) == 9000 and len(data.test_images) == 1000
    assert any("holding out 1,000" in m for m in messages)
    all_images = np.concatenate([data.train_images, data.test_images])
    assert abs(float(all_images.mean()) * 255 - 33.79) < 0.01  # the README's mean pixel
    counts = np.bincount(np.concatenate([data.train_labels, data.test_labels]))
    assert counts.tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    again = M.load_mnist(mnist_dir, log=lambda s: None)
    np.testing.assert_array_equal(again.test_labels, data.test_labels)  # deterministic


def test_one_epoch_is_one_permutation():
    key = jax.random.PRNGKey(0)
    epoch0 = np.concatenate([M.epoch_batch_indices(key, s, 20, 5) for s in range(4)])
    epoch1 = np.concatenate([M.epoch_batch_indices(key, s, 20, 5) for s in range(4, 8)])
    assert sorted(epoch0.tolist()) == list(range(20)) == sorted(epoch1.tolist())
    assert epoch0.tolist() != epoch1.tolist()
    np.testing.assert_array_equal(M.epoch_batch_indices(key, 2, 20, 5, 1, 3),
                                  M.epoch_batch_indices(key, 2, 20, 5)[1:3])
    with pytest.raises(ValueError, match="batch size 30 exceeds the 20"):
        M.epoch_batch_indices(key, 0, 20, 30)


def test_tfds_path_with_mock_data(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.delenv(M.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(M, "network_reachable", lambda *a, **k: True)  # mock_data downloads nothing
    with tfds.testing.mock_data(num_examples=12):
        data = M.load_mnist(None, tfds_data_dir=tmp_path)
    assert data.train_images.shape == (12, 28, 28, 1) and data.test_images.shape == (12, 28, 28, 1)
    assert data.train_images.dtype == np.float32 and 0 <= data.train_images.min() <= data.train_images.max() <= 1
    assert data.train_labels.dtype == np.int32 and data.source == "tensorflow-datasets mnist"


def test_offline_without_data_dir_uses_the_embedded_test_set(tmp_path, monkeypatch):
    monkeypatch.delenv(M.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(M, "network_reachable", lambda *a, **k: False)
    messages = []
    data = M.load_mnist(None, tfds_data_dir=tmp_path, log=messages.append)
    assert "using the MNIST test set embedded in genjax" in messages[0]
    assert (len(data.train_images), len(data.test_images)) == (9000, 1000)
    counts = np.bincount(np.concatenate([data.train_labels, data.test_labels]))
    assert counts.tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert data.split_name == "mnist-test-split"
    # and TensorFlow is never imported on this path (9 s of a failing start before)
    code = ("import sys; import genjax.data.mnist as M; M.network_reachable = lambda *a, **k: "
            f"False; d = M.load_mnist(None, tfds_data_dir={str(tmp_path)!r}, log=lambda s: 0); "
            "print(len(d.train_images), 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "GENJAX_DATA_DIR": ""}, check=True)
    assert out.stdout.split() == ["9000", "False"]
