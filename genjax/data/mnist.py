"""MNIST (Y. LeCun, C. Cortes, C. J. C. Burges): IDX files or ``tensorflow-datasets``.

Images come as float32 in [0, 1], shape (N, 28, 28, 1); labels as int32 (N,). Offline, a
folder with the IDX files (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``) is read directly; when it
holds only the 10,000 test images, they are split into 9,000 for training and 1,000 held out
(90/10) by a fixed permutation.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
import pathlib
from typing import Callable, Optional

import numpy as np

from genjax.data import embedded
from genjax.data.tfds import (default_data_dir, import_tensorflow, import_tfds,
                              network_reachable, quietly)

DATA_DIR_ENV = "GENJAX_DATA_DIR"
_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801
_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
HELDOUT_FRACTION = 0.1  # of a test-set-only folder: 10,000 images -> 9,000 / 1,000
_TFDS_HOST = "storage.googleapis.com"


@dataclasses.dataclass(frozen=True)
class ImageData:
    """Image classification data held in memory.

    Attributes:
      train_images, test_images: float32 (N, 28, 28, 1) in [0, 1].
      train_labels, test_labels: int32 (N,).
      source: where the data came from, in words.
      split_name: which split this is, as a name for files kept per split (the MNIST
        classifier's cache): ``mnist`` (the standard 60,000 / 10,000) or
        ``mnist-test-split`` (the 10,000 test images split 9,000 / 1,000).
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str = ""
    split_name: str = "mnist"

    def without_digit(self, digit: int) -> "ImageData":
        """The same data with ``digit`` removed from the training split only."""
        keep = self.train_labels != digit
        return dataclasses.replace(self, train_images=self.train_images[keep],
                                   train_labels=self.train_labels[keep])


def read_idx(path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) as a uint8 array.

    Raises:
      ValueError: a wrong magic number, a wrong dtype code or a size that does not match
        the header (truncated file), naming the file.
    """
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: unreadable IDX file ({e})") from None
    if len(raw) < 8:
        raise ValueError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in (_IMAGES_MAGIC, _LABELS_MAGIC):
        raise ValueError(f"{path}: magic number {magic:#010x} is not MNIST's "
                         f"({_IMAGES_MAGIC:#010x} images, {_LABELS_MAGIC:#010x} labels)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says {shape} = {expected} bytes of data but the file "
                         f"holds {len(raw) - header}: truncated or malformed")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _find(folder: pathlib.Path, stem: str) -> Optional[pathlib.Path]:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _as_float_images(raw: np.ndarray, path) -> np.ndarray:
    if raw.ndim != 3 or raw.shape[1:] != (28, 28):
        raise ValueError(f"{path}: images of shape {raw.shape[1:]}, expected (28, 28)")
    return (raw.astype(np.float32) / 255.0)[..., None]


def load_mnist_idx(data_dir, log: Callable[[str], None] = print) -> ImageData:
    """MNIST from IDX files in ``data_dir/mnist`` or ``data_dir``.

    Raises:
      FileNotFoundError: no test image/label files there (an empty folder).
      ValueError: a malformed file (see :func:`read_idx`) or image/label counts that differ.
    """
    base = pathlib.Path(data_dir).expanduser()
    folder = next((d for d in (base / "mnist", base)
                   if _find(d, _FILES["test_images"]) and _find(d, _FILES["test_labels"])), None)
    if folder is None:
        raise FileNotFoundError(f"--data-dir {data_dir}: no MNIST IDX files "
                                f"({_FILES['test_images']}[.gz] and {_FILES['test_labels']}[.gz]) "
                                f"in {base / 'mnist'} or {base}")

    def pair(split):
        ip, lp = _find(folder, _FILES[f"{split}_images"]), _find(folder, _FILES[f"{split}_labels"])
        if ip is None or lp is None:
            return None
        images, labels = _as_float_images(read_idx(ip), ip), read_idx(lp).astype(np.int32)
        if len(images) != len(labels):
            raise ValueError(f"{ip} has {len(images)} images but {lp} has {len(labels)} labels")
        return images, labels

    test = pair("test")
    train = pair("train")
    if train is not None:
        return ImageData(*train, *test, source=f"IDX files in {folder}")
    n = len(test[0])
    n_test = max(1, round(HELDOUT_FRACTION * n))
    perm = np.random.default_rng(0).permutation(n)
    tr, te = perm[:n - n_test], perm[n - n_test:]
    log(f"only the {len(test[0]):,} MNIST test images are in {folder}: training on "
        f"{len(tr):,} of them and holding out {len(te):,} (a fixed permutation)")
    return ImageData(test[0][tr], test[1][tr], test[0][te], test[1][te],
                     source=f"{folder}, test set split {len(tr)}/{len(te)}",
                     split_name="mnist-test-split")


def load_mnist(data_dir=None, tfds_data_dir=None, log: Callable[[str], None] = print) -> ImageData:
    """MNIST from IDX files (``data_dir``, default ``$GENJAX_DATA_DIR``), else through TFDS,
    else the test set embedded in genjax.

    Through TFDS, ``mnist`` is prepared once as ArrayRecord and read back without importing
    TensorFlow (a copy prepared earlier as TFRecord is read through ``tf.data``). When it is
    not prepared and its download host cannot be reached, the 10,000-image test set shipped
    with genjax (:mod:`genjax.data.embedded`) is used, split 9,000 / 1,000, saying so in one
    line; TensorFlow is not imported on that path.

    Raises:
      FileNotFoundError, ValueError: see :func:`load_mnist_idx`.
    """
    data_dir = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if data_dir is not None:
        return load_mnist_idx(data_dir, log)
    tfds = import_tfds(with_tensorflow=False)
    with quietly(tfds):
        builder = tfds.builder("mnist", data_dir=tfds_data_dir)
        if not builder.is_prepared() and importlib.util.find_spec("array_record") is not None:
            builder = tfds.builder("mnist", data_dir=tfds_data_dir, file_format="array_record")
        prepared = builder.is_prepared()
    if not prepared:
        if not network_reachable(_TFDS_HOST):
            log("mnist is not prepared and there is no network to download it: using the "
                "MNIST test set embedded in genjax (--data-dir DIR or GENJAX_DATA_DIR "
                "points to other IDX files)")
            return load_mnist_idx(embedded.mnist_dir(), log)
        log(f"preparing mnist once, from its download, in {tfds_data_dir or default_data_dir()}")
        import_tensorflow()
        with quietly(tfds):
            builder.download_and_prepare()

    def split(name):
        if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
            source = builder.as_data_source(split=name)
            examples = [source[i] for i in range(len(source))]
            images = np.stack([np.asarray(ex["image"]) for ex in examples])[..., 0]
            labels = np.asarray([ex["label"] for ex in examples])
        else:  # TFRecord, prepared by an earlier genjax: tf.data
            import_tensorflow()
            parts = list(tfds.as_numpy(builder.as_dataset(split=name, batch_size=10_000)))
            images = np.concatenate([p["image"] for p in parts])[..., 0]
            labels = np.concatenate([p["label"] for p in parts])
        return _as_float_images(images, f"tfds mnist {name}"), labels.astype(np.int32)

    return ImageData(*split("train"), *split("test"), source="tensorflow-datasets mnist")


def epoch_batch_indices(key, step: int, n_examples: int, batch_size: int, start: int = 0,
                        stop: Optional[int] = None) -> np.ndarray:
    """Indices ``[start, stop)`` of the global batch of ``step``: one epoch is one
    permutation of the examples drawn with ``fold_in(key, epoch)``; the last incomplete
    batch of an epoch is dropped.

    Raises:
      ValueError: ``batch_size`` larger than the number of examples.
    """
    steps_per_epoch = n_examples // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {batch_size} exceeds the {n_examples} training examples")
    epoch, i = divmod(step, steps_per_epoch)
    perm = _permutation(key, epoch, n_examples)
    return perm[i * batch_size: (i + 1) * batch_size][start:stop]


_perm_cache: dict = {}


def _permutation(key, epoch: int, n: int) -> np.ndarray:
    """``permutation(fold_in(key, epoch), n)`` as a NumPy array, computed once per epoch:
    within an epoch a step costs the host no device work (a ``fold_in`` per step would wait
    for the device to finish the step in flight)."""
    import jax

    k = (np.asarray(key).tobytes(), epoch, n)
    if k not in _perm_cache:
        _perm_cache.clear()  # one epoch's permutation at a time
        _perm_cache[k] = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
    return _perm_cache[k]


def check_batch_fits(batch_size: int, n_train: int, n_test: int, per_example: int = 1) -> None:
    """Refuse a global batch that the data cannot fill: ``batch_size * per_example``
    training images per step, ``batch_size`` held-out images per evaluation batch.

    Raises:
      ValueError: naming the batch and the set that is too small.
    """
    if batch_size * per_example > n_train:
        what = f"{batch_size} x {per_example} = {batch_size * per_example}" if per_example > 1 \
            else f"{batch_size}"
        raise ValueError(f"--batch-size {batch_size}: a step takes {what} training images, but "
                         f"there are {n_train}: choose a smaller batch")
    if batch_size > n_test:
        raise ValueError(f"--batch-size {batch_size}: an evaluation batch takes {batch_size} "
                         f"held-out images, but there are {n_test}: choose a batch of at most "
                         f"{n_test}")


def image_batch_fns(data: ImageData, batch_size: int):
    """The batch functions of :class:`genjax.train.loop.Task` for image data.

    Returns:
      ``(train_batch, eval_batches)``: ``train_batch(data_key, step, start, stop)`` gives
      ``(images, labels)`` of the epoch-permuted batch of ``step`` (see
      :func:`epoch_batch_indices`); ``eval_batches('test', key, start, stop)`` yields the
      held-out images in order, in global batches of ``batch_size`` (a final remainder
      smaller than a batch is left out of this running estimate).

    Raises:
      ValueError: ``batch_size`` larger than the training or the held-out set.
    """
    n_train, n_test = len(data.train_images), len(data.test_images)
    check_batch_fits(batch_size, n_train, n_test)

    def train_batch(data_key, step, start, stop):
        idx = epoch_batch_indices(data_key, step, n_train, batch_size, start, stop)
        return data.train_images[idx], data.train_labels[idx]

    def eval_batches(split, key, start, stop):
        if split != "test":
            raise ValueError(f"image data evaluates the 'test' split, not {split!r}")
        for lo in range(0, n_test - batch_size + 1, batch_size):
            yield data.test_images[lo + start:lo + stop], data.test_labels[lo + start:lo + stop]

    return train_batch, eval_batches
