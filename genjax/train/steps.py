"""Train state and the pure train / eval step functions shared by every model family.

A model family supplies either one loss function with the signature

    loss_fn(params, batch, key, train) -> (loss, metrics)

where ``batch`` is a pytree of arrays whose leading axis is the batch, ``key`` a PRNG key
(dropout, reparameterisation noise), ``train`` a Python bool (dropout on or off), ``loss`` a
float32 scalar averaged over the batch and ``metrics`` a dict of float32 scalars, also
batch means; or, for models with state besides their parameters (BatchNorm statistics) or
with several players (a GAN's discriminator and generator), a sequence of :class:`Update` s
and an :class:`Evaluation`. Everything else (gradients, optimizers, devices) is here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.flatten_util
import jax.numpy as jnp
import optax
from flax import struct

LossFn = Callable[[Any, Any, jax.Array, bool], tuple[jax.Array, dict]]
UpdateLossFn = Callable[[Any, Any, jax.Array, Optional[str]], tuple[jax.Array, tuple[dict, Any]]]
MetricsFn = Callable[[Any, Any, jax.Array, Optional[str]], dict]
Optimizers = Union[optax.GradientTransformation, Mapping[str, optax.GradientTransformation]]


@struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree.

    Attributes:
      step: int32 scalar, train steps done so far.
      params: the model parameters; with several players (:class:`Update` ``group``), a
        dict of one parameter tree per group.
      opt_state: the optax optimizer state; with several groups, a dict of one per group.
      model_state: state besides the parameters that the train step updates, such as
        Flax's ``{'batch_stats': ...}`` (BatchNorm running statistics); None without.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any = None

    @property
    def variables(self):
        """What loss and evaluation functions receive: see :func:`model_variables`."""
        return model_variables(self.params, self.model_state)


def model_variables(params, model_state):
    """``params`` alone for a model without state, else the Flax variables
    ``{'params': params, **model_state}`` (``model_state`` as ``{'batch_stats': ...}``)."""
    return params if model_state is None else {"params": params, **model_state}


@dataclasses.dataclass(frozen=True)
class Update:
    """One optimizer update of a train step: the gradient of ``loss_fn`` with respect to
    one group of parameters, applied by that group's optimizer.

    A train step made of several updates (a GAN's discriminator update, then its
    generator update) runs them in order inside one compiled program, each seeing the
    parameters and model state that the previous one left.

    Attributes:
      loss_fn: ``(variables, batch, key, axis_name) -> (loss, (metrics, model_state))``.
        ``variables`` as :func:`model_variables` (dropout and BatchNorm in training mode
        are the function's to choose); ``key`` is this update's PRNG key, the same on
        every device (draw per-example noise for the global batch and keep this device's
        rows with :func:`global_draw`, so that a run does not depend on the device
        count); ``axis_name`` names the device axis under ``jax.pmap`` (None otherwise),
        for collectives such as synchronised BatchNorm (``nn.BatchNorm(axis_name=...)``).
        ``loss`` is a float32 scalar (batch mean), ``metrics`` a dict of float32 scalars,
        ``model_state`` the new state (the one given, for a function that changes none).
      group: the key of ``params`` (and of the optimizers) this update trains; None: all
        the parameters, with the one optimizer. Parameters outside the group, and their
        optimizer state, are left exactly as they were; so is the model state outside it:
        of the model state that ``loss_fn`` returns, only the group's entry of each
        collection (``model_state[collection][group]``, where the collection has one) is
        kept (and averaged over devices), the rest stays the very arrays it was. Each
        group's optimizer counts its own updates: its schedule advances ``repeats``
        steps per train step.
      name: prefix of this update's metrics: ``{name}_loss``, ``{name}_grad_norm``
        (``loss`` and ``grad_norm`` when empty). The loss function's own metrics keep their
        names, which must differ from every other update's.
      repeats: updates in a row per train step (a GAN's ``d_steps``). With repeats > 1
        every leaf of the batch has a second axis of this size, and repeat ``r`` sees
        ``x[:, r]``; the metrics are those of the last repeat.

    Raises:
      ValueError: ``repeats`` not a positive integer.
    """

    loss_fn: UpdateLossFn
    group: Optional[str] = None
    name: str = ""
    repeats: int = 1

    def __post_init__(self):
        if not isinstance(self.repeats, int) or isinstance(self.repeats, bool) or self.repeats < 1:
            raise ValueError(f"Update.repeats must be a positive integer, got {self.repeats!r}")


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """An evaluation function for models that a plain ``loss_fn`` does not describe.

    Attributes:
      metrics_fn: ``(variables, batch, key, axis_name) -> metrics``: float32 batch means
        (``variables``, ``key`` and ``axis_name`` as in :class:`Update`; the key is the
        same on every device). Evaluation reports each as ``{split}_{name}``.
    """

    metrics_fn: MetricsFn


Objective = Union[LossFn, Sequence[Update]]


def as_updates(objective: Union[Objective, Update]) -> tuple[Update, ...]:
    """The updates of a train step: ``objective`` itself (one :class:`Update` or a
    sequence), or for a plain ``loss_fn`` one update of every parameter, with dropout on and
    the device index folded into the key under ``pmap`` (so no two devices share a dropout
    mask).

    Raises:
      ValueError: an empty sequence, or one holding something else than updates.
    """
    if isinstance(objective, Update):
        return (objective,)
    if not callable(objective):
        updates = tuple(objective)
        if not updates or not all(isinstance(u, Update) for u in updates):
            raise ValueError("a train step needs a loss function or a non-empty sequence of "
                             f"Update, got {objective!r}")
        return updates
    loss_fn = objective

    def update_loss(params, batch, key, axis_name):
        if axis_name is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        loss, metrics = loss_fn(params, batch, key, True)
        return loss, (metrics, None)

    return (Update(update_loss),)


def as_evaluation(objective: Union[LossFn, Evaluation]) -> Evaluation:
    """``objective`` itself, or for a plain ``loss_fn`` its value and metrics with dropout
    off (``{'loss': loss, **metrics}``), the device index folded into the key under
    ``pmap``."""
    if isinstance(objective, Evaluation):
        return objective
    loss_fn = objective

    def metrics_fn(params, batch, key, axis_name):
        if axis_name is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        loss, metrics = loss_fn(params, batch, key, False)
        return {"loss": loss, **metrics}

    return Evaluation(metrics_fn)


def global_draw(sample: Callable[[jax.Array, int], Any], key: jax.Array, local_batch: int,
                axis_name: Optional[str]):
    """This device's rows of ``sample(key, global_batch)``: per-example noise (a GAN's z)
    drawn for the whole global batch, so that its values do not depend on how the batch
    is split over devices.

    Args:
      sample: ``(key, n) -> pytree of arrays with leading axis n``.
      key: the same key on every device.
      local_batch: this device's share of the batch (the global batch without ``pmap``).
      axis_name: the ``pmap`` axis, or None (one program sees the global batch).
    """
    if axis_name is None:
        return sample(key, local_batch)
    draw = sample(key, local_batch * jax.lax.axis_size(axis_name))
    start = jax.lax.axis_index(axis_name) * local_batch
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, local_batch), draw)


def _owned_state(model_state, group: Optional[str]):
    """The part of ``model_state`` that an update of ``group`` may change: all of it
    without a group, else each collection's entry for the group (where it has one)."""
    if model_state is None or group is None:
        return model_state
    return {name: tree[group] for name, tree in model_state.items() if group in tree}


def _with_owned_state(model_state, owned, group: Optional[str]):
    """``model_state`` with the part of ``group`` replaced by ``owned``."""
    if model_state is None or group is None:
        return owned
    return {name: {**tree, group: owned[name]} if name in owned else tree
            for name, tree in model_state.items()}


def create_train_state(params, tx: Optimizers, model_state=None) -> TrainState:
    """A state at step 0 for ``params`` with a fresh optimizer state of ``tx`` (one
    optimizer, or a dict of one per parameter group: ``params[group]``)."""
    if isinstance(tx, Mapping):
        opt_state = {group: t.init(params[group]) for group, t in tx.items()}
    else:
        opt_state = tx.init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      model_state=model_state)


