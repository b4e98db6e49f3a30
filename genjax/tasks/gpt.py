"""The GPT's task: how the character-level GPT, Tiny Shakespeare batches and the
next-token loss meet :func:`genjax.train.loop.fit`."""

from __future__ import annotations

import dataclasses

import jax

from genjax.data.text import TextData, get_batch
from genjax.models.gpt import GPT, GPTConfig, make_loss_fn
from genjax.train.loop import Task


def checkpoint_model_meta(config: GPTConfig) -> dict:
    """The model config as a checkpoint records it: the architecture, without the compute
    ``dtype`` (the parameters are float32 either way, so a run may resume in the other
    dtype, and checkpoints of earlier versions still match) and, for the full model,
    without its ``stage`` (as checkpoints of earlier versions)."""
    meta = dataclasses.asdict(config)
    del meta["dtype"]
    if meta["stage"] == "full":
        del meta["stage"]
    return meta


def make_task(config: GPTConfig, data: TextData, batch_size: int, eval_iters: int,
              name: str = "gpt") -> Task:
    """The :class:`genjax.train.loop.Task` of a GPT trained on ``data``.

    Args:
      config: the model config; ``config.vocab_size`` must equal the tokenizer's.
      data: a :class:`genjax.data.text.TextData`.
      batch_size: the global batch size.
      eval_iters: random batches per split averaged by ``estimate_loss`` (the lecture's).

    Raises:
      ValueError: a vocabulary size that differs from the data's.
    """
    if config.vocab_size != data.tokenizer.vocab_size:
        raise ValueError(f"GPTConfig.vocab_size={config.vocab_size} but the data has "
                         f"{data.tokenizer.vocab_size} characters")
    model = GPT(config)
    T = config.block_size

    def train_batch(data_key, step, start, stop):
        return get_batch(data.train, jax.random.fold_in(data_key, step), batch_size, T,
                         start, stop)

    def eval_batch(split, key, start, stop):
        return get_batch(data.split(split), key, batch_size, T, start, stop)

    def eval_batches(split, key, start, stop):
        # The lecture's estimate_loss: eval_iters random batches of the split.
        for i in range(eval_iters):
            yield eval_batch(split, jax.random.fold_in(key, i), start, stop)

    return Task(
        name=name,
        init_params=model.init_params,
        loss_fn=make_loss_fn(model),
        train_batch=train_batch,
        eval_batches=eval_batches,
        eval_splits=("train", "val"),
        meta={"family": "gpt", "model": checkpoint_model_meta(config),
              "vocab": data.tokenizer.chars},
        items_per_example=T,
        item_name="tokens",
        batches_in_step=True,  # get_batch is jax.numpy only: drawn inside the train step
        eval_batch=eval_batch,  # and each evaluation is one program
        eval_iters=eval_iters,
    )


def config_from_checkpoint(meta: dict, params) -> GPTConfig:
    """The :class:`GPTConfig` of a checkpoint, checked against its parameters before any
    work: the saved vocabulary's length, the config's ``vocab_size``, the token embedding's
    rows and the ``lm_head``'s outputs must agree.

    Args:
      meta: the checkpoint's metadata (``family``, ``model``, ``vocab``).
      params: its GPT parameters (arrays or shape structs).

    Raises:
      ValueError: a checkpoint of another model family, a model config this version
        cannot build, or sizes that disagree, naming each number.
    """
    family = meta.get("family")
    if family != "gpt":
        raise ValueError(f"the checkpoint holds a {family!r} model, not a GPT: sample reads runs "
                         "of experiments.gpt_shakespeare")
    try:
        config = GPTConfig(**meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"the checkpoint's model config cannot be built ({e})") from None
    if config.stage == "bigram":  # the table's rows and columns
        table = params["bigram"]["token_embedding_table"]["embedding"].shape
        rows, outputs = table[0], ("the bigram table's columns", table[1])
    else:
        rows = params["token_embedding_table"]["embedding"].shape[0]
        outputs = ("lm_head's outputs", params["lm_head"]["kernel"].shape[-1])
    sizes = {"the saved vocabulary": len(meta.get("vocab") or ""),
             "the model config's vocab_size": config.vocab_size,
             "the token embedding's rows": rows, outputs[0]: outputs[1]}
    if len(set(sizes.values())) > 1:
        raise ValueError("the checkpoint disagrees with itself: " + ", ".join(
            f"{k} {v}" for k, v in sizes.items()) + "; it cannot be decoded reliably")
    return config
