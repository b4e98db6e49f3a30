"""The MNIST classifier behind the sample-quality metrics of the GAN and the VAE.

    python -m experiments.mnist_classifier [--preset cpu|gpu] [--data-dir DIR] [--run-dir DIR]

config -> data -> state -> train/eval steps -> loop (``genjax.train``). Trains a small CNN
(:mod:`genjax.models.classifier`) once and keeps it where the image experiments look for
it: by default ``$GENJAX_CACHE_DIR/mnist-classifier/<split>`` (``~/.cache/genjax/...``),
one per MNIST split (``mnist``: 60,000 / 10,000; ``mnist-test-split``: the offline
9,000 / 1,000). At the end it measures the held-out accuracy over every held-out image and
the real images' own sample-quality figures, and writes them to ``classifier.json``, the
mark of a usable classifier. A directory that already holds one is left as it is.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Annotated, Literal, Optional

from genjax.data.mnist import DATA_DIR_ENV, load_mnist
from genjax.metrics import mnist as mnist_metrics
from genjax.models.classifier import ClassifierConfig
from genjax.tasks.classifier import finish, make_task
from genjax.train.cli import (EVERY_HELDOUT_IMAGE, RunArgs, default_preset_for, own_default,
                              parse_args, planned_batch_size, refuse_unused, resolve_configs,
                              resumed_path, run_command, say, start_run)
from genjax.train.config import TrainConfig
from genjax.train.loop import check_run_dir, fit

PRESETS: dict[str, tuple[ClassifierConfig, TrainConfig]] = {
    "cpu": (ClassifierConfig(),
            TrainConfig(max_iters=1500, eval_interval=500, eval_iters=1, batch_size=64,
                        learning_rate=1e-3, lr_schedule="cosine", warmup_iters=50,
                        lr_decay_iters=1500, min_lr=1e-5, weight_decay=1e-4, seed=0)),
    "gpu": (ClassifierConfig(),
            TrainConfig(max_iters=5000, eval_interval=1000, eval_iters=1, batch_size=128,
                        learning_rate=1e-3, lr_schedule="cosine", warmup_iters=100,
                        lr_decay_iters=5000, min_lr=1e-5, weight_decay=1e-4, seed=0)),
}


@dataclasses.dataclass(frozen=True)
class Args(RunArgs):
    """Train the MNIST classifier of the sample-quality metrics (once; a directory that
    holds a trained one is left as it is)."""

    preset: Annotated[Optional[Literal["cpu", "gpu"]], own_default("{cpu,gpu}")] = None
    """Hyperparameters (default: cpu without an accelerator, else gpu; on --resume, the
    run's)."""
    run_dir: Annotated[Optional[str], own_default("DIR")] = None
    """Run directory (default: $GENJAX_CACHE_DIR/mnist-classifier/<split>, by default
    under ~/.cache/genjax: where the GAN and VAE experiments look for the classifier)."""


def main(argv=None):
    return run_command(run, parse_args(Args, argv, "python -m experiments.mnist_classifier",
                                       PRESETS))


def run(args: Args) -> dict:
    """Train (unless done), record and return the ``classifier.json`` record."""
    # config
    refuse_unused(args, EVERY_HELDOUT_IMAGE)
    # (its run directory is known once the data's split is: checked below, and by fit)
    start_run(args, planned_batch_size(args, PRESETS, "cpu"), "mnist_classifier", check=False)
    preset, model_cfg, train_cfg, saved = resolve_configs(args, PRESETS,
                                                          default_preset_for("cpu", "gpu"))
    data_dir = resumed_path(args.data_dir, (saved or {}).get("data_dir"), DATA_DIR_ENV)
    # data
    data = load_mnist(data_dir, log=say)
    run_dir = pathlib.Path(args.run_dir or mnist_metrics.default_classifier_dir(data.split_name))
    if (run_dir / mnist_metrics.RECORD).is_file() and not args.resume:
        done = mnist_metrics.TrainedClassifier.load(run_dir, min_accuracy=0.0, log=say)
        if done.accuracy >= mnist_metrics.MIN_ACCURACY:
            say(f"{run_dir} already holds a trained classifier (held-out accuracy "
                f"{done.accuracy:.2%} on {done.record['heldout_images']:,} images): nothing to "
                "do; pass another --run-dir to train a new one")
            return done.record
        # Below the metrics' floor: fit refuses a new run there and points to --resume.
    check_run_dir(run_dir, args.resume)
    say(f"preset {preset}; MNIST from {data.source}: {len(data.train_images):,} training, "
        f"{len(data.test_images):,} held-out images; run dir {run_dir}")
    # state, steps, loop
    task = make_task(model_cfg, data, train_cfg.batch_size)
    config_record = {"experiment": "mnist_classifier", "preset": preset,
                     "model": dataclasses.asdict(model_cfg),
                     "train": dataclasses.asdict(train_cfg), "data": data.source,
                     "data_dir": data_dir}
    result = fit(task, train_cfg, run_dir, resume=args.resume, config_record=config_record,
                 plot=True, tensorboard=args.tensorboard)
    record = finish(model_cfg, result, data)
    say(f"held-out accuracy {record['accuracy']:.2%} over {record['heldout_images']:,} images; "
        + (f"real images' figures ({record['real']['n_samples']:,} training images against "
           f"the held-out ones): {mnist_metrics.describe(record['real'])}"
           if "real" in record else
           f"below the {mnist_metrics.MIN_ACCURACY:.0%} the metrics need"))
    say(f"written {run_dir / mnist_metrics.RECORD}")
    return record


if __name__ == "__main__":
    main()
