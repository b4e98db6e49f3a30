"""Variational Auto-Encoder on MNIST (Kingma and Welling, 2014).

    python -m experiments.vae_mnist [--preset cpu|gpu] [--latent-dim 20] [--beta 1.0]
        [--iwae-k 100] [--classifier DIR] [--metrics on|off] [--data-dir DIR] [--run-dir DIR]
        [--resume] ...

config -> data -> state -> train/eval steps -> loop (``genjax.train``). Each evaluation
reports, over all held-out images and in nats per image, ``recon_nats``, ``kl_nats`` and
``neg_elbo``, the final one also ``iwae_nll`` (the importance-weighted bound with
``--iwae-k`` samples, k decoder passes per image); with a trained MNIST classifier
(``python -m experiments.mnist_classifier``), the sample-quality metrics of 1,000 prior
samples (``frechet_distance``, ``inception_score``, ``classes_covered``,
``class_entropy``); and writes ``samples-<step>.png`` (z ~ N(0, I)); at the end
``interpolation.png`` and, with ``latent_dim=2``, ``manifold.png``.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal, Optional

from genjax.data.mnist import DATA_DIR_ENV, load_mnist
from genjax.metrics.mnist import N_SAMPLES, MetricsArgs, describe, sample_quality_for
from genjax.models.vae import VAEConfig
from genjax.tasks.vae import final_figures, make_task
from genjax.train.cli import (EVERY_HELDOUT_IMAGE, RunArgs, default_preset_for, own_default,
                              parse_args, planned_batch_size, preset_default, refuse_unused,
                              resolve_configs, resumed_path, run_command, say, start_run)
from genjax.train.config import TrainConfig
from genjax.train.loop import fit

PRESETS: dict[str, tuple[VAEConfig, TrainConfig]] = {
    "cpu": (VAEConfig(latent_dim=20, features=(16, 32)),
            TrainConfig(max_iters=2500, eval_interval=500, eval_iters=1, batch_size=64,
                        learning_rate=2e-3, lr_schedule="cosine", warmup_iters=50,
                        lr_decay_iters=2500, min_lr=1e-4, weight_decay=1e-4, seed=0)),
    "gpu": (VAEConfig(latent_dim=20),
            TrainConfig(max_iters=20000, eval_interval=2000, eval_iters=1, batch_size=256,
                        learning_rate=1e-3, lr_schedule="cosine", warmup_iters=200,
                        lr_decay_iters=20000, min_lr=1e-4, weight_decay=1e-4, seed=0)),
}

DEFAULT_IWAE_K = 100


@dataclasses.dataclass(frozen=True)
class Args(RunArgs, MetricsArgs):
    """Train a Variational Auto-Encoder on MNIST."""

    preset: Annotated[Optional[Literal["cpu", "gpu"]], own_default("{cpu,gpu}")] = None
    """Hyperparameters (default: cpu without an accelerator, else gpu; on --resume, the
    run's)."""
    latent_dim: Annotated[Optional[int], preset_default("INT")] = None
    """Size of z."""
    beta: Annotated[Optional[float], preset_default("FLOAT")] = None
    """Weight of the KL term (beta-VAE); 1 trains on the ELBO."""
    iwae_k: Annotated[Optional[int], own_default("K")] = None
    """Importance samples of the held-out log-likelihood bound (default 100; on --resume,
    the run's)."""


def resolve(args: Args) -> tuple[str, VAEConfig, TrainConfig, Optional[str], int,
                                  Optional[dict]]:
    """``(preset, model config, train config, data dir, iwae k, saved record)``: the preset
    (or with ``--resume`` the run's saved config) with the flags' overrides, the data folder
    and IWAE k the resumed run's when not given. Raises ``ValueError`` on invalid values."""
    if args.iwae_k is not None and args.iwae_k < 1:
        raise ValueError(f"--iwae-k must be >= 1, got {args.iwae_k}")
    preset, model, train, saved = resolve_configs(args, PRESETS, default_preset_for("cpu", "gpu"))
    iwae_k = args.iwae_k or (saved or {}).get("iwae_k") or DEFAULT_IWAE_K
    return preset, model, train, resumed_path(args.data_dir, (saved or {}).get("data_dir"),
                                               DATA_DIR_ENV), iwae_k, saved


def main(argv=None):
    return run_command(run, parse_args(Args, argv, "python -m experiments.vae_mnist", PRESETS))


def run(args: Args):
    """Train, evaluate and write the figures; returns the ``FitResult``."""
    # config
    refuse_unused(args, EVERY_HELDOUT_IMAGE)
    run_dir = start_run(args, planned_batch_size(args, PRESETS, "cpu"), "vae_mnist")
    preset, model_cfg, train_cfg, data_dir, iwae_k, saved = resolve(args)
    # data, and the classifier of the metrics (before anything is written)
    data = load_mnist(data_dir, log=say)
    quality, metrics_record = sample_quality_for(args, saved, data, say)
    say(f"preset {preset}; MNIST from {data.source}: {len(data.train_images):,} training, "
        f"{len(data.test_images):,} held-out images; latent_dim {model_cfg.latent_dim}, "
        f"beta {model_cfg.beta}; run dir {run_dir}")
    # state, steps, loop
    task = make_task(model_cfg, data, train_cfg.batch_size, run_dir, iwae_k,
                     train_cfg.max_iters, quality, N_SAMPLES)
    record = {"experiment": "vae_mnist", "preset": preset,
              "model": dataclasses.asdict(model_cfg),
              "train": dataclasses.asdict(train_cfg), "data": data.source, "data_dir": data_dir,
              "iwae_k": iwae_k, **metrics_record}
    result = fit(task, train_cfg, run_dir, resume=args.resume, config_record=record, plot=True,
                 tensorboard=args.tensorboard)
    final_figures(model_cfg, result, data)
    if result.history:  # (a resume with nothing to train evaluates nothing)
        last = result.history[-1]
        say(f"held-out per image: recon {last['recon_nats']:.2f}, KL {last['kl_nats']:.2f}, "
            f"-ELBO {last['neg_elbo']:.2f}, IWAE(k={iwae_k}) NLL <= "
            f"{last.get('iwae_nll', float('nan')):.2f} nats")
        if quality is not None:
            say(f"prior samples: {describe(last)}")
    return result


if __name__ == "__main__":
    main()
