"""Character-level text data: Tiny Shakespeare through TFDS or any UTF-8 file.

The character tokenizer and the random batches of "Let's build GPT" (A. Karpathy, 2023):
the vocabulary is the sorted set of the corpus's characters, the first 90% of the text
trains and the last 10% validates, and a batch is ``batch_size`` random windows of
``block_size + 1`` characters (inputs and the next-character targets).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pathlib
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from genjax.data import embedded
from genjax.data.tfds import (default_data_dir, import_tensorflow, import_tfds,
                              network_reachable, quietly)

TRAIN_FRACTION = 0.9
DATA_DIR_ENV = "GENJAX_DATA_DIR"
_SHAKESPEARE_HOST = "raw.githubusercontent.com"  # where TFDS downloads tiny_shakespeare


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """Maps characters to int ids 0..V-1 in sorted order, and back.

    Attributes:
      chars: the vocabulary, a string of V distinct characters in sorted order.
    """

    chars: str

    def __post_init__(self):
        if len(set(self.chars)) != len(self.chars) or list(self.chars) != sorted(self.chars):
            raise ValueError("CharTokenizer.chars must be distinct characters in sorted order")
        object.__setattr__(self, "_stoi", {c: i for i, c in enumerate(self.chars)})

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The vocabulary of ``text``: its sorted distinct characters."""
        if not text:
            raise ValueError("cannot build a vocabulary from an empty text")
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """int32 ids, shape (len(text),).

        Raises:
          ValueError: a character outside the vocabulary, named with its position.
        """
        stoi = self._stoi
        try:
            return np.fromiter((stoi[c] for c in text), dtype=np.int32, count=len(text))
        except KeyError as e:
            pos = next(i for i, c in enumerate(text) if c not in stoi)
            raise ValueError(f"character {e.args[0]!r} at position {pos} is not in the "
                             f"{self.vocab_size}-character vocabulary") from None

    def decode(self, ids: Sequence[int]) -> str:
        """The text of int ids in [0, V).

        Raises:
          ValueError: an id outside [0, V), or ids that are not integers.
        """
        ids = np.asarray(ids).reshape(-1)
        if ids.size and not (np.issubdtype(ids.dtype, np.integer) or ids.dtype == bool):
            raise ValueError(f"ids must be integers in [0, {self.vocab_size}), got dtype "
                             f"{ids.dtype} (e.g. {ids[0]!r})")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got range "
                             f"[{ids.min()}, {ids.max()}]")
        return "".join(self.chars[i] for i in ids.tolist())

    def id_of(self, char: str, default: int = 0) -> int:
        """The id of ``char``, or ``default`` when it is not in the vocabulary."""
        return self._stoi.get(char, default)


def split_text(text: str, train_fraction: float = TRAIN_FRACTION) -> tuple[str, str]:
    """The lecture's split: the first ``int(train_fraction * len(text))`` characters train,
    the rest validate."""
    n = int(train_fraction * len(text))
    return text[:n], text[n:]


