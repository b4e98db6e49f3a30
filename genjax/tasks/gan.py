"""The GAN's task: how the DCGAN's two players, MNIST batches and their losses meet
:func:`genjax.train.loop.fit`, with its sample grids and sample-quality metrics.

One train step is ``d_steps`` discriminator updates, each on its own real batch, then one
generator update (:class:`~genjax.train.steps.Update` s of the parameter groups
``discriminator`` and ``generator``, each with its own Adam); z is drawn for the global
batch from the update's key, so a run does not depend on the device count.
"""

from __future__ import annotations

import pathlib
from typing import Optional

import jax
import numpy as np

from genjax import viz
from genjax.data.mnist import ImageData, check_batch_fits, epoch_batch_indices
from genjax.metrics.mnist import N_SAMPLES, SampleQuality
from genjax.models import gan
from genjax.models.gan import GANConfig
from genjax.train.loop import FitResult, Task, is_main_process
from genjax.train.steps import Evaluation, Update, global_draw

GRID = 64  # images in each sample grid (8 x 8)
ARCHITECTURE = ("latent_dim", "g_features", "d_features")
"""The fields of :class:`~genjax.models.gan.GANConfig` that shape the parameters (saved in
every checkpoint's metadata and checked on resume); ``loss``, ``label_smoothing`` and
``d_steps`` may change when a run resumes."""


def _noise(config: GANConfig, key, axis_name, n: int):
    """This device's (n, L) rows of the global batch's z ~ N(0, I) drawn with ``key``."""
    return global_draw(lambda k, m: jax.random.normal(k, (m, config.latent_dim)), key, n, axis_name)


def make_updates(config: GANConfig) -> tuple[Update, Update]:
    """The train step's updates: the discriminator's (``d_steps`` repeats: metrics
    ``d_loss``, ``d_x``, ``d_g_z``, ``d_grad_norm``), then the generator's (``g_loss``,
    ``g_grad_norm``). Batches are real images in [-1, 1], (B, 28, 28, 1), or with
    ``d_steps`` > 1 (B, d_steps, 28, 28, 1)."""

    def d_loss(variables, real, key, axis_name):
        z = _noise(config, key, axis_name, real.shape[0])
        return gan.discriminator_update_loss(config, variables, real, z, axis_name)

    def g_loss(variables, batch, key, axis_name):
        z = _noise(config, key, axis_name, batch.shape[0])
        return gan.generator_update_loss(config, variables, z, axis_name)

    return (Update(d_loss, group="discriminator", name="d", repeats=config.d_steps),
            Update(g_loss, group="generator", name="g"))


def make_evaluation(config: GANConfig) -> Evaluation:
    """Held-out figures of both players in evaluation mode against as many generated
    images (:func:`genjax.models.gan.evaluation_metrics`)."""

    def metrics_fn(variables, real, key, axis_name):
        z = _noise(config, key, axis_name, real.shape[0])
        return gan.evaluation_metrics(config, variables, real, z)

    return Evaluation(metrics_fn)


def gan_batch_fns(data: ImageData, batch_size: int, d_steps: int = 1):
    """The batch functions of the GAN's :class:`~genjax.train.loop.Task`.

    ``train_batch(data_key, step, start, stop)``: examples ``[start, stop)`` of the global
    batch of ``step``, real images in [-1, 1], (B, 28, 28, 1), or (B, d_steps, 28, 28, 1):
    ``batch_size * d_steps`` images of the epoch permutation (see
    :func:`genjax.data.mnist.epoch_batch_indices`), ``d_steps`` for each example.
    ``eval_batches('test', key, start, stop)``: the held-out images in order, in global
    batches of ``batch_size`` (a final remainder smaller than a batch is left out).

    Raises:
      ValueError: ``batch_size * d_steps`` larger than the training set, or ``batch_size``
        larger than the held-out set.
    """
    n_train, n_test = len(data.train_images), len(data.test_images)
    check_batch_fits(batch_size, n_train, n_test, d_steps)
    train_images = gan.to_gan_range(data.train_images)
    test_images = gan.to_gan_range(data.test_images)

    def train_batch(data_key, step, start, stop):
        idx = epoch_batch_indices(data_key, step, n_train, batch_size * d_steps,
                                  start * d_steps, stop * d_steps)
        images = train_images[idx]                        # ((stop - start) * d_steps, 28, 28, 1)
        if d_steps == 1:
            return images
        return images.reshape((stop - start, d_steps) + images.shape[1:])

    def eval_batches(split, key, start, stop):
        if split != "test":
            raise ValueError(f"image data evaluates the 'test' split, not {split!r}")
        for lo in range(0, n_test - batch_size + 1, batch_size):
            yield test_images[lo + start:lo + stop]

    return train_batch, eval_batches