# Programs that run once (parameter init) are compiled without XLA's backend optimisation:
# on a 2-core CPU this halves their compile time (GPT cpu preset: 6.7 s -> 3.6 s).
RUN_ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def init_train_state(init_params: Callable[[jax.Array], Any], tx: Optimizers,
                     key: jax.Array, sharding=None,
                     init_model_state: Optional[Callable[[jax.Array], Any]] = None) -> TrainState:
    """A fresh :class:`TrainState`: ``init_params(key)`` (and ``init_model_state(key)``),
    then the optimizer state.

    The init program runs once, so it is compiled with :data:`RUN_ONCE_COMPILER_OPTIONS`
    (the same random draws; float rounding may differ from an optimised build in the last
    bit). ``sharding``: where the state goes: one sharding for every array, a pytree of
    them shaped like the state, or a function from the state's shapes
    (``jax.ShapeDtypeStruct`` s) to either, such as
    :meth:`genjax.train.parallel.Engine.state_sharding`.
    """
    params = jax.jit(init_params, compiler_options=RUN_ONCE_COMPILER_OPTIONS)(key)
    model_state = None
    if init_model_state is not None:
        model_state = jax.jit(init_model_state, compiler_options=RUN_ONCE_COMPILER_OPTIONS)(key)
    create = lambda p, s: create_train_state(p, tx, s)
    if callable(sharding):
        sharding = sharding(jax.eval_shape(create, params, model_state))
    return jax.jit(create, out_shardings=sharding)(params, model_state)


