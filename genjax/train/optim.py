"""Optimizers and learning-rate schedules (optax), shared by every model family.

The schedule's numbers (peak and final rate, warm-up and decay steps) are data, a
:class:`Schedule` pytree, not constants of the compiled train step: the engines pass it
to the step as an argument, so a run of another length, or a resume that raises
``--max-iters``, reuses the compiled program (and the persistent compilation cache)
instead of compiling a new one.
"""

from __future__ import annotations

from typing import Literal, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from genjax.train.config import TrainConfig


@flax.struct.dataclass
class Schedule:
    """The learning rate as a function of the step (number of updates already done);
    a pytree of float32/int32 scalars (``kind`` is static), callable on a host int or a
    traced int32 count.

    ``constant``: ``peak`` throughout (the lecture's ``torch.optim.AdamW``).
    ``cosine``: linear warm-up from 0 over ``warmup_steps``, then cosine decay from
    ``peak`` to ``peak * alpha`` over ``decay_steps`` more steps, constant afterwards
    (nanoGPT's ``get_lr``; I. Loshchilov and F. Hutter, "SGDR", ICLR 2017). The same
    float32 operations, in the same order, as ``optax.warmup_cosine_decay_schedule``: on
    the host the rates are equal to it; traced with the numbers as arguments (the compiled
    step), XLA may round a division otherwise than with them as constants, within 2e-6
    relative (1e-7 of the peak). Build one with :func:`make_schedule`.
    """

    peak: jax.Array
    alpha: jax.Array  # final rate / peak
    one_minus_alpha: jax.Array  # 1 - alpha, rounded once from float64 as optax does
    warmup_steps: jax.Array
    decay_steps: jax.Array  # of the cosine, after the warm-up (float32)
    kind: Literal["constant", "cosine"] = flax.struct.field(pytree_node=False,
                                                           default="cosine")

    def __call__(self, count) -> jax.Array:
        """The rate at step ``count`` (an int or int32 array): float32."""
        count = jnp.asarray(count, jnp.int32)
        if self.kind == "constant":
            return jnp.broadcast_to(self.peak, count.shape)
        warm = jnp.clip(count, 0, self.warmup_steps)
        # (a warm-up of 0 steps never takes this branch: jnp.where picks the decay)
        warming = -self.peak * (1 - warm / jnp.maximum(self.warmup_steps, 1)) + self.peak
        t = jnp.minimum(count - self.warmup_steps, self.decay_steps)
        cosine = 0.5 * (1 + jnp.cos(jnp.pi * t / self.decay_steps))
        decaying = self.peak * (self.one_minus_alpha * cosine + self.alpha)
        return jnp.where(count < self.warmup_steps, warming, decaying)


def make_schedule(cfg: TrainConfig) -> Schedule:
    """The :class:`Schedule` of ``cfg``: ``constant`` at ``learning_rate``, or ``cosine``
    (warm-up over ``warmup_iters``, decay to ``min_lr`` at ``lr_decay_iters``; a
    :class:`TrainConfig` has checked that the decay ends after the warm-up)."""
    peak = cfg.learning_rate
    if cfg.lr_schedule == "constant":
        return Schedule(peak=jnp.float32(peak), alpha=jnp.float32(1.0),
                        one_minus_alpha=jnp.float32(0.0), warmup_steps=jnp.int32(0),
                        decay_steps=jnp.float32(1.0), kind="constant")
    alpha = cfg.min_lr / peak
    return Schedule(peak=jnp.float32(peak), alpha=jnp.float32(alpha),
                    one_minus_alpha=jnp.float32(1 - alpha),
                    warmup_steps=jnp.int32(cfg.warmup_iters),
                    decay_steps=jnp.float32(cfg.lr_decay_iters - cfg.warmup_iters),
                    kind="cosine")


def scale_by_schedule_arg(default: Schedule) -> optax.GradientTransformationExtraArgs:
    """``optax.scale_by_learning_rate`` whose schedule comes with each update: multiply
    the updates by ``-lr_schedule(count)``, where ``lr_schedule`` is the update's extra
    argument (:class:`Schedule`, traced: the engines pass it), else ``default``. Its
    state is optax's ``ScaleByScheduleState``, as in ``optax.adamw`` given a schedule (not
    a constant rate), so checkpoints of either load in the other."""

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, lr_schedule: Optional[Schedule] = None,
                  **extra_args):
        del params, extra_args
        step_size = -(default if lr_schedule is None else lr_schedule)(state.count)
        updates = jax.tree.map(lambda g: jnp.asarray(step_size, g.dtype) * g, updates)
        return updates, optax.ScaleByScheduleState(
            count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _matrices_only(params):
    # nanoGPT decays every tensor of rank >= 2 (weights, embeddings), not biases or norms.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformationExtraArgs, Schedule]:
    """AdamW (I. Loshchilov and F. Hutter, "Decoupled Weight Decay Regularization", ICLR
    2019) with the configured schedule, betas, eps, weight decay and optional gradient
    clipping by global norm, as in ``torch.optim.AdamW`` (decay ``lr * wd * p`` added to
    the Adam step, eps outside the square root): ``optax.adamw``'s chain, with the
    learning rate taken from the ``lr_schedule`` extra argument of ``update`` when given
    (:func:`scale_by_schedule_arg`), else from ``cfg``.

    Returns:
      ``(tx, schedule)``: the optax transformation and the learning-rate schedule.
    """
    schedule = make_schedule(cfg)
    mask = None if cfg.weight_decay_on == "all" else _matrices_only
    adamw = optax.chain(
        optax.scale_by_adam(b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, mask),
        scale_by_schedule_arg(schedule),
    )
    if cfg.grad_clip:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw), schedule
    return adamw, schedule
