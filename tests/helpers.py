"""Tiny configurations that run the real training code in seconds."""

import dataclasses

from genjax.data.text import make_text_data, split_text
from genjax.models.gpt import GPTConfig
from genjax.tasks.gpt import make_task
from genjax.train.config import TrainConfig


def tiny_gpt_task(text, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0,
                  batch_size=8, eval_iters=2):
    data = make_text_data(*split_text(text), block_size=block_size)
    cfg = GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=block_size,
                    n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=dropout)
    return make_task(cfg, data, batch_size, eval_iters), cfg, data


def tiny_train_config(**kw):
    base = dict(max_iters=8, eval_interval=4, eval_iters=2, log_interval=2, batch_size=8,
                learning_rate=3e-3, lr_schedule="constant", weight_decay=0.01,
                parallel="none", devices=None, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def with_(cfg, **kw):
    return dataclasses.replace(cfg, **kw)