def _check_groups(updates: Sequence[Update], tx: Optimizers) -> None:
    for update in updates:
        if update.group is None and isinstance(tx, Mapping):
            raise ValueError("an Update without a group trains every parameter with one "
                             f"optimizer, but optimizers were given per group {sorted(tx)}")
        if update.group is not None and (not isinstance(tx, Mapping) or update.group not in tx):
            have = sorted(tx) if isinstance(tx, Mapping) else "one optimizer for all"
            raise ValueError(f"Update group {update.group!r} has no optimizer (have: {have})")


def make_train_step(objective: Objective, tx: Optimizers,
                    schedule: Optional[optax.Schedule] = None,
                    axis_name: Optional[str] = None):
    """Build the pure step ``(state, batch, key, lr_schedule=None) -> (state, metrics)``.

    One step runs the updates of ``objective`` (see :func:`as_updates`) in order: for
    each, the loss and its gradients with respect to its parameter group on ``batch``,
    then that group's optax update; update ``i`` of several draws with
    ``fold_in(key, i)`` (repeat ``r`` of it with a further ``fold_in(., r)``), a single
    update with ``key`` itself. With ``axis_name`` the step runs once per device on that
    device's share of the batch (under ``jax.pmap``): gradients, loss, metrics and the new
    model state are averaged with ``lax.pmean`` (one all-reduce of one flat vector per
    update), which leaves parameters and model state identical on every device.

    Args:
      objective: a ``loss_fn`` (one update of every parameter) or a sequence of
        :class:`Update`.
      tx: one optax optimizer, or with grouped updates a dict of one per group.
      schedule: the learning rate by step, reported as ``lr``.

    ``lr_schedule``, when given (a :class:`genjax.train.optim.Schedule`, an argument of
    the compiled step: the engines pass it), is the rate by step instead of ``schedule``,
    reported and passed to each optimizer's ``update`` as its ``lr_schedule`` extra
    argument (:func:`genjax.train.optim.make_optimizer`'s use it), so that the schedule's
    numbers are not constants of the compiled program. It is every group's (the groups'
    optimizers come from one config); an optimizer without extra arguments keeps its own
    rate, and ``lr`` still reports ``lr_schedule``'s.

    ``metrics`` holds each update's ``loss`` and ``grad_norm`` (global L2 norm of the
    averaged gradients), prefixed by its name, its loss function's metrics and, with
    ``schedule``, ``lr`` (the rate used at this step).

    Raises:
      ValueError: an update whose group has no optimizer in ``tx``.
    """
    updates = as_updates(objective)
    _check_groups(updates, tx)

    def apply_update(update: Update, params, opt_state, model_state, batch, key, extra):
        group = update.group
        trained = params if group is None else params[group]

        def loss_of(trained):
            full = trained if group is None else {**params, group: trained}
            return update.loss_fn(model_variables(full, model_state), batch, key, axis_name)

        (loss, (metrics, new_state)), grads = jax.value_and_grad(loss_of, has_aux=True)(trained)
        prefix = f"{update.name}_" if update.name else ""
        metrics = {f"{prefix}loss": loss, **metrics}
        owned = _owned_state(new_state, group)
        if axis_name is not None:
            # One all-reduce of one flat vector rather than one per leaf.
            flat, unravel = jax.flatten_util.ravel_pytree((grads, metrics, owned))
            grads, metrics, owned = unravel(jax.lax.pmean(flat, axis_name))
        model_state = _with_owned_state(model_state, owned, group)
        group_tx = tx if group is None else tx[group]
        group_opt = opt_state if group is None else opt_state[group]
        # (an optimizer without extra arguments, its own rate inside, ignores lr_schedule)
        group_tx = optax.with_extra_args_support(group_tx) if extra else group_tx
        changes, group_opt = group_tx.update(grads, group_opt, trained, **extra)
        trained = optax.apply_updates(trained, changes)
        metrics[f"{prefix}grad_norm"] = optax.tree.norm(grads)
        if group is None:
            return trained, group_opt, model_state, metrics
        return ({**params, group: trained}, {**opt_state, group: group_opt}, model_state,
                metrics)

    def train_step(state: TrainState, batch, key, lr_schedule=None):
        params, opt_state, model_state = state.params, state.opt_state, state.model_state
        extra = {} if lr_schedule is None else {"lr_schedule": lr_schedule}
        metrics = {}
        for i, update in enumerate(updates):
            update_key = key if len(updates) == 1 else jax.random.fold_in(key, i)
            for r in range(update.repeats):
                if update.repeats == 1:
                    repeat_key, repeat_batch = update_key, batch
                else:
                    repeat_key = jax.random.fold_in(update_key, r)
                    repeat_batch = jax.tree.map(lambda x: x[:, r], batch)
                params, opt_state, model_state, update_metrics = apply_update(
                    update, params, opt_state, model_state, repeat_batch, repeat_key, extra)
            clash = sorted(set(metrics) & set(update_metrics))
            if clash:
                raise ValueError(f"updates report the same metric names {clash}: name the "
                                 "updates, or their loss functions' metrics, apart")
            metrics.update(update_metrics)
        rate = schedule if lr_schedule is None else lr_schedule
        if rate is not None:
            metrics["lr"] = jnp.asarray(rate(state.step), jnp.float32)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             model_state=model_state), metrics

    return train_step


