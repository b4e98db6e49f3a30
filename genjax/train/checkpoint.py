"""Orbax checkpoints of a run: the train state, the run's PRNG keys and JSON metadata.

Layout: ``RUN_DIR/checkpoints/<step>/{state,meta}``, written by an Orbax
``CheckpointManager`` (atomically: an interrupted save leaves a temporary folder that is
never read). ``state`` is the pytree ``{'train': TrainState, 'keys': {...}}``; ``meta`` a
JSON object with at least ``model`` (the model config), plus what the family adds (the
GPT's vocabulary). Arrays are saved without their device layout, so a checkpoint written
on 8 devices restores on 1, and the reverse.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import sys
import threading
import time
import traceback
from typing import Callable, Optional

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: missing, incompatible or unreadable."""


def _describe(error: BaseException) -> str:
    """The innermost cause of ``error`` in one line (Orbax wraps TensorStore's message, the
    informative one, in a generic "error while reading array index")."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300]}" if str(error) \
        else type(error).__name__


def _from_orbax_read(exc: Optional[BaseException], tb) -> bool:
    """Whether an exception is a by-product of a failed Orbax read: raised in Orbax's
    code or by TensorStore reading an Orbax (OCDBT) checkpoint, or asyncio's "Event loop is
    closed" from a TensorStore read finishing after that failure closed Orbax's loop."""
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    if "in OCDBT database at" in str(exc):  # TensorStore's own read error: no Python frames
        return True
    return any("orbax/checkpoint" in frame.filename.replace("\\", "/")
               for frame in traceback.extract_tb(tb))


class _OrbaxReadNoise(logging.Filter):
    """Drops asyncio's "exception was never retrieved" records of a failed Orbax read."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not ("never retrieved" in str(record.msg) and exc is not None
                    and _from_orbax_read(exc, exc.__traceback__))


class _FailedReadNoise:
    """Keeps the stray errors of a failed Orbax read off stderr, around restores.

    When one array of a checkpoint cannot be read, Orbax's restore raises (and genjax falls
    back to an older checkpoint), but its other reads are still in flight: as they finish,
    each reports its own failure or "Event loop is closed" through ``sys.unraisablehook``
    and asyncio's logger, up to hundreds of tracebacks for one reported problem. Inside
    ``with _FAILED_READ_NOISE:`` those, and only those, are dropped; anything else reaches
    the previous hook unchanged. After a restore that succeeded the filters go; after one
    that failed (:meth:`failed`) they stay for the rest of the process, since its reads may
    finish later.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._previous = None
        self._depth = 0
        self._sticky = False
        self._log_filter = _OrbaxReadNoise()

    def _hook(self, unraisable) -> None:
        if not _from_orbax_read(unraisable.exc_value, unraisable.exc_traceback):
            (self._previous or sys.__unraisablehook__)(unraisable)

    def __enter__(self):
        with self._lock:
            if self._depth == 0 and self._previous is None:
                self._previous = sys.unraisablehook
                sys.unraisablehook = self._hook
                logging.getLogger("asyncio").addFilter(self._log_filter)
            self._depth += 1
        return self

    def failed(self) -> None:
        """A read failed: keep filtering after the ``with`` block."""
        self._sticky = True

    def __exit__(self, *exc_info):
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and not self._sticky and self._previous is not None:
                if sys.unraisablehook == self._hook:
                    sys.unraisablehook = self._previous
                    self._previous = None
                    logging.getLogger("asyncio").removeFilter(self._log_filter)
        return False


_FAILED_READ_NOISE = _FailedReadNoise()


