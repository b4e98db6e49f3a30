"""The training configuration shared by every experiment (a frozen dataclass)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import pathlib
from typing import Literal, Optional

ParallelEngine = Literal["pmap", "sharding", "fsdp", "none"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train, whatever the model.

    Attributes:
      max_iters: total optimizer steps of the run (a resumed run continues up to it).
      eval_interval: evaluate (and checkpoint) every this many steps, and at the end.
      eval_iters: batches per split averaged by an evaluation.
      log_interval: steps between progress-bar updates (each one waits for the device).
      batch_size: global batch size, summed over all devices.
      learning_rate: peak learning rate.
      lr_schedule: ``constant``, or ``cosine`` (linear warm-up then cosine decay).
      warmup_iters, lr_decay_iters, min_lr: the cosine schedule's steps and final rate.
      weight_decay: AdamW's decoupled weight decay coefficient.
      weight_decay_on: ``all`` parameters (``torch.optim.AdamW``) or only ``matrices``
        (tensors of rank >= 2, as nanoGPT).
      beta1, beta2, eps: Adam's moment decay rates and denominator constant.
      grad_clip: clip gradients to this global norm; 0 or None disables clipping.
      seed: seeds every random draw of the run (init, batches, dropout, evaluation).
      max_to_keep: checkpoints kept in ``RUN_DIR/checkpoints``.
      parallel: ``pmap`` (one program per device, ``lax.pmean`` of gradients),
        ``sharding`` (one ``jax.jit`` program over a ``('data',)`` mesh), ``fsdp`` (the
        same, with parameters and optimizer state sharded over the mesh) or ``none``
        (plain ``jax.jit`` on one device); see :mod:`genjax.train.parallel`.
      devices: devices to use; None means all local devices.

    Raises:
      ValueError: on a non-positive count or size, an unknown schedule or engine, or a
        cosine ``min_lr`` outside [0, learning_rate].
    """

    max_iters: int = 2000
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    batch_size: int = 12
    learning_rate: float = 1e-3
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_iters: int = 0
    lr_decay_iters: int = 0
    min_lr: float = 0.0
    weight_decay: float = 0.01
    weight_decay_on: Literal["all", "matrices"] = "all"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: Optional[float] = None
    seed: int = 1337
    max_to_keep: int = 3
    parallel: ParallelEngine = "pmap"
    devices: Optional[int] = None

    def __post_init__(self):
        for name in ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size",
                     "max_to_keep"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("learning_rate", "min_lr", "weight_decay", "beta1", "beta2", "eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip)
                                               and self.grad_clip >= 0):
            raise ValueError(f"grad_clip must be a finite number >= 0 or None, got "
                             f"{self.grad_clip!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.lr_schedule == "cosine" and not 0 <= self.min_lr <= self.learning_rate:
            raise ValueError(f"min_lr={self.min_lr!r} must be between 0 and the peak "
                             f"learning_rate={self.learning_rate!r}")
        if self.lr_schedule == "cosine" and self.lr_decay_iters <= self.warmup_iters:
            raise ValueError(
                f"lr_decay_iters={self.lr_decay_iters} must exceed warmup_iters={self.warmup_iters}")
        if self.weight_decay_on not in ("all", "matrices"):
            raise ValueError(
                f"weight_decay_on must be 'all' or 'matrices', got {self.weight_decay_on!r}")
        if self.parallel not in ("pmap", "sharding", "fsdp", "none"):
            raise ValueError(f"parallel must be 'pmap', 'sharding', 'fsdp' or 'none', got "
                             f"{self.parallel!r}")
        if self.devices is not None and (not isinstance(self.devices, int) or self.devices <= 0):
            raise ValueError(f"devices must be a positive integer or None, got {self.devices!r}")


def to_dict(config) -> dict:
    """A JSON-ready dict of a (possibly nested) config dataclass."""
    return dataclasses.asdict(config)


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def config_records(run_dir) -> list[pathlib.Path]:
    """The config records of the run in ``run_dir``, oldest start first: ``config.json``
    (its first start) and each ``config.resume-<step>.json`` (a resume that changed the
    config; see :func:`genjax.train.loop.fit`). Ordered by the time written inside each
    record (``started``, so that a copy of the run directory orders right whatever its
    files' times; a damaged record by its file's time among them); records without one
    (an older genjax's) come before those, by their modification times; then by the step
    in the name (``config.json`` is step 0). Empty when there are none (or no such
    directory)."""
    run_dir = pathlib.Path(run_dir)
    records = list(run_dir.glob("config.resume-*.json")) + list(run_dir.glob("config.json"))

    def order(path: pathlib.Path) -> tuple:
        step = path.stem.rpartition("-")[2]
        step = int(step) if step.isdigit() else 0
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):  # (unreadable: its file's time, which saved_config names)
            return 1, path.stat().st_mtime_ns, step
        if not isinstance(record, dict) or "started" not in record:
            # an older genjax's record: before every record that says when it started
            return int(not isinstance(record, dict)), path.stat().st_mtime_ns, step
        try:  # (in nanoseconds since the epoch, as the files' times)
            started = datetime.datetime.fromisoformat(record["started"])
            return 1, (started - _EPOCH) // datetime.timedelta(microseconds=1) * 1000, step
        except (ValueError, TypeError):
            return 1, path.stat().st_mtime_ns, step

    return sorted(records, key=order)


def started_now() -> str:
    """The ``started`` entry of a config record: now, in ISO 8601 with microseconds, UTC."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat()