def make_batch_drawing_train_step(objective: Objective, tx: Optimizers,
                                  batch_fn: Callable[[jax.Array, jax.Array], Any],
                                  schedule: Optional[optax.Schedule] = None,
                                  axis_name: Optional[str] = None, n_shares: int = 1,
                                  batch_sharding=None):
    """Build ``(state, data_key, dropout_key, lr_schedule=None) -> (state, metrics)``,
    drawing its own batch.

    The same step as :func:`make_train_step`, but the global batch of step ``state.step``
    is drawn inside the program, ``batch_fn(data_key, state.step)``, and the dropout key
    is ``fold_in(dropout_key, state.step)``: the very batches and keys that the host
    would pass (see :func:`genjax.train.loop.fit`), without any host work per step.

    Args:
      objective, tx, schedule: as :func:`make_train_step` (and ``lr_schedule``).
      batch_fn: ``(data_key, step) -> batch``, traceable (``step`` is an int32 tracer),
        returning the global batch (leading axis: the global batch size).
      axis_name, n_shares: under ``jax.pmap``, each of the ``n_shares`` devices keeps
        its contiguous share of the global batch (by ``lax.axis_index``).
      batch_sharding: under ``jax.jit`` with a mesh, the batch's sharding constraint.
    """
    train_step = make_train_step(objective, tx, schedule, axis_name)

    def step(state: TrainState, data_key, dropout_key, lr_schedule=None):
        batch = batch_fn(data_key, state.step)  # the global batch of this step
        batch = _device_share(batch, axis_name, n_shares, batch_sharding)
        return train_step(state, batch, jax.random.fold_in(dropout_key, state.step),
                          lr_schedule)

    return step


