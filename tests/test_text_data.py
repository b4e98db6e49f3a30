import hashlib
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from genjax.data import embedded
from genjax.data import text as T


def test_tokenizer_round_trip_and_sorted_vocab(play_text):
    tok = T.CharTokenizer.from_text(play_text)
    assert tok.chars == "".join(sorted(set(play_text)))
    ids = tok.encode(play_text)
    assert ids.dtype == np.int32 and ids.shape == (len(play_text),)
    assert tok.decode(ids) == play_text
    assert tok.encode("\n")[0] == 0  # newline sorts first, the lecture's start token


def test_unknown_character_raises_naming_it(play_text):
    tok = T.CharTokenizer.from_text(play_text)
    with pytest.raises(ValueError, match=r"'#' at position 3"):
        tok.encode("All#")
    with pytest.raises(ValueError, match="ids must lie"):
        tok.decode([tok.vocab_size])


def test_split_is_first_90_percent():
    text = "abcdefghij" * 11  # 110 characters
    train, val = T.split_text(text)
    assert len(train) == 99 and train + val == text
    # Tiny Shakespeare's sizes: the lecture's n = int(0.9 * len(data)).
    assert int(0.9 * 1_115_394) == 1_003_854


def test_batches_are_shifted_windows_and_keyed(play_text):
    data = T.make_text_data(*T.split_text(play_text), block_size=8)
    x, y = T.get_batch(data.train, jax.random.PRNGKey(0), 4, 8)
    assert x.shape == y.shape == (4, 8) and x.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    train = np.asarray(data.train)
    for row_x, row_y in zip(np.asarray(x), np.asarray(y)):
        start = next(i for i in range(len(train) - 8) if (train[i:i + 8] == row_x).all()
                     and (train[i + 1:i + 9] == row_y).all())
        assert start < len(train) - 8
    x2, _ = T.get_batch(data.train, jax.random.PRNGKey(0), 4, 8)
    np.testing.assert_array_equal(x, x2)
    # A share [start, stop) is that slice of the global batch.
    xs, ys = T.get_batch(data.train, jax.random.PRNGKey(0), 4, 8, 2, 4)
    np.testing.assert_array_equal(xs, x[2:4])


def test_text_shorter_than_block_raises():
    with pytest.raises(ValueError, match="fewer than block_size \\+ 1 = 65"):
        T.make_text_data("a" * 100, "b" * 10, block_size=64)


def test_text_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        T.read_text_file(tmp_path / "missing.txt")
    with pytest.raises(IsADirectoryError, match="is a directory: .* goes to --data-dir"):
        T.read_text_file(tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="not UTF-8"):
        T.read_text_file(bad)


def test_offline_without_data_dir_prepares_the_embedded_copy(tmp_path):
    # In its own process, as a first run would: one line, no TFDS bars, absl warnings or
    # TensorFlow start-up notices.
    code = ("import genjax.data.text as T; T.network_reachable = lambda *a, **k: False; "
            "tr, va = T.load_tiny_shakespeare(); print(len(tr), len(va))")
    # (TFDS's own default folder, named in the line)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "GENJAX_DATA_DIR": "",
                                          "GENJAX_CACHE_DIR": str(tmp_path / "cache"),
                                          "TFDS_DATA_DIR": str(tmp_path / "tfds")})
    assert out.stderr == ""
    assert out.stdout.splitlines() == [
        "preparing tiny_shakespeare once, from the copy embedded in genjax (no network, no "
        f"--data-dir), in {tmp_path / 'tfds'}",
        "1003854 111540"]  # TFDS's splits, as from the download
    copy = tmp_path / "cache" / "data" / "tinyshakespeare" / "input.txt"
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == embedded.SHAKESPEARE_SHA256


def test_a_damaged_decompressed_copy_is_written_again(tmp_path, monkeypatch):
    monkeypatch.setenv("GENJAX_CACHE_DIR", str(tmp_path))
    copy = embedded.shakespeare_dir() / "input.txt"
    copy.write_text("damaged")
    assert embedded.shakespeare_dir() == copy.parent
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == embedded.SHAKESPEARE_SHA256


def test_data_dir_without_input_txt(tmp_path):
    with pytest.raises(FileNotFoundError, match="found neither"):
        T.load_tiny_shakespeare(data_dir=tmp_path, tfds_data_dir=tmp_path / "tfds")


def test_tfds_manual_dir_prepares_offline(shakespeare_dir, tmp_path):
    train, val = T.load_tiny_shakespeare(data_dir=shakespeare_dir, tfds_data_dir=tmp_path)
    assert (len(train), len(val)) == (1_003_854, 111_540)
    full = (shakespeare_dir / "tinyshakespeare" / "input.txt").read_text()
    assert (train, val) == T.split_text(full)  # TFDS's splits are the lecture's 90/10
    assert T.CharTokenizer.from_text(train + val).vocab_size == 65
    assert math.isclose(len(train) / len(full), 0.9, abs_tol=1e-6)
    # Prepared as ArrayRecord: a later run reads it back without importing TensorFlow.
    code = ("import sys; from genjax.data.text import load_tiny_shakespeare as load; "
            f"tr, va = load(tfds_data_dir={str(tmp_path)!r}); "
            "print(len(tr), len(va), 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "GENJAX_DATA_DIR": ""}, check=True)
    assert out.stdout.split() == ["1003854", "111540", "False"]


def test_tfds_mock_data(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(T, "network_reachable", lambda *a, **k: True)  # mock_data downloads nothing
    with tfds.testing.mock_data(num_examples=1):
        train, val = T.load_tiny_shakespeare(data_dir=None, tfds_data_dir=tmp_path)
    assert isinstance(train, str) and isinstance(val, str)