def read_text_file(path) -> str:
    """A UTF-8 text file's contents.

    Raises:
      FileNotFoundError: no such file. IsADirectoryError: a directory. ValueError: not
        UTF-8, or empty.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"--text-file {path} is a directory: give a UTF-8 text file "
                                "(a folder holding input.txt goes to --data-dir)")
    if not path.is_file():
        raise FileNotFoundError(f"--text-file {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--text-file {path} is not UTF-8 text ({e})") from None
    if not text:
        raise ValueError(f"--text-file {path} is empty")
    return text


def find_manual_input(data_dir) -> Optional[pathlib.Path]:
    """The folder holding Tiny Shakespeare's ``input.txt`` under ``data_dir``
    (``data_dir/tinyshakespeare/`` or ``data_dir/`` itself), or None."""
    if data_dir is None:
        return None
    base = pathlib.Path(data_dir).expanduser()
    for folder in (base / "tinyshakespeare", base):
        if (folder / "input.txt").is_file():
            return folder
    return None


def load_tiny_shakespeare(data_dir=None, tfds_data_dir=None,
                          log: Callable[[str], None] = print) -> tuple[str, str]:
    """Tiny Shakespeare's (train, validation) text through ``tensorflow-datasets``.

    Train is TFDS's ``train`` split (the first 1,003,854 characters, 90%), validation its
    ``validation`` and ``test`` splits joined (the last 10%), the lecture's split.

    Args:
      data_dir: a folder holding ``input.txt`` (or ``tinyshakespeare/input.txt``), given to
        TFDS as its ``manual_dir`` so it prepares the data set offline. Default: the
        environment variable ``GENJAX_DATA_DIR``.
        Without one, when the data set is not prepared and the download host cannot be
        reached, TFDS prepares it from the copy embedded in genjax
        (:mod:`genjax.data.embedded`, the same file and checksum), saying so in one line.
      tfds_data_dir: where TFDS keeps prepared data sets (TFDS's default if None).
      log: where the one line about preparing the data set goes.

    Raises:
      FileNotFoundError: ``data_dir`` given but holds no ``input.txt``.
    """
    data_dir = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    manual = find_manual_input(data_dir)
    if data_dir is not None and manual is None:
        raise FileNotFoundError(
            f"--data-dir {data_dir}: found neither {data_dir}/tinyshakespeare/input.txt nor "
            f"{data_dir}/input.txt")
    tfds = import_tfds(with_tensorflow=False)
    # Prepared as ArrayRecord, the data set is read back with ``tfds.data_source``, which
    # needs no TensorFlow; only preparing it (once) imports TensorFlow. A copy prepared
    # earlier as TFRecord is read as it is, through tf.data.
    with quietly(tfds):
        builder = tfds.builder("tiny_shakespeare", data_dir=tfds_data_dir)
        if not builder.is_prepared() and importlib.util.find_spec("array_record") is not None:
            # (array_record, a TFDS dependency on Linux only: elsewhere TFRecord is kept)
            builder = tfds.builder("tiny_shakespeare", data_dir=tfds_data_dir,
                                   file_format="array_record")
        prepared = builder.is_prepared()
    if not prepared:
        if manual is not None:
            source = f"{manual / 'input.txt'}"
        elif network_reachable(_SHAKESPEARE_HOST):
            source = "its download"
        else:
            manual = embedded.shakespeare_dir()
            source = "the copy embedded in genjax (no network, no --data-dir)"
        log(f"preparing tiny_shakespeare once, from {source}, in "
            f"{tfds_data_dir or default_data_dir()}")
        import_tensorflow()
        config = tfds.download.DownloadConfig(manual_dir=str(manual) if manual else None)
        with quietly(tfds):
            builder.download_and_prepare(download_config=config)

    def split_text_of(split: str) -> str:
        if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
            source = builder.as_data_source(split=split)
            examples = (source[i] for i in range(len(source)))
        else:  # TFRecord (prepared earlier, or without array_record): tf.data
            import_tensorflow()
            examples = tfds.as_numpy(builder.as_dataset(split=split))
        texts = (ex["text"] for ex in examples)  # bytes (str from TFDS's mock data)
        return "".join(t.decode("utf-8") if isinstance(t, bytes) else t for t in texts)

    return split_text_of("train"), split_text_of("validation") + split_text_of("test")


@dataclasses.dataclass(frozen=True)
class TextData:
    """An encoded corpus split for training.

    Attributes:
      tokenizer: the corpus's :class:`CharTokenizer`.
      train: int32 ids of the training text, shape (N_train,), on the default device.
      val: int32 ids of the validation text, shape (N_val,).
    """

    tokenizer: CharTokenizer
    train: jax.Array
    val: jax.Array

    def split(self, name: str) -> jax.Array:
        """The ids of split ``train`` or ``val``; ``ValueError`` otherwise."""
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val


def make_text_data(train_text: str, val_text: str, block_size: int) -> TextData:
    """Encode the two splits with the vocabulary of their union.

    Raises:
      ValueError: a split shorter than ``block_size + 1`` characters (no full window).
    """
    for name, text in (("training", train_text), ("validation", val_text)):
        if len(text) < block_size + 1:
            raise ValueError(f"the {name} text has {len(text)} characters, fewer than "
                             f"block_size + 1 = {block_size + 1}: use a longer text or a "
                             "smaller --block-size")
    tok = CharTokenizer.from_text(train_text + val_text)
    return TextData(tok, jnp.asarray(tok.encode(train_text)), jnp.asarray(tok.encode(val_text)))


def load_text_data(block_size: int, data_dir=None, text_file=None, tfds_data_dir=None) -> TextData:
    """Tiny Shakespeare through TFDS, or ``text_file`` split 90/10; see :func:`make_text_data`."""
    if text_file is not None:
        train_text, val_text = split_text(read_text_file(text_file))
    else:
        train_text, val_text = load_tiny_shakespeare(data_dir, tfds_data_dir)
    return make_text_data(train_text, val_text, block_size)


@functools.partial(jax.jit, static_argnames=("batch_size", "block_size", "start", "stop"))
def get_batch(data: jax.Array, key: jax.Array, batch_size: int, block_size: int,
              start: int = 0, stop: Optional[int] = None):
    """Examples ``[start, stop)`` of the random batch drawn with ``key``.

    The windows start uniformly in [0, N - block_size), as the lecture's
    ``torch.randint(len(data) - block_size, (batch_size,))``. The whole batch depends on
    ``key`` alone, so every process and device count sees the same global batch.

    Args:
      data: int32 token ids (N,), N > block_size.
      key: PRNG key.
      batch_size: the global batch size B.
      block_size: the window length T.
      start, stop: the slice of the global batch to return (this process's share).

    Returns:
      ``(x, y)``: int32 arrays (stop - start, T); ``y[b, t] = x[b, t + 1]`` continued
      by one character.
    """
    starts = jax.random.randint(key, (batch_size,), 0, data.shape[0] - block_size)[start:stop]
    idx = starts[:, None] + jnp.arange(block_size)[None, :]  # (B, T)
    return data[idx], data[idx + 1]