def _device_share(batch, axis_name: Optional[str], n_shares: int, batch_sharding):
    """This device's contiguous share of a global batch drawn inside a program: under
    ``pmap`` (``axis_name``) a slice by ``lax.axis_index``; under ``jit`` over a mesh a
    sharding constraint; otherwise the batch itself."""
    if axis_name is not None:
        index = jax.lax.axis_index(axis_name)

        def share(x):
            size = x.shape[0] // n_shares
            return jax.lax.dynamic_slice_in_dim(x, index * size, size)

        return jax.tree.map(share, batch)
    if batch_sharding is not None:
        return jax.lax.with_sharding_constraint(batch, batch_sharding)
    return batch


def make_eval_step(objective: Union[LossFn, Evaluation], axis_name: Optional[str] = None):
    """Build the pure step ``(variables, batch, key) -> metrics`` (dropout off).

    ``objective``: a ``loss_fn``, whose metrics are ``loss`` and its own, or an
    :class:`Evaluation`; ``variables``: the parameters, or the Flax variables of a model
    with state (:func:`model_variables`). The metrics are batch means (averaged over
    devices with ``lax.pmean`` when ``axis_name`` is given).
    """
    evaluation = as_evaluation(objective)

    def eval_step(variables, batch, key):
        metrics = evaluation.metrics_fn(variables, batch, key, axis_name)
        if axis_name is not None:
            metrics = jax.lax.pmean(metrics, axis_name)
        return metrics

    return eval_step


def make_batch_drawing_eval(objective: Union[LossFn, Evaluation],
                            batch_fn: Callable[[str, jax.Array], Any],
                            splits: tuple[str, ...], n_batches: int,
                            axis_name: Optional[str] = None, n_shares: int = 1,
                            batch_sharding=None):
    """Build ``(variables, key) -> metrics``: a whole evaluation as one program.

    The evaluation of :func:`genjax.train.loop.evaluate` (the lecture's
    ``estimate_loss``) without a host round trip per batch: for the split of index ``s``,
    batch ``j`` is ``batch_fn(split, k)`` with ``k = fold_in(fold_in(key, s), j)``, its
    metrics are computed as :func:`make_eval_step` computes them, with key ``k``, and the
    ``n_batches`` batches are looped over with ``lax.fori_loop``, one batch in memory at a
    time. The batches and keys are those
    of the host path, so the results agree with it to float rounding.

    Args:
      objective: a ``loss_fn`` or an :class:`Evaluation` (see :func:`make_eval_step`).
      batch_fn: ``(split, key) -> global batch``, traceable; ``split`` is a Python str.
      splits: the split names, in order.
      n_batches: batches per split, >= 1.
      axis_name, n_shares, batch_sharding: as :func:`make_batch_drawing_train_step`.

    Returns:
      A function giving ``{f"{split}_{name}": float32 scalar}`` for every metric: means
      over the batches (and devices).

    Raises:
      ValueError: ``n_batches < 1``.
    """
    if n_batches < 1:
        raise ValueError(f"an evaluation needs at least one batch per split, got {n_batches}")

    evaluation = as_evaluation(objective)
    n_splits = len(splits)
    # One loop over every (split, batch) pair, so the model is compiled once; only the
    # batch drawing differs between splits (lax.switch).
    draw = [functools.partial(batch_fn, split) for split in splits]

    def evaluate(variables, key):
        def metrics_of(i):
            s, j = i // n_batches, i % n_batches
            batch_key = jax.random.fold_in(jax.random.fold_in(key, s), j)
            batch = jax.lax.switch(s, draw, batch_key) if n_splits > 1 else draw[0](batch_key)
            batch = _device_share(batch, axis_name, n_shares, batch_sharding)
            return s, evaluation.metrics_fn(variables, batch, batch_key, axis_name)

        def add(i, sums):
            s, metrics = metrics_of(i)
            return jax.tree.map(lambda acc, m: acc.at[s].add(m), sums, metrics)

        _, shapes = jax.eval_shape(metrics_of, 0)
        sums = jax.tree.map(lambda m: jnp.zeros((n_splits,) + m.shape, m.dtype), shapes)
        sums = jax.lax.fori_loop(0, n_splits * n_batches, add, sums)
        if axis_name is not None:
            sums = jax.lax.pmean(sums, axis_name)
        return {f"{split}_{name}": value[s] / n_batches
                for s, split in enumerate(splits) for name, value in sums.items()}

    return evaluate
