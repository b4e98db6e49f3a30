"""DCGAN on MNIST (Goodfellow et al., 2014; Radford et al., 2016).

    python -m experiments.gan_mnist [--preset cpu|gpu] [--latent-dim 100] [--loss bce|hinge]
        [--label-smoothing S] [--d-steps K] [--classifier DIR] [--metrics on|off]
        [--data-dir DIR] [--run-dir DIR] [--resume] ...

config -> data -> state -> train/eval steps -> loop (``genjax.train``), the train step made of
``--d-steps`` discriminator updates then one generator update. Each evaluation logs both
players' held-out figures (``test_d_loss``, ``test_g_loss``, ``test_d_x``, ``test_d_g_z``,
``test_d_accuracy``: 0.5 when D can no longer tell) and, with a trained MNIST classifier
(``python -m experiments.mnist_classifier``), the sample-quality metrics of 1,000 samples
(``frechet_distance``, ``inception_score``, ``classes_covered``, ``class_entropy``), and
writes ``samples-<step>.png`` (the same z each time); at the end ``real-vs-generated.png``.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal, Optional

from genjax.data.mnist import DATA_DIR_ENV, load_mnist
from genjax.metrics.mnist import N_SAMPLES, MetricsArgs, describe, sample_quality_for
from genjax.models.gan import GANConfig
from genjax.tasks.gan import final_figures, make_task
from genjax.train.cli import (EVERY_HELDOUT_IMAGE, RunArgs, default_preset_for, own_default,
                              parse_args, planned_batch_size, preset_default, refuse_unused,
                              resolve_configs, resumed_path, run_command, say, start_run)
from genjax.train.config import TrainConfig
from genjax.train.loop import fit

# DCGAN's optimiser for both players: Adam, lr 2e-4, betas (0.5, 0.999), no weight decay.
_ADAM = dict(learning_rate=2e-4, lr_schedule="constant", beta1=0.5, beta2=0.999, eps=1e-8,
             weight_decay=0.0, grad_clip=None)

PRESETS: dict[str, tuple[GANConfig, TrainConfig]] = {
    "cpu": (GANConfig(latent_dim=100, g_features=(64, 32), d_features=(32, 64)),
            TrainConfig(max_iters=6000, eval_interval=1000, eval_iters=1, batch_size=64,
                        seed=0, **_ADAM)),
    "gpu": (GANConfig(latent_dim=100, g_features=(256, 128), d_features=(64, 128)),
            TrainConfig(max_iters=20000, eval_interval=2000, eval_iters=1, batch_size=128,
                        seed=0, **_ADAM)),
}


@dataclasses.dataclass(frozen=True)
class Args(RunArgs, MetricsArgs):
    """Train a DCGAN on MNIST."""

    preset: Annotated[Optional[Literal["cpu", "gpu"]], own_default("{cpu,gpu}")] = None
    """Hyperparameters (default: cpu without an accelerator, else gpu; on --resume, the
    run's)."""
    latent_dim: Annotated[Optional[int], preset_default("INT")] = None
    """Size of z ~ N(0, I)."""
    loss: Annotated[Optional[Literal["bce", "hinge"]], preset_default("{bce,hinge}")] = None
    """bce: the discriminator's cross-entropy and the generator's non-saturating
    -log D(G(z)); hinge: the hinge loss."""
    label_smoothing: Annotated[Optional[float], preset_default("S")] = None
    """One-sided label smoothing: real images' target 1 - S in the bce loss."""
    d_steps: Annotated[Optional[int], preset_default("INT")] = None
    """Discriminator updates per generator update."""


def resolve(args: Args) -> tuple[str, GANConfig, TrainConfig, Optional[str], Optional[dict]]:
    """``(preset, model config, train config, data dir, saved record)``: the preset (or
    with ``--resume`` the run's saved config) with the flags' overrides, the data folder
    the resumed run's when not given. Raises ``ValueError`` on invalid values."""
    preset, model, train, saved = resolve_configs(args, PRESETS, default_preset_for("cpu", "gpu"))
    return preset, model, train, resumed_path(args.data_dir, (saved or {}).get("data_dir"),
                                               DATA_DIR_ENV), saved


def main(argv=None):
    return run_command(run, parse_args(Args, argv, "python -m experiments.gan_mnist", PRESETS))


def run(args: Args):
    """Train, evaluate and write the figures; returns the ``FitResult``."""
    # config
    refuse_unused(args, EVERY_HELDOUT_IMAGE)
    run_dir = start_run(args, planned_batch_size(args, PRESETS, "cpu"), "gan_mnist")
    preset, model_cfg, train_cfg, data_dir, saved = resolve(args)
    # data, and the classifier of the metrics (before anything is written)
    data = load_mnist(data_dir, log=say)
    quality, metrics_record = sample_quality_for(args, saved, data, say)
    say(f"preset {preset}; MNIST from {data.source}: {len(data.train_images):,} training, "
        f"{len(data.test_images):,} held-out images; latent_dim {model_cfg.latent_dim}, "
        f"{model_cfg.loss} loss"
        + (f" with label smoothing {model_cfg.label_smoothing}" if model_cfg.label_smoothing else "")
        + f", {model_cfg.d_steps} discriminator update(s) per generator update; run dir {run_dir}")
    # state, steps, loop
    task = make_task(model_cfg, data, train_cfg.batch_size, run_dir, quality, N_SAMPLES)
    record = {"experiment": "gan_mnist", "preset": preset,
              "model": dataclasses.asdict(model_cfg),
              "train": dataclasses.asdict(train_cfg), "data": data.source, "data_dir": data_dir,
              **metrics_record}
    result = fit(task, train_cfg, run_dir, resume=args.resume, config_record=record, plot=True,
                 tensorboard=args.tensorboard)
    final_figures(model_cfg, result, data)
    if result.history:  # (a resume with nothing to train evaluates nothing)
        last = result.history[-1]
        say(f"held-out: discriminator accuracy {last['test_d_accuracy']:.3f} (0.5: it cannot "
            f"tell), D(x) {last['test_d_x']:.3f}, D(G(z)) {last['test_d_g_z']:.3f}; "
            f"{describe(last)}")
    return result


if __name__ == "__main__":
    main()