def make_sampler(config: GANConfig):
    """The jitted ``(variables, z (N, L)) -> images (N, 28, 28, 1)`` in [0, 1]: G in
    evaluation mode (running statistics), for pictures and metrics."""
    return jax.jit(lambda v, z: gan.to_unit_range(gan.generate(config, v, z)))


def sample_images(sample, variables, key, n: int, latent_dim: int, batch: int = 500) -> np.ndarray:
    """``n`` generated images (n, 28, 28, 1) in [0, 1], z drawn with ``key``."""
    z = jax.random.normal(key, (n, latent_dim))
    return np.concatenate([np.asarray(sample(variables, z[i:i + batch]))
                           for i in range(0, n, batch)])


def fixed_latents(config: GANConfig) -> jax.Array:
    """The z of every sample grid: the same (64, L) batch at each evaluation, so that the
    grids show the generator's progress on fixed inputs."""
    return jax.random.normal(jax.random.PRNGKey(0), (GRID, config.latent_dim))


def make_report(config: GANConfig, run_dir, quality: Optional[SampleQuality],
                n_samples: int = N_SAMPLES):
    """A ``Task.report``: writes ``samples-<step>.png`` (G(z) of :func:`fixed_latents`)
    and, with ``quality``, scores ``n_samples`` fresh samples (``frechet_distance``,
    ``inception_score``, ``classes_covered``, ``class_entropy``)."""
    sample = make_sampler(config)
    z = fixed_latents(config)

    def report(variables, key, step):
        if is_main_process():
            viz.save_image_grid(pathlib.Path(run_dir) / f"samples-{step}.png",
                                np.asarray(sample(variables, z)), 8,
                                f"step {step}: G(z), the same z at every step")
        if quality is None:
            return {}
        return quality(sample_images(sample, variables, key, n_samples, config.latent_dim))

    return report


def make_task(config: GANConfig, data: ImageData, batch_size: int, run_dir,
              quality: Optional[SampleQuality] = None, n_samples: int = N_SAMPLES) -> Task:
    """The :class:`~genjax.train.loop.Task` of a DCGAN trained on ``data``: parameters and
    BatchNorm statistics of both players, their updates (:func:`make_updates`), held-out
    evaluation (:func:`make_evaluation`) and report (:func:`make_report`).

    Raises:
      ValueError: a batch larger than the data (see :func:`gan_batch_fns`).
    """
    train_batch, eval_batches = gan_batch_fns(data, batch_size, config.d_steps)
    return Task(
        name="gan",
        init_params=lambda key: gan.init_variables(config, key)["params"],
        init_model_state=lambda key: {
            "batch_stats": gan.init_variables(config, key)["batch_stats"]},
        updates=make_updates(config), evaluation=make_evaluation(config),
        train_batch=train_batch, eval_batches=eval_batches, eval_splits=("test",),
        # The architecture must match on resume; the loss options may change.
        meta={"family": "gan", "model": {name: getattr(config, name) for name in ARCHITECTURE},
              "split": data.split_name},
        # images_per_s counts the real images the discriminator sees: d_steps per example
        items_per_example=config.d_steps, item_name="images",
        report=make_report(config, run_dir, quality, n_samples))


def final_figures(config: GANConfig, result: FitResult, data: ImageData, n: int = 32) -> None:
    """``real-vs-generated.png`` in the run directory: ``n`` held-out images beside ``n``
    samples of the trained generator."""
    variables = result.engine.to_single_device(result.state.variables)  # (every process:
    if not is_main_process():                                           # fsdp gathers)
        return
    fake = sample_images(make_sampler(config), variables, jax.random.PRNGKey(1), n,
                         config.latent_dim)
    viz.save_side_by_side(result.run_dir / "real-vs-generated.png", data.test_images[:n], fake,
                          8, "held-out real images", "generated",
                          f"step {int(result.state.step)}")
