"""The VAE's task: how the Variational Auto-Encoder, MNIST batches and the negative ELBO
meet :func:`genjax.train.loop.fit`, its held-out bounds and its figures."""

from __future__ import annotations

import dataclasses
import pathlib
from statistics import NormalDist
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from genjax import viz
from genjax.data.mnist import ImageData, image_batch_fns
from genjax.metrics.mnist import N_SAMPLES, SampleQuality
from genjax.models.autoencoder import reconstruction_error
from genjax.models.vae import VAE, VAEConfig, iwae_nll, kl_standard_normal, make_loss_fn
from genjax.train.loop import FitResult, Task, is_main_process
from genjax.train.steps import Evaluation, as_evaluation


def heldout_bounds(model: VAE, params, images, key, k: int = 0, batch: int = 250) -> dict:
    """Mean per-image ``recon_nats``, ``kl_nats`` and ``neg_elbo`` (one z per image) and,
    when k > 0, ``iwae_nll``, the IWAE bound with k samples; nats, over all ``images``
    (N, 28, 28, 1) float32 in [0, 1]."""

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


def make_decoder(model: VAE):
    """The jitted ``(params, z (N, L)) -> images (N, 28, 28, 1)`` in [0, 1]: the Bernoulli
    means sigmoid(logits)."""
    return jax.jit(lambda p, z: jax.nn.sigmoid(model.apply({"params": p}, z, method=VAE.decode)))


def prior_samples(decode, params, key, n: int, latent_dim: int, batch: int = 500) -> np.ndarray:
    """``n`` images (n, 28, 28, 1) in [0, 1] decoded from z ~ N(0, I) drawn with ``key``."""
    z = jax.random.normal(key, (n, latent_dim))
    return np.concatenate([np.asarray(decode(params, z[i:i + batch])) for i in range(0, n, batch)])


def make_report(model: VAE, data: ImageData, run_dir, k: int, final_step: int,
                quality: Optional[SampleQuality] = None, n_samples: int = N_SAMPLES):
    """A ``Task.report``: held-out bounds (:func:`heldout_bounds`) and a grid of decoded
    z ~ N(0, I), ``samples-<step>.png``, at each evaluation; the IWAE bound (k decoder
    passes per image) at the final one only, where it costs once; with ``quality``, the
    sample-quality metrics of ``n_samples`` prior samples (``frechet_distance``,
    ``inception_score``, ``classes_covered``, ``class_entropy``)."""
    decode = make_decoder(model)

    def report(params, key, step):
        bounds_key, samples_key = jax.random.split(key)
        out = heldout_bounds(model, params, data.test_images, bounds_key,
                             k if step >= final_step else 0)
        if quality is not None:
            out.update(quality(prior_samples(decode, params, samples_key, n_samples,
                                             model.config.latent_dim)))
        if is_main_process():
            z = jax.random.normal(jax.random.PRNGKey(0), (64, model.config.latent_dim))
            viz.save_image_grid(pathlib.Path(run_dir) / f"samples-{step}.png",
                                np.asarray(decode(params, z)), 8,
                                f"step {step}: decoded z ~ N(0, I)")
        return out

    return report


def make_task(config: VAEConfig, data: ImageData, batch_size: int, run_dir, iwae_k: int,
              max_iters: int, quality: Optional[SampleQuality] = None,
              n_samples: int = N_SAMPLES) -> Task:
    """The :class:`~genjax.train.loop.Task` of a VAE trained on ``data``; its report (see
    :func:`make_report`) adds the IWAE bound with ``iwae_k`` samples at ``max_iters`` and,
    with ``quality``, the sample-quality metrics of ``n_samples`` prior samples.

    Raises:
      ValueError: ``batch_size`` larger than the training or held-out set.
    """
    model = VAE(config)
    train_batch, eval_batches = image_batch_fns(data, batch_size)
    x0 = jnp.zeros((1, 28, 28, 1))
    loss_fn = make_loss_fn(model)
    # The evaluation batches give test_loss, the trained objective (recon + beta KL); the
    # report gives recon_nats, kl_nats and neg_elbo over every held-out image, once.
    loss_only = Evaluation(lambda params, batch, key, axis_name: {
        "loss": as_evaluation(loss_fn).metrics_fn(params, batch, key, axis_name)["loss"]})
    return Task(
        name="vae",
        init_params=lambda key: model.init({"params": key}, x0, jax.random.PRNGKey(0))["params"],
        loss_fn=loss_fn, evaluation=loss_only, train_batch=train_batch, eval_batches=eval_batches,
        eval_splits=("test",), meta={"family": "vae", "model": dataclasses.asdict(config),
                                         "split": data.split_name},
        items_per_example=1, item_name="images",
        report=make_report(model, data, run_dir, iwae_k, max_iters, quality, n_samples))


def final_figures(config: VAEConfig, result: FitResult, data: ImageData) -> None:
    """The figures of the trained model in its run directory: ``interpolation.png`` (a
    line in z between two held-out digits) and, for latent_dim 2, ``manifold.png``."""
    params = result.engine.to_single_device(result.state.params)  # (every process: fsdp
    if not is_main_process():                                     # gathers collectively)
        return
    model, run_dir = VAE(config), result.run_dir
    decode = make_decoder(model)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VAE.encode)[0])
    pair = np.asarray(encode(params, data.test_images[:2]))
    t = np.linspace(0.0, 1.0, 10)[:, None]
    z = (1 - t) * pair[0] + t * pair[1]                                  # (10, L)
    viz.save_image_grid(run_dir / "interpolation.png", np.asarray(decode(params, z)), 10,
                        "linear interpolation in z between two held-out digits")
    if config.latent_dim == 2:
        q = np.array([NormalDist().inv_cdf(p) for p in np.linspace(0.05, 0.95, 15)])  # quantiles
        grid = np.array([[a, b] for b in q[::-1] for a in q], np.float32)
        viz.save_image_grid(run_dir / "manifold.png", np.asarray(decode(params, grid)), 15,
                            "decoded latent grid (latent_dim 2)")
