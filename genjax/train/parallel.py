"""Data parallelism over the local devices: the engines that run the shared steps.

Three engines run the same pure steps of :mod:`genjax.train.steps`:

- ``pmap``: ``jax.pmap`` over a named axis ``'batch'``; each device takes its share of the
  global batch, gradients and metrics are averaged with ``lax.pmean``; the state goes in
  with ``in_axes=None`` and comes back with ``out_axes=None``, so it stays one replicated
  array (no ``[0]`` indexing, no stacked copies).
- ``sharding``: one ``jax.jit`` program over the 1-D mesh ``('data',)`` made by
  ``jax.make_mesh``; state replicated (``P()``), batch sharded (``P('data')``), state buffers
  donated. XLA inserts the gradient all-reduce.
- ``fsdp``: the ``sharding`` program, but parameters and optimizer state are sharded over
  ``data`` too (fully sharded data parallelism, ZeRO-3: Rajbhandari et al. 2020, "ZeRO:
  Memory Optimizations Toward Training Trillion Parameter Models"): each array of at least
  :data:`FSDP_MIN_SIZE` elements is split along its largest dimension that the device
  count divides; smaller arrays (biases, LayerNorm scales) stay replicated. XLA gathers
  the parameters where the computation needs them and reduce-scatters the gradients, so
  the state's bytes per device fall about as 1/N (:func:`state_bytes_per_device`).
- ``none``: ``jax.jit`` on one device.

Batches are global: the same examples at step k whatever the device count. With several
processes (``jax.distributed``), each process supplies only its share of every batch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional, Union

import chex
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from genjax.train.optim import Schedule
from genjax.train.steps import (Evaluation, LossFn, Objective, Optimizers,
                                make_batch_drawing_eval, make_batch_drawing_train_step,
                                make_eval_step, make_train_step)

_HOST_FLAG = "xla_force_host_platform_device_count"
PMAP_AXIS = "batch"
MESH_AXIS = "data"
ENGINES = ("pmap", "sharding", "fsdp", "none")
FSDP_MIN_SIZE = 1024  # elements: smaller arrays stay replicated under fsdp


@dataclasses.dataclass(frozen=True)
class Engine:
    """How steps are compiled and where arrays live. Make one with :func:`make_engine`.

    Attributes:
      kind: ``pmap``, ``sharding``, ``fsdp`` or ``none``.
      devices: the devices used, in ``jax.devices()`` order.
      mesh: a 1-D mesh over ``devices``.
    """

    kind: str
    devices: tuple
    mesh: Mesh

    @property
    def n_devices(self) -> int:
        return len(self.devices)

    @property
    def replicated(self) -> NamedSharding:
        """The sharding of the train state: a full copy on every device."""
        return NamedSharding(self.mesh, P())

    @property
    def batch_sharding(self) -> NamedSharding:
        """The sharding of a batch: split along its leading axis."""
        return NamedSharding(self.mesh, P(self.mesh.axis_names[0]))

    def sharding_of(self, x) -> NamedSharding:
        """Where a state array shaped like ``x`` (an array or ``jax.ShapeDtypeStruct``)
        lives: replicated, or under ``fsdp`` split along its largest dimension that the
        device count divides when it has at least :data:`FSDP_MIN_SIZE` elements."""
        n, shape = self.n_devices, tuple(getattr(x, "shape", ()))
        if self.kind != "fsdp" or n == 1 or math.prod(shape) < FSDP_MIN_SIZE:
            return self.replicated
        dims = [d for d in range(len(shape)) if shape[d] % n == 0]
        if not dims:
            return self.replicated
        d = max(dims, key=lambda d: (shape[d], -d))  # the largest; the first of equals
        return NamedSharding(self.mesh, P(*([None] * d), MESH_AXIS))

    def state_sharding(self, tree):
        """The sharding of every leaf of a state-like pytree (see :meth:`sharding_of`)."""
        return jax.tree.map(self.sharding_of, tree)

    def per_device_batch(self, global_batch: int) -> int:
        """Examples each device takes of a global batch (divisibility is checked by
        :func:`make_engine`)."""
        return global_batch // self.n_devices

    def local_share(self, global_batch: int) -> tuple[int, int]:
        """This process's slice ``[start, stop)`` of a global batch of ``global_batch``."""
        per_process = global_batch // jax.process_count()
        start = jax.process_index() * per_process
        return start, start + per_process

    # -- placing arrays --------------------------------------------------------------

    def put_replicated(self, tree):
        """Put a pytree (host or device arrays) on every device, as a replicated copy. With
        several processes each must pass the same values, as host arrays or arrays this
        process holds whole (raw uint32 PRNG keys, not typed ``jax.random.key`` s); each
        places its own copy."""
        if jax.process_count() == 1:
            return jax.device_put(tree, self.replicated)

        def put(x):  # (device_put from one local device onto several processes' devices
            x = np.asarray(x)  # can build an array that Orbax cannot save)
            return jax.make_array_from_callback(x.shape, self.replicated, lambda index: x[index])

        return jax.tree.map(put, tree)

    def put_batch(self, local_batch):
        """Make the global, device-sharded batch from this process's share of it.

        ``local_batch``: a pytree of arrays whose leading axis holds this process's
        examples. Under ``pmap`` the leading axis is split into (devices, per device).
        """
        def put(x):
            x = np.asarray(x) if not isinstance(x, jax.Array) else x
            global_shape = (x.shape[0] * jax.process_count(),) + tuple(x.shape[1:])
            if self.kind == "pmap":
                n = self.n_devices
                global_shape = (n, global_shape[0] // n) + global_shape[1:]
                x = x.reshape((n // jax.process_count(), x.shape[0] * jax.process_count() // n)
                              + tuple(x.shape[1:]))
            if jax.process_count() == 1:
                return jax.device_put(x, self.batch_sharding)
            return jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x),
                                                          global_shape)
        return jax.tree.map(put, local_batch)

    def to_single_device(self, tree):
        """Copy a pytree of the engine's arrays onto this process's first device, whole,
        for sampling and reports. A replicated array with several processes is copied from
        this process's own copy; an array sharded across processes (``fsdp``) is gathered,
        a collective: every process must call this together."""
        local = jax.local_devices()[0]

        def one(x):
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                if x.is_fully_replicated:  # every process holds the whole value
                    x = x.addressable_data(0)
                else:
                    from jax.experimental import multihost_utils

                    x = multihost_utils.process_allgather(x, tiled=True)
            return jax.device_put(x, local)

        return jax.tree.map(one, tree)

    # -- compiling steps -------------------------------------------------------------

    def compile_train_step(self, objective: Objective, tx: Optimizers,
                           schedule: Optional[optax.Schedule] = None, batch_fn=None):
        """The compiled train step; the state is donated.

        ``objective``: a ``loss_fn`` or a sequence of :class:`~genjax.train.steps.Update`
        (``tx``: one optimizer, or one per update group); see
        :func:`genjax.train.steps.make_train_step`.
        Without ``batch_fn``: ``(state, batch, dropout_key) -> (state, metrics)``, ``batch``
        from :meth:`put_batch`, the step's key ``fold_in(dropout_key, state.step)`` drawn
        inside the program (see :func:`genjax.train.steps.make_train_step`): a ``fold_in``
        on the host is a program of its own, which waits for the step in flight and leaves
        the devices idle until the host has dispatched the next step. With
        ``batch_fn`` (traceable ``(data_key, step) -> global batch``): ``(state,
        data_key, dropout_key) -> (state, metrics)``, the batch drawn inside the program
        (see :func:`genjax.train.steps.make_batch_drawing_train_step`). ``state``, keys,
        the returned state and metrics are replicated arrays (under ``fsdp`` the state is
        placed by :meth:`state_sharding`, in and out).

        A ``schedule`` that is a :class:`genjax.train.optim.Schedule` (as
        :func:`~genjax.train.optim.make_optimizer` makes) is placed on the devices once and
        passed to the program as an argument (``lr_schedule``), not compiled into it: runs
        that differ only in the schedule's numbers (``--max-iters``, warm-up, rates) share
        one program and its entry in the persistent compilation cache.
        """
        runtime = schedule if isinstance(schedule, Schedule) else None
        if runtime is not None:
            schedule = None
        n_args = 3 + (runtime is not None)
        if batch_fn is None:
            step = _folding_step_key(make_train_step(
                objective, tx, schedule, axis_name=PMAP_AXIS if self.kind == "pmap" else None))
            if self.kind == "pmap":
                compiled = jax.pmap(step, axis_name=PMAP_AXIS,
                                    in_axes=(None, 0, None, None)[:n_args],
                                    out_axes=(None, None), devices=self.devices,
                                    donate_argnums=0)
            second = self.batch_sharding  # the batch
        else:
            step = make_batch_drawing_train_step(
                objective, tx, batch_fn, schedule,
                axis_name=PMAP_AXIS if self.kind == "pmap" else None,
                n_shares=self.n_devices,
                batch_sharding=(self.batch_sharding if self.kind in ("sharding", "fsdp")
                                else None))
            if self.kind == "pmap":
                compiled = self._pmap_replicated(step, n_args, out_axes=(None, None),
                                                 donate_argnums=0)
            second = self.replicated  # the data key
        if self.kind in ("sharding", "fsdp"):
            compiled = self._mesh_jit(step, (second,) + (self.replicated,) * (n_args - 2),
                                      self.replicated, returns_state=True, donate_argnums=0)
        elif self.kind != "pmap":
            compiled = jax.jit(step, donate_argnums=0)
        if runtime is None:
            return compiled
        placed = self.put_replicated(runtime)
        return lambda state, *args: compiled(state, *args, placed)

    def compile_eval_step(self, objective: Union[LossFn, Evaluation]):
        """The compiled ``(variables, batch, key) -> metrics`` with dropout off (see
        :func:`genjax.train.steps.make_eval_step`)."""
        if self.kind == "pmap":
            step = make_eval_step(objective, axis_name=PMAP_AXIS)
            return jax.pmap(step, axis_name=PMAP_AXIS, in_axes=(None, 0, None), out_axes=None,
                            devices=self.devices)
        step = make_eval_step(objective)
        if self.kind in ("sharding", "fsdp"):
            return self._mesh_jit(step, (self.batch_sharding, self.replicated), self.replicated)
        return jax.jit(step)

    def compile_eval_program(self, objective: Union[LossFn, Evaluation], batch_fn,
                             splits: tuple[str, ...], n_batches: int):
        """The compiled ``(variables, key) -> metrics``: a whole evaluation in one program.

        ``batch_fn``: traceable ``(split, key) -> global batch``. See
        :func:`genjax.train.steps.make_batch_drawing_eval` (metrics named
        ``{split}_{name}``, means over ``n_batches`` batches per split). ``variables``
        are placed as the train state (:meth:`state_sharding`), ``key`` and the returned
        metrics are replicated.
        """
        evaluate = make_batch_drawing_eval(
            objective, batch_fn, splits, n_batches,
            axis_name=PMAP_AXIS if self.kind == "pmap" else None, n_shares=self.n_devices,
            batch_sharding=(self.batch_sharding if self.kind in ("sharding", "fsdp")
                                else None))
        if self.kind == "pmap":
            return self._pmap_replicated(evaluate, 2, out_axes=None)
        if self.kind in ("sharding", "fsdp"):
            return self._mesh_jit(evaluate, (self.replicated,), self.replicated)
        return jax.jit(evaluate)

    def _mesh_jit(self, fn, rest_shardings: tuple, out_sharding, returns_state: bool = False,
                  **jit_kwargs):
        """``jax.jit`` of ``fn`` over the mesh, whose first argument is state-like (a train
        state or the variables) and placed by :meth:`state_sharding`; ``rest_shardings``:
        the other arguments'. With ``returns_state``, ``fn`` returns ``(state, out)`` and the
        state comes back placed as it went in. Under ``fsdp`` the program is built at the
        first call, from the first argument's structure and shapes."""
        def build(first_sharding):
            out = (first_sharding, out_sharding) if returns_state else out_sharding
            return jax.jit(fn, in_shardings=(first_sharding,) + tuple(rest_shardings),
                           out_shardings=out, **jit_kwargs)

        if self.kind != "fsdp":
            return build(self.replicated)
        built = {}

        def call(first, *rest):
            if "fn" not in built:
                built["fn"] = build(self.state_sharding(first))
            return built["fn"](first, *rest)

        return call

    def _pmap_replicated(self, fn, n_args: int, **pmap_kwargs):
        """``jax.pmap`` of ``fn``, all of whose ``n_args`` arguments are replicated.

        pmap needs one mapped argument: each device's index is passed, and not used.
        """
        mapped = jax.pmap(lambda *args: fn(*args[:-1]), axis_name=PMAP_AXIS,
                          in_axes=(None,) * n_args + (0,), devices=self.devices, **pmap_kwargs)
        indices = self.put_batch(np.arange(self.n_devices // jax.process_count()))
        return lambda *args: mapped(*args, indices)

    def describe(self, global_batch: int, state=None) -> str:
        """One line: engine, devices, processes, batch and, given ``state``, its size on
        each device (:func:`state_bytes_per_device`)."""
        line = (f"engine={self.kind} devices={self.n_devices} ({self.devices[0].platform}) "
                f"processes={jax.process_count()} global_batch={global_batch} "
                f"per_device_batch={self.per_device_batch(global_batch)}")
        if state is not None:
            line += f" state_per_device={state_bytes_per_device(state) / 2 ** 20:.2f}MiB"
        return line


def _folding_step_key(train_step):
    """``train_step`` (``(state, batch, key, ...)``) taking the dropout key of the whole
    run instead: its key at step k is ``fold_in(dropout_key, k)``, as
    :func:`genjax.train.steps.make_batch_drawing_train_step` draws it."""

    def step(state, batch, dropout_key, *rest):
        return train_step(state, batch, jax.random.fold_in(dropout_key, state.step), *rest)

    return step


def state_bytes_per_device(tree) -> int:
    """The bytes of ``tree``'s arrays held by the fullest of this process's devices (each
    array counts its shards on that device: a replicated array its whole size, a sharded
    one its share). Host (numpy) leaves count on no device."""
    per_device: dict = {}
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            for shard in x.addressable_shards:
                per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)


def make_engine(kind: str = "pmap", n_devices: Optional[int] = None,
                global_batch: Optional[int] = None) -> Engine:
    """Choose the devices and check that the batch divides among them, before compiling.

    Args:
      kind: ``pmap``, ``sharding``, ``fsdp`` or ``none`` (``none`` uses one device).
      n_devices: devices to use; None = every device (``jax.device_count()``).
      global_batch: the global batch size, checked to be divisible by the device count
        (and by the process count).

    Raises:
      ValueError: unknown ``kind``; ``n_devices`` above the available count; ``none`` with
        ``n_devices > 1``; ``global_batch`` not divisible by the device count. The message
        names both numbers.
    """
    if kind not in ENGINES:
        raise ValueError(f"parallel engine must be one of {', '.join(ENGINES)}, got {kind!r}")
    available = jax.devices()
    if n_devices is None:
        n_devices = 1 if kind == "none" else len(available)
    if n_devices < 1:
        raise ValueError(f"--devices must be >= 1, got {n_devices}")
    if global_batch is not None and global_batch % n_devices:
        raise ValueError(f"global batch size {global_batch} is not divisible by the "
                         f"{n_devices} devices: choose a multiple of {n_devices}")
    if n_devices > len(available):
        raise ValueError(f"--devices {n_devices} exceeds the {len(available)} available "
                         f"{available[0].platform} device(s) (global batch {global_batch})")
    if kind == "none" and n_devices != 1:
        raise ValueError(f"--parallel none runs on one device, but --devices {n_devices} was "
                         "asked: use --parallel pmap, sharding or fsdp")
    if jax.process_count() > 1 and n_devices != len(available):
        raise ValueError(f"with {jax.process_count()} processes every device takes part: "
                         f"--devices {n_devices} != {len(available)}")
    if global_batch is not None and global_batch % n_devices:
        raise ValueError(f"global batch size {global_batch} is not divisible by the "
                         f"{n_devices} devices: choose a multiple of {n_devices}")
    # jax.devices() order (grouped by process) on every process, so that process i's
    # examples [i * B / P, (i + 1) * B / P) land on its own devices.
    devices = tuple(available[:n_devices])
    mesh = jax.make_mesh((n_devices,), (PMAP_AXIS if kind == "pmap" else MESH_AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    return Engine(kind=kind, devices=devices, mesh=mesh)


def split_host_into_devices(global_batch: int, n: Optional[int] = None) -> int:
    """Expose the CPU as several XLA devices, so data parallelism keeps every core busy.

    XLA's CPU backend runs the small matrix products of a model like the ``cpu`` preset
    poorly across threads; one device per core with its share of the batch is faster
    (``python -m experiments.benchmark_scaling``). Has effect only before JAX starts its
    backends and when ``XLA_FLAGS`` does not already force a host device count; it does
    not change accelerator devices (GPUs, TPUs stay as they are).

    Args:
      global_batch: the global batch; the default ``n`` divides it.
      n: host devices wanted; default: the largest count <= the usable cores that divides
        ``global_batch``.

    Returns:
      The host device count set, or 0 if it was left as it was.

    Raises:
      ValueError: ``n`` given and not a positive integer.
    """
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"--host-devices must be a positive integer, got {n!r}")
    if _HOST_FLAG in os.environ.get("XLA_FLAGS", ""):
        return 0
    if (jax._src.xla_bridge._backends or {}).get("cpu") is not None:  # already started
        return 0
    if n is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        n = max(d for d in range(1, max(1, cores or 1) + 1) if global_batch % d == 0)
    chex.set_n_cpu_devices(n)
    return n
