"""The training loop shared by every model family: config -> data -> state -> steps -> loop.

A model family describes itself with a :class:`Task` (its parameters and model state, its
loss or its updates, batches and reports); :func:`fit` does the rest the same way for all:
devices, optimizers, the run directory (``config.json``, ``metrics.jsonl``), progress bar,
evaluation, Orbax checkpoints and resumption.

Randomness: ``PRNGKey(seed)`` is split once into init, data, dropout and eval keys, saved
with every checkpoint. The batch at step k is drawn with ``fold_in(data_key, k)`` and its
dropout with ``fold_in(dropout_key, k)``, so a resumed run takes the very same steps as an
uninterrupted one, on any device count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from genjax.train.checkpoint import Checkpointer, CheckpointError, abstract_like, saved_steps
from genjax.train.config import TrainConfig, config_records, started_now
from genjax.train.host import tune_host_allocator
from genjax.train.optim import make_optimizer
from genjax.train.parallel import Engine, make_engine
from genjax.train.steps import (Evaluation, LossFn, Optimizers, TrainState, Update,
                                create_train_state, init_train_state)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
    """What a model family hands to :func:`fit`.

    A family whose model is its parameters alone gives ``loss_fn``: every train step is
    one update of all parameters with one optimizer. A family with model state besides
    its parameters (BatchNorm statistics: ``init_model_state``) or with several players
    (a GAN) gives ``updates`` and ``evaluation`` instead.

    Attributes:
      name: short name, used in messages.
      init_params: ``key -> params`` (with grouped ``updates``: a dict of one parameter
        tree per group).
      loss_fn: ``(params, batch, key, train) -> (loss, metrics)``, see
        :mod:`genjax.train.steps`; None when ``updates`` and ``evaluation`` are given.
      train_batch: ``(data_key, step, start, stop) -> batch``: examples ``[start, stop)`` of
        the global training batch of step ``step`` (a process loads only its share).
      eval_batches: ``(split, key, start, stop) -> iterable of batches`` for each name in
        ``eval_splits``, the same share convention.
      eval_splits: the splits evaluated; their metrics are reported as ``{split}_{name}``
        (``{split}_loss`` for ``loss_fn``'s loss).
      meta: JSON metadata saved in every checkpoint; ``meta['model']`` must match when a
        run resumes, and ``meta['family']`` names the model family.
      items_per_example: e.g. ``block_size`` tokens per GPT example, 1 image per image.
      item_name: ``tokens`` or ``images``: throughput is logged as ``{item_name}_per_s``.
      report: optional ``(variables, key, step) -> dict`` called at each evaluation on
        single-device variables (the parameters, or with model state the Flax variables
        ``{'params': ..., 'batch_stats': ...}``), for the family's own figures and files.
      batches_in_step: ``train_batch`` is traceable (jax.numpy only; ``step`` may be a
        tracer): :func:`fit` then draws each global batch inside the compiled train step,
        so the host only dispatches steps (on a 2-core CPU the host's batch work
        otherwise competes with the devices' threads).
      eval_batch: optional traceable ``(split, key, start, stop) -> batch``, one
        evaluation batch of ``split`` drawn with ``key`` (``jax.numpy`` only). With it,
        each evaluation is one compiled program of ``eval_iters`` batches per split
        (:meth:`~genjax.train.parallel.Engine.compile_eval_program`), and
        ``eval_batches`` must yield the same batches, ``eval_batch(split, fold_in(key,
        i), start, stop)`` for ``i < eval_iters``, for callers that iterate on the host.
      eval_iters: batches per split of the in-program evaluation (with ``eval_batch``).
      init_model_state: optional ``key -> model state`` (``{'batch_stats': ...}``),
        carried in :class:`~genjax.train.steps.TrainState`, updated by the train step,
        averaged over devices, saved in checkpoints and restored on resume.
      updates: the :class:`~genjax.train.steps.Update` s of one train step, in order;
        updates with a ``group`` each get their own optimizer (built from the
        :class:`TrainConfig` like the single one), their state kept per group.
      evaluation: the :class:`~genjax.train.steps.Evaluation` of each evaluation batch:
        required with ``updates``; with ``loss_fn`` it replaces the default (the loss and
        its metrics with dropout off), e.g. when a report gives those figures over every
        held-out image instead.

    Raises:
      ValueError: neither ``loss_fn`` nor ``updates`` with ``evaluation``, or both
        ``loss_fn`` and ``updates``; a model state without ``updates`` (a plain
        ``loss_fn`` cannot update it).
    """

    name: str
    init_params: Callable[[jax.Array], Any]
    loss_fn: Optional[LossFn] = None
    train_batch: Callable[[jax.Array, int, int, int], Any]
    eval_batches: Callable[[str, jax.Array, int, int], Iterable[Any]]
    eval_splits: tuple[str, ...]
    meta: Mapping[str, Any]
    items_per_example: int = 1
    item_name: str = "examples"
    report: Optional[Callable[[Any, jax.Array, int], dict]] = None
    batches_in_step: bool = False
    eval_batch: Optional[Callable[[str, jax.Array, int, int], Any]] = None
    eval_iters: int = 0
    init_model_state: Optional[Callable[[jax.Array], Any]] = None
    updates: tuple[Update, ...] = ()
    evaluation: Optional[Evaluation] = None

    def __post_init__(self):
        if self.loss_fn is not None:
            wrong = bool(self.updates)
        else:
            wrong = not (self.updates and self.evaluation is not None)
        if wrong:
            raise ValueError(f"Task {self.name!r}: give either loss_fn, or updates and "
                             "evaluation")
        if self.init_model_state is not None and not self.updates:
            raise ValueError(f"Task {self.name!r}: a model state needs updates that return "
                             "it (a loss_fn cannot)")

    @property
    def objective(self):
        """What the train step runs: ``updates``, or ``loss_fn``."""
        return self.updates or self.loss_fn

    @property
    def eval_objective(self):
        """What an evaluation runs: ``evaluation``, or ``loss_fn`` with dropout off."""
        return self.evaluation or self.loss_fn

    def optimizers(self, cfg: TrainConfig) -> tuple[Optimizers, optax.Schedule]:
        """``(tx, schedule)`` from ``cfg`` (:func:`~genjax.train.optim.make_optimizer`):
        one optimizer, or with grouped updates a dict of one per group."""
        tx, schedule = make_optimizer(cfg)
        groups = [u.group for u in self.updates if u.group is not None]
        if groups:
            return {group: make_optimizer(cfg)[0] for group in dict.fromkeys(groups)}, schedule
        return tx, schedule


NO_RESUME = (" (nothing to resume there: start again with another --run-dir, or delete its "
             "config.json and metrics.jsonl)")
LONG_RUN_S = 3600.0  # a run estimated to need longer says so after its first steps


class _LossPlot:
    """``RUN_DIR/loss.png``: the run's loss figures (a resumed run's earlier records in
    ``metrics.jsonl`` included) against the step, the learning rate on a second axis,
    redrawn after each evaluation on one background thread, so that drawing overlaps
    training (or the first step's compilation) instead of pausing it."""

    def __init__(self, run_dir: pathlib.Path, name: str, enabled: bool, log):
        import concurrent.futures

        self.run_dir, self.name, self.records, self.log = run_dir, name, [], log
        self.pool = concurrent.futures.ThreadPoolExecutor(1) if enabled else None
        # matplotlib's imports and font loading (most of a first drawing's ~0.4 s) now,
        # beside compilation, rather than inside the first timed steps
        self.pending = self.pool.submit(self._warm_up) if enabled else None
        path = run_dir / "metrics.jsonl"
        if enabled and path.is_file():  # a resumed run's records so far
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by a killed run: not a record
                    continue
                if isinstance(record, dict) and "step" in record:
                    self.records.append(record)

    def add(self, record: dict) -> None:
        if self.pool is None:
            return
        self.records.append(record)
        self.wait()
        self.pending = self.pool.submit(self._draw, list(self.records))

    def _warm_up(self) -> None:
        try:
            from genjax.viz import save_loss_curves

            save_loss_curves(os.devnull, {self.name: [{"step": 0, "loss": 1.0}]})
        except Exception:  # the first real drawing will say what is wrong
            pass

    def _draw(self, records) -> None:
        try:
            from genjax.viz import save_loss_curves

            tmp = self.run_dir / "loss.png.tmp.png"
            save_loss_curves(tmp, {self.name: records},
                             title=f"{self.name}: {self.run_dir.name}")
            os.replace(tmp, self.run_dir / "loss.png")  # never a half-written picture
        except Exception as e:  # a picture never stops a run
            self.log(f"warning: loss.png not drawn ({type(e).__name__}: {e})")

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def close(self) -> None:
        if self.pool is not None:
            try:
                self.wait()
            finally:
                self.pool.shutdown()


class _Progress:
    """The loop's progress: on a terminal a ``tqdm`` bar; when stderr is not a terminal
    (a log file, CI, ``nohup``) or ``TQDM_DISABLE`` is set, one plain line every ``every``
    steps (about 20 in a run, a multiple of ``log_interval``) instead of carriage-return
    updates. It starts after the first step, so its rate and time estimate leave
    compilation out."""

    def __init__(self, name: str, cfg: TrainConfig, step0: int, enabled: bool, log,
                 item_name: str, items_per_step: int):
        self.name, self.total, self.log = name, cfg.max_iters, log
        self.item_name, self.items_per_step = item_name, items_per_step
        self.enabled = enabled and cfg.max_iters > step0
        self.plain = os.environ.get("TQDM_DISABLE", "") not in ("", "0") \
            or not sys.stderr.isatty()
        n = max(1, round(cfg.max_iters / 20 / cfg.log_interval)) * cfg.log_interval
        self.every = n
        self.bar = None

    def start(self, done: int) -> None:
        if self.enabled and not self.plain:
            self.bar = tqdm(total=self.total, initial=done, desc=self.name, dynamic_ncols=True)

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)

    def show(self, done: int, losses: dict, rate: float) -> None:
        """The last step's losses and the throughput (items per second, training only)."""
        text = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in losses.items())
        text += f", {rate:,.0f} {self.item_name}/s"
        if self.bar is not None:
            self.update(done)
            self.bar.set_postfix_str(text)
        elif self.enabled and self.plain and (done % self.every == 0 or done == self.total):
            left = (self.total - done) * self.items_per_step / max(rate, 1e-9)
            self.log(f"step {done}/{self.total}: {text}, about "
                     f"{_duration(left)} left")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``12s``."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, or :func:`request_stop`) stopped :func:`fit`, which has said in
    one line where the run stands. ``status``: the exit status a command gives it (128 + the
    signal: 130 for SIGINT and a closed output, 143 for SIGTERM)."""

    def __init__(self, status: int = 130):
        super().__init__(status)
        self.status = status


class DivergedError(RuntimeError):
    """A training loss or the parameters became non-finite (nan or inf). The message names
    the step and the last checkpoint saved, which holds finite parameters."""


_STOP = {"reason": None}  # set by request_stop, read by fit between steps


def request_stop(reason: Optional[str]) -> None:
    """Ask a running :func:`fit` to stop at its next step boundary as Ctrl-C does (the
    save in flight lands, and one line on stderr names ``reason`` and the checkpoint to
    resume from); a :func:`fit` that starts while a stop is requested stops before it
    writes anything. Only a job of one process stops (a process leaving a job of several
    alone would leave the others in their collectives). :func:`genjax.train.cli.run_command`
    asks for it when the reader of standard output is gone (``| head``), and withdraws it
    (``request_stop(None)``) when the command returns."""
    _STOP["reason"] = reason


def _stop_reason() -> Optional[str]:
    return _STOP["reason"] if _STOP["reason"] and jax.process_count() == 1 else None


def _say_stop(line: str, log=None) -> None:
    """``line`` by ``log`` and, on process 0, on stderr too unless stdout is the same file
    (``| tee``, which the same Ctrl-C stops, or ``> log``: the terminal still hears it); with
    no ``log``, on stderr only (stdout's reader is gone; stderr's may be too)."""
    if log is not None:
        log(line)
        try:
            if not is_main_process() or os.path.sameopenfile(1, 2):
                return
        except (OSError, ValueError):
            pass
    if not is_main_process():
        return
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


def _stop_if_asked(run_dir) -> None:
    """Raise :class:`RunInterrupted` if a stop was asked for before training began."""
    if _stop_reason():
        _say_stop(f"stopped before training: {_stop_reason()}; nothing was written in "
                  f"{run_dir}")
        raise RunInterrupted


def _remove_unfinished_run(run_dir: pathlib.Path, held_before: Optional[set]) -> list:
    """Remove what a new run that saved no checkpoint wrote in ``run_dir`` (its records,
    ``loss.png``, its TensorBoard events, an empty ``checkpoints/``), and ``run_dir`` itself
    if the run created it and it is left empty; nothing the directory held before the run
    (``held_before``: its entries then, None if it did not exist) is touched. Returns the
    names removed."""
    import shutil

    created, held_before = held_before is None, held_before or set()
    removed = []
    for name in (*RUN_RECORDS, "loss.png", "tensorboard", "checkpoints"):
        path = run_dir / name
        if name in held_before or not path.exists():
            continue
        if name == "checkpoints" and any(path.iterdir()):
            continue  # (never a saved step here, but leave whatever Orbax left)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        removed.append(name)
    if created and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()
    return removed


@contextlib.contextmanager
def _sigint_requests_stop():
    """While training, SIGINT (Ctrl-C) or SIGTERM (``kill``, ``timeout``, a scheduler's
    stop) only sets ``requested`` (the signal's number), which the loop reads between steps:
    the signal never lands inside JAX's or Orbax's callbacks and threads, where a
    ``KeyboardInterrupt`` can be swallowed. A second one raises at once."""
    flag = {"requested": 0}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if flag["requested"]:
            raise KeyboardInterrupt
        flag["requested"] = signum  # (said once, in fit's one line, when the loop stops)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, action in previous.items():
            signal.signal(sig, action)


STOP_CHECK_EVERY = 10
"""In a job of several processes, the steps at which they agree whether to stop (one small
all-gather): a signal reaches each process at its own moment, and one that left the loop
alone would leave the others waiting in a collective."""


def _stop_signal(sigint: dict, step: int, agree: bool) -> int:
    """The signal asking this job to stop at ``step`` (0: none). One process: its own flag.
    Several: at every ``STOP_CHECK_EVERY``-th step (or with ``agree``, at a point every
    process reaches), the first flag set among all the processes, so that all stop at the
    same step; 0 at the other steps."""
    if jax.process_count() == 1:
        return sigint["requested"]
    if not agree and step % STOP_CHECK_EVERY:
        return 0
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(sigint["requested"]))
    return int(next((f for f in np.ravel(flags) if f), 0))


def _one_job_arrays(tree):
    """With several processes, the arrays a checkpoint of the whole job holds: a replicated
    array that lives on this process's devices only (pmap's outputs) becomes the job's
    global array (Orbax writes each once, for all processes)."""
    if jax.process_count() == 1:
        return tree
    from orbax.checkpoint.utils import fully_replicated_host_local_array_to_global_array

    return jax.tree.map(lambda x: fully_replicated_host_local_array_to_global_array(x)
                        if isinstance(x, jax.Array) and x.is_fully_addressable else x, tree)


def _all_finite(tree) -> bool:
    """Whether every floating-point leaf of ``tree`` is finite (one compiled reduction,
    one device round trip)."""
    return bool(_all_finite_jit(tree))


@jax.jit
def _all_finite_jit(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
      state: the final :class:`TrainState`, on the engine's devices (replicated, or under
        ``fsdp`` sharded as :meth:`~genjax.train.parallel.Engine.state_sharding` says).
      history: the evaluation records written to ``metrics.jsonl`` by this call.
      engine: the engine used (``engine.to_single_device(state.variables)`` for sampling).
      keys: the run's PRNG keys (``init``, ``data``, ``dropout``, ``eval``).
      run_dir: the run directory.
      start_step: the step this call started from (0, or the checkpoint's when resumed);
        ``int(state.step) == start_step`` when there was nothing to train.
    """

    state: TrainState
    history: list
    engine: Engine
    keys: dict
    run_dir: pathlib.Path
    start_step: int = 0


