"""The two small data sets shipped inside genjax, the offline default when a data set is
neither prepared nor downloadable and no ``--data-dir`` is given.

- Tiny Shakespeare (``embedded/tinyshakespeare/input.txt.gz``, 433,627 bytes gzipped):
  the 1,115,394-character corpus of A. Karpathy's char-rnn and "Let's build GPT"
  (https://github.com/karpathy/char-rnn, ``data/tinyshakespeare/input.txt``); the plays'
  text is in the public domain. Decompressed, its sha256 is the one that
  ``tensorflow-datasets`` registers for ``tiny_shakespeare``, so TFDS prepares the data set
  from it (its ``manual_dir``) with the same splits as from the download.
- The MNIST test set (``embedded/mnist/t10k-{images-idx3,labels-idx1}-ubyte.gz``, 10,000
  images and labels in IDX format, 1.65 MB): Y. LeCun, C. Cortes, C. J. C. Burges, "The
  MNIST database of handwritten digits", licensed CC BY-SA 3.0. The images are the
  original ones (the file is re-gzipped). Offline, the image experiments split it 9,000
  for training and 1,000 held out (:func:`genjax.data.mnist.load_mnist_idx`).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import tempfile

EMBEDDED = pathlib.Path(__file__).resolve().parent / "embedded"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CACHE_ENV = "GENJAX_CACHE_DIR"


def mnist_dir() -> pathlib.Path:
    """The folder of the embedded MNIST test set's IDX files (a ``--data-dir`` for
    :func:`genjax.data.mnist.load_mnist_idx`)."""
    return EMBEDDED / "mnist"


def shakespeare_dir() -> pathlib.Path:
    """A folder holding Tiny Shakespeare's ``input.txt``, decompressed once from the embedded
    copy into ``$GENJAX_CACHE_DIR/data/tinyshakespeare`` (default ``~/.cache/genjax``) and
    checked against TFDS's sha256 (a copy that fails the check is written again).

    Raises:
      RuntimeError: the embedded copy itself does not have the registered checksum (a
        damaged installation).
    """
    base = os.environ.get(CACHE_ENV) or str(pathlib.Path("~/.cache/genjax").expanduser())
    folder = pathlib.Path(base) / "data" / "tinyshakespeare"
    target = folder / "input.txt"
    if target.is_file() and _sha256(target.read_bytes()) == SHAKESPEARE_SHA256:
        return folder
    raw = gzip.decompress((EMBEDDED / "tinyshakespeare" / "input.txt.gz").read_bytes())
    if _sha256(raw) != SHAKESPEARE_SHA256:
        raise RuntimeError("genjax's embedded Tiny Shakespeare does not have TFDS's checksum "
                           f"{SHAKESPEARE_SHA256}: reinstall genjax")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, delete=False) as f:  # whole or not at all
        f.write(raw)
    os.replace(f.name, target)
    return folder


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
