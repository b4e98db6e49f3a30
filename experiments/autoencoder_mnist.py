"""Convolutional Auto-Encoder on MNIST.

    python -m experiments.autoencoder_mnist [--preset cpu|gpu] [--latent-dim 32]
        [--anomaly-digit D] [--data-dir DIR] [--run-dir DIR] [--resume] ...

config -> data -> state -> train/eval steps -> loop (``genjax.train``). At each evaluation
it reports ``test_mse`` and ``test_psnr_db`` over all held-out images (replacing the
loop's figures over its evaluation batches), ``test_loss`` (and ``anomaly_auroc`` with
``--anomaly-digit``) and writes ``reconstructions-<step>.png`` (originals above
reconstructions); at the end, with ``latent_dim=2``, ``latent-scatter.png``, and with
``--anomaly-digit``, ``roc.png``.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal, Optional

from genjax.data.mnist import DATA_DIR_ENV, load_mnist
from genjax.models.autoencoder import AEConfig
from genjax.tasks.autoencoder import final_figures, make_task
from genjax.train.cli import (EVERY_HELDOUT_IMAGE, RunArgs, default_preset_for, own_default,
                              parse_args, planned_batch_size, preset_default, refuse_unused,
                              resolve_configs, resumed_path, run_command, say, start_run)
from genjax.train.config import TrainConfig
from genjax.train.loop import fit

PRESETS: dict[str, tuple[AEConfig, TrainConfig]] = {
    "cpu": (AEConfig(latent_dim=32),
            TrainConfig(max_iters=800, eval_interval=200, eval_iters=1, batch_size=64,
                        learning_rate=2e-3, lr_schedule="cosine", warmup_iters=50,
                        lr_decay_iters=800, min_lr=1e-4, weight_decay=1e-4, seed=0)),
    "gpu": (AEConfig(latent_dim=32),
            TrainConfig(max_iters=10000, eval_interval=1000, eval_iters=1, batch_size=256,
                        learning_rate=2e-3, lr_schedule="cosine", warmup_iters=200,
                        lr_decay_iters=10000, min_lr=1e-4, weight_decay=1e-4, seed=0)),
}


@dataclasses.dataclass(frozen=True)
class Args(RunArgs):
    """Train a convolutional Auto-Encoder on MNIST."""

    preset: Annotated[Optional[Literal["cpu", "gpu"]], own_default("{cpu,gpu}")] = None
    """Hyperparameters (default: cpu without an accelerator, else gpu; on --resume, the
    run's)."""
    latent_dim: Annotated[Optional[int], preset_default("INT")] = None
    """Size of the code z."""
    loss: Annotated[Optional[Literal["bce", "mse"]], preset_default("{bce,mse}")] = None
    """Reconstruction loss: per-pixel binary cross-entropy with logits, or MSE."""
    anomaly_digit: Annotated[Optional[int], own_default("DIGIT")] = None
    """Train without this digit and report the ROC AUC of detecting it on held-out images
    by reconstruction error (default: train on every digit; on --resume, as the run)."""


def resolve(args: Args) -> tuple[str, AEConfig, TrainConfig, Optional[int], Optional[str]]:
    """``(preset, model config, train config, anomaly digit, data dir)``: the preset (or
    with ``--resume`` the run's saved config) with the flags' overrides. Raises
    ``ValueError`` on invalid values."""
    preset, model, train, saved = resolve_configs(args, PRESETS, default_preset_for("cpu", "gpu"))
    saved = saved or {}
    digit = args.anomaly_digit
    if digit is None:  # a resumed run keeps its training data
        digit = saved.get("anomaly_digit")
    if digit is not None and not 0 <= digit <= 9:
        raise ValueError(f"--anomaly-digit must be a digit 0-9, got {digit}")
    return preset, model, train, digit, resumed_path(args.data_dir, saved.get("data_dir"),
                                                     DATA_DIR_ENV)


def main(argv=None):
    return run_command(run, parse_args(Args, argv, "python -m experiments.autoencoder_mnist", PRESETS))


def run(args: Args):
    """Train, evaluate and write the figures; returns the ``FitResult``."""
    # config
    refuse_unused(args, EVERY_HELDOUT_IMAGE)
    run_dir = start_run(args, planned_batch_size(args, PRESETS, "cpu"), "autoencoder_mnist")
    preset, model_cfg, train_cfg, anomaly_digit, data_dir = resolve(args)
    # data
    full = load_mnist(data_dir, log=say)
    data = full if anomaly_digit is None else full.without_digit(anomaly_digit)
    say(f"preset {preset}; MNIST from {full.source}: {len(data.train_images):,} training, "
        f"{len(data.test_images):,} held-out images; latent_dim {model_cfg.latent_dim}: "
        f"{28 * 28} bytes per image in, {4 * model_cfg.latent_dim} bytes (float32 code) out; "
        f"run dir {run_dir}")
    # state, steps, loop
    task, scores = make_task(model_cfg, data, train_cfg.batch_size, run_dir, anomaly_digit)
    record = {"experiment": "autoencoder_mnist", "preset": preset,
              "model": dataclasses.asdict(model_cfg),
              "train": dataclasses.asdict(train_cfg), "data": full.source, "data_dir": data_dir,
              "anomaly_digit": anomaly_digit}
    result = fit(task, train_cfg, run_dir, resume=args.resume, config_record=record, plot=True,
                 tensorboard=args.tensorboard)
    final_figures(model_cfg, result, data, scores, anomaly_digit)
    if result.history:  # (a resume with nothing to train evaluates nothing)
        last = result.history[-1]
        say(f"held-out MSE {last['test_mse']:.5f}, PSNR {last['test_psnr_db']:.2f} dB"
            + (f", anomaly AUROC {last['anomaly_auroc']:.3f}" if "anomaly_auroc" in last else ""))
    return result


if __name__ == "__main__":
    main()