def run_keys(seed: int) -> dict:
    """The run's four keys, split from ``PRNGKey(seed)``: init, data, dropout, eval."""
    init, data, dropout, evaluation = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {"init": init, "data": data, "dropout": dropout, "eval": evaluation}


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes logs, configs and samples."""
    return jax.process_index() == 0


RUN_RECORDS = ("config.json", "metrics.jsonl")
"""The files of a run directory that :func:`fit` writes besides the checkpoints."""


def check_run_dir(run_dir, resume: bool) -> None:
    """Refuse to start a new run over existing checkpoints or run records, or to resume
    from nothing.

    Raises:
      FileExistsError: ``resume`` is False and ``run_dir`` holds checkpoints, or the
        ``config.json`` / ``metrics.jsonl`` of a run that stopped before its first
        checkpoint (a new run would overwrite and append to them).
      FileNotFoundError: ``resume`` is True and ``run_dir`` holds no checkpoint.
      NotADirectoryError: ``run_dir`` (or a folder above it) is a file.
    """
    for folder in (pathlib.Path(run_dir), *pathlib.Path(run_dir).parents):
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"--run-dir {run_dir}: {folder} is a file, not a "
                                     "directory; choose another --run-dir")
    steps = saved_steps(run_dir)
    if steps and not resume:
        raise FileExistsError(
            f"{run_dir} already holds checkpoints (steps {steps}); pass --resume to continue "
            "that run, or choose another --run-dir. Nothing was changed.")
    # Process 0 writes the records: another host could see them already written.
    records = [name for name in RUN_RECORDS if (pathlib.Path(run_dir) / name).exists()]
    if records and not steps and not resume and is_main_process():
        raise FileExistsError(
            f"{run_dir} already holds {' and '.join(records)} of a run that saved no "
            "checkpoint; choose another --run-dir, or delete them to start over there. "
            "Nothing was changed.")
    if resume and not steps:
        advice = (f"it holds {' and '.join(records)} of a run stopped before its first "
                  "checkpoint: choose another --run-dir, or delete them to start over there"
                  if records else "drop --resume to start a new run there")
        raise FileNotFoundError(
            f"--resume: no checkpoint in {pathlib.Path(run_dir) / 'checkpoints'}; {advice}.")


def _model_meta_checker(expected: Mapping[str, Any]):
    """A check that a checkpoint's metadata is this run's: every entry of ``task.meta``
    other than the model config first (the GPT's vocabulary, which follows from the data:
    a changed text also changes ``vocab_size``, and the data is the cause to name), then
    the model config, each differing field named. Both are compared as saved, in JSON form
    (a config's tuple comes back as a list)."""
    expected = json.loads(json.dumps(expected))

    def check(meta: dict) -> None:
        if "family" in expected and meta.get("family") != expected["family"]:
            raise CheckpointError(
                f"the checkpoint holds a {meta.get('family')!r} model, not this experiment's "
                f"{expected['family']!r}: resume it with its own experiment, or start a new "
                "--run-dir. Nothing was changed.")
        for name in sorted(set(expected) - {"model"}):
            if name not in meta and name == "split":  # a checkpoint of an earlier genjax
                continue
            if meta.get(name) != expected[name]:
                raise CheckpointError(
                    f"the checkpoint's {name} differs from this run's (checkpoint "
                    f"{meta.get(name)!r:.200} vs this run {expected[name]!r:.200}): resume on "
                    "the same data, or start a new --run-dir. Nothing was changed.")
        saved, wanted = meta.get("model"), expected.get("model")
        if saved != wanted:
            saved, wanted = saved or {}, wanted or {}
            diff = {k: (saved.get(k), wanted.get(k)) for k in sorted(set(saved) | set(wanted))
                    if saved.get(k) != wanted.get(k)}
            text = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(
                f"the checkpoint's model config differs from this run's ({text}); resume with "
                "the same model flags, or start a new --run-dir. Nothing was changed.")
    return check


def _set_aside_records_after(path: pathlib.Path, step: int, log) -> None:
    """Move the records of steps after ``step`` out of ``metrics.jsonl``.

    A run resumed from an earlier checkpoint than its last record (the newest was
    unreadable, or the run stopped between a record and its checkpoint) would otherwise log
    those steps twice. The records go to ``metrics.superseded-<time>.jsonl`` beside it;
    nothing is deleted.
    """
    if not path.exists():
        return
    keep, later = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            later_step = json.loads(line).get("step", 0) > step
        except (ValueError, AttributeError):  # not a record: keep it where it is
            later_step = False
        (later if later_step else keep).append(line)
    if later:
        aside = path.with_name(f"metrics.superseded-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        aside.write_text("".join(later))
        path.write_text("".join(keep))
        log(f"{path.name} held {len(later)} record(s) after step {step}, the step resumed "
            f"from; moved them to {aside.name}")


def _losses(metrics: Mapping[str, Any]) -> dict:
    """A train step's losses: ``loss``, or each update's ``{name}_loss``."""
    return {k: v for k, v in metrics.items() if k == "loss" or k.endswith("_loss")}


def _saved_form(state: TrainState) -> dict:
    """The train state as checkpoints hold it: a dict of its fields, without
    ``model_state`` when there is none (so that checkpoints of models without state keep
    the layout they always had, and older ones still restore)."""
    saved = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    if state.model_state is not None:
        saved["model_state"] = state.model_state
    return saved


def _config_changed(run_dir: pathlib.Path, config_record: dict) -> bool:
    """Whether ``config_record`` differs from the run's latest config record (or there is
    none readable): a resume that changed nothing records nothing new."""
    records = config_records(run_dir)
    try:
        latest = json.loads(records[-1].read_text()) if records else None
    except (OSError, ValueError):
        return True
    if isinstance(latest, dict):
        latest.pop("started", None)
    return latest != json.loads(json.dumps(config_record))


def _write_json(path: pathlib.Path, obj) -> None:
    """Write ``obj`` to ``path`` whole or not at all (a temporary file, then a rename)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    partial.replace(path)


def evaluate(task: Task, engine: Engine, eval_step, variables, key: jax.Array,
             global_batch: int) -> dict:
    """Mean eval metrics of each split, as ``{split}_{metric}`` floats (dropout off).

    ``variables`` (the parameters, or the Flax variables of a model with state) are on
    the engine's devices (placed as the train state); each split's batches come from
    ``task.eval_batches(split, fold_in(key, split index), start, stop)``, where
    ``[start, stop)`` is this process's share of a global batch of ``global_batch``.
    """
    start, stop = engine.local_share(global_batch)
    out = {}
    for i, split in enumerate(task.eval_splits):
        split_key = jax.random.fold_in(key, i)
        sums, n = None, 0
        for j, batch in enumerate(task.eval_batches(split, split_key, start, stop)):
            m = eval_step(variables, engine.put_batch(batch), jax.random.fold_in(split_key, j))
            # One program in flight at a time (see MAX_IN_FLIGHT in fit).
            sums = jax.block_until_ready(m if sums is None else jax.tree.map(jnp.add, sums, m))
            n += 1
        if n == 0:
            raise ValueError(f"{task.name}: split {split!r} gave no evaluation batch")
        out.update({f"{split}_{k}": float(v) / n for k, v in jax.device_get(sums).items()})
    return out


def fit(task: Task, cfg: TrainConfig, run_dir, *, resume: bool = False,
        config_record: Optional[dict] = None, log: Optional[Callable[[str], None]] = None,
        progress: bool = True, plot: bool = False, tensorboard: bool = False) -> FitResult:
    """Train ``task`` under ``cfg`` in ``run_dir``: the shared loop of every experiment.

    Evaluates at step 0 (a new run), every ``eval_interval`` steps and at ``max_iters``;
    each evaluation appends a record (``step``, ``{split}_{metric}`` ..., the report's
    figures, ``elapsed_s``, ``{item}_per_s``, ``lr``, and the last train step's losses as
    ``batch_loss`` or ``batch_{name}_loss``) to ``metrics.jsonl`` and saves a checkpoint
    (the train state with its model state, and the run's keys; except at step 0).
    ``config_record`` (the experiment's whole config) is written to ``config.json``, or
    beside it as ``config.resume-<step>.json`` on a resumption that changed it, with the
    time of this start as ``started`` (see :func:`~genjax.train.config.config_records`).
    With ``plot``, each evaluation also redraws ``loss.png``
    (:func:`genjax.viz.save_loss_curves`; the experiments turn it on). ``progress``: a bar
    on a terminal, plain lines otherwise (:class:`_Progress`).
    ``tensorboard``: each record's numbers also go to TensorBoard event files in
    ``RUN_DIR/tensorboard`` (``tensorboardX``'s writer, which does not import TensorFlow).
    On CPU devices it tunes the process's malloc first
    (:func:`genjax.train.host.tune_host_allocator`; ``GENJAX_TUNE_MALLOC=0`` leaves it).

    Raises:
      ValueError: devices and batch that do not fit (before compilation); ``tensorboard``
        without ``tensorboardX`` installed.
      FileExistsError / FileNotFoundError: see :func:`check_run_dir` (nothing is touched).
      CheckpointError: the checkpoint's model config or other ``task.meta`` entry (the
        GPT's vocabulary) differs, or no checkpoint is readable.
      DivergedError: a training loss (checked after every step) or the parameters (checked
        before every checkpoint) became non-finite; no checkpoint of them is saved.
      RunInterrupted: SIGINT (Ctrl-C) or SIGTERM, or a stop asked for with
        :func:`request_stop`, read between steps (in a job of several processes, agreed
        among them every ``STOP_CHECK_EVERY`` steps): the save in flight lands, one line
        names the checkpoint to resume from; a new run that saved none removes what it
        wrote in ``run_dir`` (nothing the directory held before), so that it can start a
        run again.
    """
    with _sigint_requests_stop() as sigint:
        return _fit(task, cfg, run_dir, resume=resume, config_record=config_record, log=log,
                    progress=progress, plot=plot, tensorboard=tensorboard, sigint=sigint)


def _fit(task, cfg, run_dir, *, resume, config_record, log, progress, plot, tensorboard,
         sigint) -> FitResult:
    log = log or (lambda s: tqdm.write(s) if is_main_process() else None)
    if tensorboard and importlib.util.find_spec("tensorboardX") is None:
        raise ValueError("--tensorboard needs tensorboardX: pip install 'genjax[tensorboard]'")
    t_start = time.perf_counter()
    engine = make_engine(cfg.parallel, cfg.devices, cfg.batch_size)
    if engine.devices[0].platform == "cpu":
        tune_host_allocator()  # XLA:CPU's per-step buffers on warm pages
    check_run_dir(run_dir, resume)
    run_dir = pathlib.Path(run_dir)
    _stop_if_asked(run_dir)  # (nothing of this run is written yet)
    start, stop = engine.local_share(cfg.batch_size)

    tx, schedule = task.optimizers(cfg)
    keys = run_keys(cfg.seed)

    def init_state(key):
        model_state = task.init_model_state(key) if task.init_model_state else None
        return create_train_state(task.init_params(key), tx, model_state)

    if resume:
        shapes = _saved_form(jax.eval_shape(init_state, keys["init"]))
        abstract = {"train": abstract_like(shapes, engine.state_sharding(shapes)),
                    "keys": abstract_like(keys, engine.replicated)}
        ckpt = Checkpointer(run_dir, cfg.max_to_keep, log=log)
        step0, restored, _ = ckpt.restore_latest(abstract, _model_meta_checker(task.meta))
        state, keys = TrainState(**restored["train"]), restored["keys"]
        log(f"resumed {run_dir} from step {step0}")
        if step0 >= cfg.max_iters:
            log(f"the checkpoint is at step {step0}, at or past --max-iters {cfg.max_iters}: "
                "nothing to train (raise --max-iters to continue)")
    else:
        state = init_train_state(task.init_params, tx, keys["init"], engine.state_sharding,
                                 task.init_model_state)
        keys = engine.put_replicated(keys)
        step0 = 0

    log(f"{task.name}: {engine.describe(cfg.batch_size, state)}")
    _stop_if_asked(run_dir)
    # what the directory held before this run: a new run stopped before its first
    # checkpoint removes only what it wrote (_remove_unfinished_run)
    held_before = set(os.listdir(run_dir)) if run_dir.is_dir() else None
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        if (config_record is not None and step0 < cfg.max_iters  # a no-op resume: none
                and (step0 == 0 or _config_changed(run_dir, config_record))):
            name = "config.json" if step0 == 0 else f"config.resume-{step0}.json"
            _write_json(run_dir / name, {**config_record, "started": started_now()})
    if not resume:
        ckpt = Checkpointer(run_dir, cfg.max_to_keep, log=log)

    if task.batches_in_step:
        batch_size = cfg.batch_size
        train_step = engine.compile_train_step(
            task.objective, tx, schedule,
            batch_fn=lambda data_key, step: task.train_batch(data_key, step, 0, batch_size))
    else:
        train_step = engine.compile_train_step(task.objective, tx, schedule)
    if task.eval_batch is not None:  # the whole evaluation in one program
        batch_size = cfg.batch_size
        eval_program = engine.compile_eval_program(
            task.eval_objective, lambda split, key: task.eval_batch(split, key, 0, batch_size),
            task.eval_splits, task.eval_iters)

        def run_eval(variables, key) -> dict:
            return {k: float(v) for k, v in jax.device_get(eval_program(variables, key)).items()}
    else:
        eval_step = engine.compile_eval_step(task.eval_objective)

        def run_eval(variables, key) -> dict:
            return evaluate(task, engine, eval_step, variables, key, cfg.batch_size)

    metrics_path = run_dir / "metrics.jsonl"
    if resume and is_main_process():
        _set_aside_records_after(metrics_path, step0, log)
    loss_plot = _LossPlot(run_dir, task.name, plot and is_main_process(), log)
    history: list = []
    items_per_step = cfg.batch_size * task.items_per_example
    rate_key = f"{task.item_name}_per_s"
    # Throughput counts training steps only: not compilation, evaluation or checkpoints.
    timer = {"mark": time.perf_counter(), "pending": 0, "steps": 0, "seconds": 0.0}

    def measure() -> float:
        now = time.perf_counter()
        timer["seconds"] += now - timer["mark"]
        timer["steps"] += timer["pending"]
        timer["mark"], timer["pending"] = now, 0
        return timer["steps"] * items_per_step / max(timer["seconds"], 1e-9)

    board: dict = {}  # the TensorBoard writer, opened at the first evaluation

    def do_eval(step: int, last_metrics) -> None:
        record = {"step": step}
        record.update(run_eval(state.variables, jax.random.fold_in(keys["eval"], step)))
        if task.report is not None:
            report_key = engine.to_single_device(jax.random.fold_in(keys["eval"], step))
            record.update(task.report(engine.to_single_device(state.variables), report_key,
                                      step) or {})
        if timer["steps"]:
            record[rate_key] = timer["steps"] * items_per_step / timer["seconds"]
        record["lr"] = float(schedule(step))
        if last_metrics is not None:  # the losses of the last training step
            record.update({f"batch_{k}": float(v) for k, v in _losses(last_metrics).items()})
        record["elapsed_s"] = time.perf_counter() - t_start
        history.append(record)
        if is_main_process():
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            loss_plot.add(record)
            if tensorboard:
                if "writer" not in board:
                    from tensorboardX import SummaryWriter

                    # (a resume drops the events of the steps after its checkpoint)
                    board["writer"] = SummaryWriter(str(run_dir / "tensorboard"),
                                                    purge_step=step0 + 1 if resume else None)
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)):
                        board["writer"].add_scalar(k, v, step)
                board["writer"].flush()
        shown = {k: v for k, v in record.items()
                 if k.endswith("_loss") and not k.startswith("batch_")}
        log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
        timer.update(steps=0, seconds=0.0)

    def diverged(step: int, what: str) -> DivergedError:
        ckpt.wait()  # a save in flight lands first
        steps = saved_steps(run_dir)
        return DivergedError(
            f"the run diverged: {what} at step {step}; "
            + (f"the last good checkpoint is step {steps[-1]} in {run_dir} (--resume with a "
               "smaller --learning-rate)" if steps
               else f"no checkpoint was saved in {run_dir}{NO_RESUME}")
            + ". Nothing non-finite was saved.")

    def save(step: int) -> None:  # (the parameters were found finite just before)
        ckpt.save(step, _one_job_arrays({"train": _saved_form(state), "keys": keys}),
                  dict(task.meta))

    def check_finite(step: int, metrics) -> None:
        losses = {k: float(v) for k, v in jax.device_get(_losses(metrics)).items()}
        bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
        if bad:
            raise diverged(step, ", ".join(f"{k} {v}" for k, v in bad.items()))

    if step0 == 0:
        do_eval(0, None)

    bar = _Progress(task.name, cfg, step0, progress and is_main_process(), log,
                    task.item_name, items_per_step)
    metrics = None
    done = step0  # steps completed
    stopping = 0  # the signal the job agreed to stop on
    try:
        for step in range(step0, cfg.max_iters):
            stopping = _stop_signal(sigint, step, agree=step == step0)
            if stopping or _stop_reason():
                raise KeyboardInterrupt
            previous = metrics
            if task.batches_in_step:  # the same batch and key, drawn inside the step
                state, metrics = train_step(state, keys["data"], keys["dropout"])
            else:
                batch = engine.put_batch(task.train_batch(keys["data"], step, start, stop))
                state, metrics = train_step(state, batch, keys["dropout"])  # folded inside
            if previous is not None:
                # At most two steps in flight: the host stays just ahead of the devices, and
                # XLA:CPU's collectives cannot pile up (many queued multi-device programs
                # can deadlock its all-reduce rendezvous).
                jax.block_until_ready(previous)
                check_finite(step, previous)  # the step that left `step` done
            done = step + 1
            if done == step0 + 1:
                jax.block_until_ready(metrics)  # the first step compiles: not timed
                timer["mark"] = timer["first"] = time.perf_counter()
                bar.start(done)  # its clock starts after compilation
            else:
                timer["pending"] += 1
                bar.update(done)
                if done == step0 + 3 and done < cfg.max_iters:  # two timed steps: a first estimate
                    jax.block_until_ready(metrics)
                    per_step = (time.perf_counter() - timer["first"]) / 2
                    left = per_step * (cfg.max_iters - done)
                    if left > LONG_RUN_S:
                        log(f"warning: about {per_step:.2g} s per step here: the "
                            f"{cfg.max_iters - done:,} steps left take about {_duration(left)} "
                            "(Ctrl-C stops the run; --resume continues it)")
            at_eval = done % cfg.eval_interval == 0 or done == cfg.max_iters
            if at_eval or done % cfg.log_interval == 0:
                losses = {k: float(v) for k, v in _losses(metrics).items()}  # waits for the device
                bar.show(done, losses, measure())
            if at_eval:  # nothing non-finite is evaluated, recorded or saved
                check_finite(done, metrics)
                if not _all_finite(state.params):
                    raise diverged(done, "the parameters are not finite")
                do_eval(done, metrics)
                save(done)
                timer["mark"] = time.perf_counter()
        # during the last step, evaluation or save (a finished run keeps its sample when
        # only its output went away)
        stopping = _stop_signal(sigint, done, agree=True)
        if stopping or (_stop_reason() and done < cfg.max_iters):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        ckpt.wait()  # a save in flight lands first
        steps = saved_steps(run_dir)
        reason = _stop_reason()
        signum = stopping or sigint["requested"] or signal.SIGINT
        what = (f"stopped ({reason})" if reason else "interrupted" if signum == signal.SIGINT
                else f"interrupted ({signal.Signals(signum).name})")
        if steps:
            where = (f"the latest checkpoint is step {steps[-1]}: continue with --resume "
                     f"--run-dir {run_dir}")
        elif resume or not is_main_process():
            where = f"no checkpoint was saved in {run_dir}"
        else:  # nothing to resume: what this run wrote goes, so the directory can start one
            loss_plot.close()
            if "writer" in board:
                board.pop("writer").close()
            removed = _remove_unfinished_run(run_dir, held_before)
            where = (f"no checkpoint was saved, so there is nothing to resume: removed what "
                     f"this run wrote in {run_dir} ({', '.join(removed) or 'nothing'})")
        _say_stop(f"{what} after step {done}; {where}", log if reason is None else None)
        raise RunInterrupted(130 if reason else 128 + signum) from None
    finally:
        with contextlib.ExitStack() as closing:  # each closed even if another fails
            closing.callback(bar.close)
            closing.callback(ckpt.close)
            closing.callback(loss_plot.close)
            if "writer" in board:
                closing.callback(board["writer"].close)
    return FitResult(state=state, history=history, engine=engine, keys=keys, run_dir=run_dir,
                     start_step=step0)
