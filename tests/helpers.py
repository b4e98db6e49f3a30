"""Tiny configurations that run the real training code in seconds."""

import dataclasses

from genjax.data.text import make_text_data, split_text
from genjax.models.gpt import GPTConfig
from genjax.tasks.gpt import make_task
from genjax.train.config import TrainConfig


def tiny_gpt_task(text, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0,
                  batch_size=8, eval_iters=2, dtype="float32"):
    data = make_text_data(*split_text(text), block_size=block_size)
    cfg = GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=block_size,
                    n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=dropout, dtype=dtype)
    return make_task(cfg, data, batch_size, eval_iters), cfg, data


def tiny_train_config(**kw):
    base = dict(max_iters=8, eval_interval=4, eval_iters=2, log_interval=2, batch_size=8,
                learning_rate=3e-3, lr_schedule="constant", weight_decay=0.01,
                parallel="none", devices=None, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def with_(cfg, **kw):
    return dataclasses.replace(cfg, **kw)


def fake_digits(folder, n_test=200, seed=0):
    """An MNIST-shaped IDX test set that a classifier learns in a few steps: digit c is a
    bright horizontal bar at rows 4 + 2c .. 6 + 2c over faint noise; labels 0..9 in turn."""
    import numpy as np

    from test_mnist_data import write_idx

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = np.arange(n_test) % 10
    images = rng.integers(0, 60, (n_test, 28, 28))
    for i, c in enumerate(labels):
        images[i, 4 + 2 * c:6 + 2 * c, 3:25] = 255
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels)
    return folder