class _ReadOnlyNotice(logging.Filter):
    """Drops Orbax's notices that a read-only manager is read-only (``load_latest``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not (text.startswith("Given directory is read only")
                    or text.startswith("CheckpointManagerOptions.read_only=True"))


def checkpoint_dir(run_dir) -> pathlib.Path:
    """``RUN_DIR/checkpoints`` as an absolute path (Orbax wants one)."""
    return pathlib.Path(run_dir).absolute() / "checkpoints"


def saved_steps(run_dir) -> list[int]:
    """Steps of the complete checkpoints under ``RUN_DIR/checkpoints``, ascending.

    Reads the folder names only; creates nothing.
    """
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


class Checkpointer:
    """Saves and restores a run's checkpoints (an Orbax ``CheckpointManager``).

    Args:
      run_dir: the run directory; checkpoints go to ``run_dir/checkpoints``.
      max_to_keep: newest checkpoints kept; older ones are removed as new ones land.
      log: where to report fall-backs (``print`` by default).
    """

    def __init__(self, run_dir, max_to_keep: int = 3, log: Callable[[str], None] = print):
        self.directory = checkpoint_dir(run_dir)
        self.log = log
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "meta"),
        )

    def save(self, step: int, state, meta: dict) -> None:
        """Write checkpoint ``step`` (asynchronously; :meth:`close` waits for it)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def latest_step(self) -> Optional[int]:
        """The newest saved step, or None."""
        return self.manager.latest_step()

    def read_meta(self, step: int) -> dict:
        """The JSON metadata of checkpoint ``step``."""
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def restore_latest(self, abstract_state, check_meta: Callable[[dict], None]):
        """Restore the newest readable checkpoint.

        Args:
          abstract_state: a pytree of ``jax.ShapeDtypeStruct`` (with the target
            shardings) or arrays shaped like the saved state.
          check_meta: raises :class:`CheckpointError` if the saved metadata does not fit
            this run (a different model config, say); such an error is final.

        Returns:
          ``(step, state, meta)``.

        Raises:
          CheckpointError: no checkpoint, metadata that does not fit, or no checkpoint
            that can be read. An unreadable newest checkpoint is reported, moved aside to
            ``RUN_DIR/checkpoints_unreadable/<step>`` (never deleted) and the previous one
            is tried.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        with _FAILED_READ_NOISE as noise:
            for step in steps:
                try:
                    meta = self.read_meta(step)
                except Exception as e:  # noqa: BLE001 - any read failure means unreadable
                    noise.failed()
                    self._set_aside(step, e)
                    continue
                check_meta(meta)
                try:
                    restored = self.manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state)))
                except Exception as e:  # noqa: BLE001
                    noise.failed()
                    self._set_aside(step, e)
                    continue
                return step, restored["state"], meta
        raise CheckpointError(f"no readable checkpoint in {self.directory}; the unreadable "
                              f"ones were moved to {self.directory.parent / 'checkpoints_unreadable'}")

    def _set_aside(self, step: int, error: Exception) -> None:
        aside = self.directory.parent / "checkpoints_unreadable"
        aside.mkdir(exist_ok=True)
        target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        shutil.move(str(self.directory / str(step)), str(target))
        self.log(f"warning: checkpoint at step {step} is unreadable ({_describe(error)}); "
                 f"moved it to {target} and trying the previous one")
        self.manager.reload()

    def wait(self) -> None:
        """Wait for pending (asynchronous) saves to be complete on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, sharding=None):
    """``jax.ShapeDtypeStruct`` s shaped like ``tree``, optionally with one ``sharding``
    for every leaf or a pytree of them with ``tree``'s structure (``jax.tree.map`` raises
    ``ValueError`` when the structures differ)."""
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, sharding)


def load_latest(run_dir, device=None, log: Callable[[str], None] = print):
    """Read the newest readable checkpoint of ``run_dir`` onto one device, for sampling
    or inspection. Changes nothing on disk.

    Returns:
      ``(step, state, meta)``: ``state`` is the saved pytree as nested dicts
      (``state['train']['params']`` ...), ``meta`` the saved JSON metadata.

    Raises:
      CheckpointError: no checkpoint, or none readable.
    """
    directory = checkpoint_dir(run_dir)
    steps = saved_steps(run_dir)
    if not steps:
        raise CheckpointError(f"no checkpoint in {directory}: is --run-dir {run_dir} a "
                              "training run's directory?")
    device = device or jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    # Handlers named up front: without them item_metadata() knows no "state" until a first
    # restore, and a restore without a target puts arrays back on the saved mesh (or fails,
    # when this process has other devices).
    notice = _ReadOnlyNotice()
    logging.getLogger("absl").addFilter(notice)
    try:
        manager = ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})
    finally:
        logging.getLogger("absl").removeFilter(notice)
    try:
        with _FAILED_READ_NOISE as noise:
            for step in reversed(steps):
                try:
                    meta = manager.restore(step, args=ocp.args.Composite(
                        meta=ocp.args.JsonRestore()))["meta"]
                    tree = manager.item_metadata(step)["state"]
                    abstract = jax.tree.map(
                        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
                    state = manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract)))["state"]
                    return step, state, meta
                except Exception as e:  # noqa: BLE001 - any read failure: try an older one
                    noise.failed()
                    log(f"warning: checkpoint at step {step} is unreadable ({_describe(e)}); "
                        "trying the previous one")
    finally:
        manager.close()
    raise CheckpointError(f"no readable checkpoint in {directory}")
