"""Optimizers and learning-rate schedules (optax), shared by every model family."""

from __future__ import annotations

import optax
import jax

from genjax.train.config import TrainConfig


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """The learning rate as a function of the step (number of updates already done).

    ``constant``: ``learning_rate`` throughout (the lecture's ``torch.optim.AdamW``).
    ``cosine``: linear warm-up from 0 over ``warmup_iters`` steps, then cosine decay to
    ``min_lr`` at ``lr_decay_iters``, constant afterwards (nanoGPT's ``get_lr``;
    I. Loshchilov and F. Hutter, "SGDR", ICLR 2017).
    """
    if cfg.lr_schedule == "constant":
        return optax.constant_schedule(cfg.learning_rate)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_iters,
        decay_steps=cfg.lr_decay_iters,
        end_value=cfg.min_lr,
    )


def _matrices_only(params):
    # nanoGPT decays every tensor of rank >= 2 (weights, embeddings), not biases or norms.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (I. Loshchilov and F. Hutter, "Decoupled Weight Decay Regularization", ICLR
    2019) with the configured schedule, betas, eps, weight decay and optional gradient
    clipping by global norm, as in ``torch.optim.AdamW`` (decay ``lr * wd * p`` added to
    the Adam step, eps outside the square root).

    Returns:
      ``(tx, schedule)``: the optax transformation and the learning-rate schedule.
    """
    schedule = make_schedule(cfg)
    mask = None if cfg.weight_decay_on == "all" else _matrices_only
    adamw = optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=mask)
    if cfg.grad_clip:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw), schedule
    return adamw, schedule
