"""Variational Auto-Encoder on MNIST (Kingma and Welling, 2014).

    python -m experiments.vae_mnist [--preset cpu|gpu] [--latent-dim 20] [--beta 1.0]
        [--iwae-k 100] [--data-dir DIR] [--run-dir DIR] [--resume] ...

config -> data -> state -> train/eval steps -> loop (``genjax.train``). Each evaluation
reports, over all held-out images and in nats per image, ``recon_nats``, ``kl_nats`` and
``neg_elbo``, the final one also ``iwae_nll`` (the importance-weighted bound with ``--iwae-k``
samples, k decoder passes per image), and writes ``samples-<step>.png`` (z ~ N(0, I)); at the end ``interpolation.png`` and, with
``latent_dim=2``, ``manifold.png``.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal, Optional

import jax
import tyro
import jax.numpy as jnp
import numpy as np
from scipy.stats import norm

from genjax import viz
from genjax.data.mnist import ImageData, image_batch_fns, load_mnist
from genjax.models.autoencoder import reconstruction_error
from genjax.models.vae import VAE, VAEConfig, iwae_nll, kl_standard_normal, make_loss_fn
from genjax.train.cli import (RunArgs, default_preset_for, own_default, planned_batch_size,
                              preset_default, resolve_configs, resumed_path, run_command, say,
                              start_run)
from genjax.train.config import TrainConfig
from genjax.train.loop import Task, fit, is_main_process

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


@dataclasses.dataclass(frozen=True)
class Args(RunArgs):
    """Train a Variational Auto-Encoder on MNIST."""

    preset: Annotated[Optional[Literal["cpu", "gpu"]], own_default("{cpu,gpu}")] = None
    """Hyperparameters (default: cpu without an accelerator, else gpu; on --resume, the
    run's)."""
    latent_dim: Annotated[Optional[int], preset_default("INT")] = None
    """Size of z."""
    beta: Annotated[Optional[float], preset_default("FLOAT")] = None
    """Weight of the KL term (beta-VAE); 1 trains on the ELBO."""
    iwae_k: int = 100
    """Importance samples of the held-out log-likelihood bound."""


def resolve(args: Args) -> tuple[str, VAEConfig, TrainConfig, Optional[str]]:
    """``(preset, model config, train config, data dir)``: the preset (or with ``--resume``
    the run's saved config) with the flags' overrides. Raises ``ValueError`` on invalid
    values."""
    if args.iwae_k < 1:
        raise ValueError(f"--iwae-k must be >= 1, got {args.iwae_k}")
    preset, model, train, saved = resolve_configs(args, PRESETS, default_preset_for("cpu", "gpu"))
    return preset, model, train, resumed_path(args.data_dir, (saved or {}).get("data_dir"))


def heldout_bounds(model: VAE, params, images, key, k: int = 0, batch: int = 250) -> dict:
    """Mean per-image recon, KL and negative ELBO (one z per image) and, when k > 0, the
    IWAE bound with k samples; nats, over all ``images``."""

    @jax.jit
    def bounds(params, x, key):
        k1, k2 = jax.random.split(key)
        logits, mean, logvar = model.apply({"params": params}, x, k1)
        recon = reconstruction_error(logits, x, "bce")
        kl = kl_standard_normal(mean, logvar)
        iwae = iwae_nll(model, params, x, k2, k) if k else jnp.zeros_like(kl)
        return recon, kl, iwae

    parts = [bounds(params, images[i:i + batch], jax.random.fold_in(key, i))
             for i in range(0, len(images), batch)]
    recon, kl, iwae = (np.concatenate([np.asarray(p[j]) for p in parts]) for j in range(3))
    out = {"recon_nats": float(recon.mean()), "kl_nats": float(kl.mean()),
           "neg_elbo": float((recon + kl).mean())}
    if k:
        out["iwae_nll"] = float(iwae.mean())
    return out


def make_report(model: VAE, data: ImageData, run_dir, k: int, final_step: int):
    """Held-out bounds and a sample grid at each evaluation; the IWAE bound (k decoder
    passes per image) at the final one only, where it costs once."""
    decode = jax.jit(lambda p, z: jax.nn.sigmoid(model.apply({"params": p}, z, method=VAE.decode)))

    def report(params, key, step):
        out = heldout_bounds(model, params, data.test_images, key, k if step >= final_step else 0)
        if is_main_process():
            z = jax.random.normal(jax.random.PRNGKey(0), (64, model.config.latent_dim))
            viz.save_image_grid(run_dir / f"samples-{step}.png", np.asarray(decode(params, z)), 8,
                                f"step {step}: decoded z ~ N(0, I)")
        return out

    return report, decode


def main(argv=None):
    return run_command(run, tyro.cli(Args, args=argv, prog="python -m experiments.vae_mnist"))


def run(args: Args):
    """Train, evaluate and write the figures; returns the ``FitResult``."""
    # config
    run_dir = start_run(args, planned_batch_size(args, PRESETS, "cpu"), "vae_mnist")
    preset, model_cfg, train_cfg, data_dir = resolve(args)
    # data
    data = load_mnist(data_dir, log=say)
    say(f"preset {preset}; MNIST from {data.source}: {len(data.train_images):,} training, "
        f"{len(data.test_images):,} held-out images; latent_dim {model_cfg.latent_dim}, "
        f"beta {model_cfg.beta}")
    # state, steps, loop
    model = VAE(model_cfg)
    train_batch, eval_batches = image_batch_fns(data, train_cfg.batch_size)
    report, decode = make_report(model, data, run_dir, args.iwae_k, train_cfg.max_iters)
    x0 = jnp.zeros((1, 28, 28, 1))
    task = Task(
        name="vae",
        init_params=lambda key: model.init({"params": key}, x0, jax.random.PRNGKey(0))["params"],
        loss_fn=make_loss_fn(model), train_batch=train_batch, eval_batches=eval_batches,
        eval_splits=("test",), meta={"family": "vae", "model": dataclasses.asdict(model_cfg)},
        items_per_example=1, item_name="images", report=report)
    record = {"preset": preset, "model": dataclasses.asdict(model_cfg),
              "train": dataclasses.asdict(train_cfg), "data": data.source, "data_dir": data_dir,
              "iwae_k": args.iwae_k}
    result = fit(task, train_cfg, run_dir, resume=args.resume, config_record=record)

    # figures of the final model
    if is_main_process():
        params = result.engine.to_single_device(result.state.params)
        encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VAE.encode)[0])
        pair = np.asarray(encode(params, data.test_images[:2]))
        t = np.linspace(0.0, 1.0, 10)[:, None]
        z = (1 - t) * pair[0] + t * pair[1]                                  # (10, L)
        viz.save_image_grid(run_dir / "interpolation.png", np.asarray(decode(params, z)), 10,
                            "linear interpolation in z between two held-out digits")
        if model_cfg.latent_dim == 2:
            q = norm.ppf(np.linspace(0.05, 0.95, 15))                         # Gaussian quantiles
            grid = np.array([[a, b] for b in q[::-1] for a in q], np.float32)
            viz.save_image_grid(run_dir / "manifold.png", np.asarray(decode(params, grid)), 15,
                                "decoded latent grid (latent_dim 2)")
    last = result.history[-1] if result.history else {}
    say(f"held-out per image: recon {last.get('recon_nats', float('nan')):.2f}, KL "
        f"{last.get('kl_nats', float('nan')):.2f}, -ELBO {last.get('neg_elbo', float('nan')):.2f}, "
        f"IWAE(k={args.iwae_k}) NLL <= {last.get('iwae_nll', float('nan')):.2f} nats")
    return result


if __name__ == "__main__":
    main()
