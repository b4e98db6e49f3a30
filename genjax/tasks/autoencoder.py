"""The Auto-Encoder's task: how the convolutional Auto-Encoder, MNIST batches and the
reconstruction loss meet :func:`genjax.train.loop.fit`, and its figures."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from genjax import viz
from genjax.data.mnist import ImageData, image_batch_fns
from genjax.models.autoencoder import (AEConfig, AutoEncoder, make_loss_fn, mse_and_psnr,
                                       reconstruction_error, roc_auc)
from genjax.train.loop import FitResult, Task, is_main_process


def reconstruct(apply, params, images, batch: int = 500) -> np.ndarray:
    """Reconstruction logits (N, 28, 28, 1) float32 of all ``images`` (N, 28, 28, 1) by
    the jitted ``apply``, in batches on one device."""
    return np.concatenate([np.asarray(apply({"params": params}, images[i:i + batch]))
                           for i in range(0, len(images), batch)])


def make_report(model: AutoEncoder, data: ImageData, run_dir, anomaly_digit: Optional[int],
                scores: dict):
    """The AE's held-out figures and its reconstruction grid at each evaluation: a
    ``Task.report`` giving ``test_mse``, ``test_psnr_db`` (over every held-out image) and,
    with ``anomaly_digit``, ``anomaly_auroc``; the anomaly scores of the latest
    evaluation go to ``scores['normal'/'anomaly']``."""

    apply = jax.jit(model.apply)  # compiled once for every evaluation

    def report(params, key, step):
        logits = reconstruct(apply, params, data.test_images)
        mse, psnr = mse_and_psnr(jnp.asarray(logits), jnp.asarray(data.test_images))
        # Over every held-out image: these replace the loop's figures of the same names,
        # which cover only its evaluation batches.
        out = {"test_mse": float(mse.mean()), "test_psnr_db": float(psnr.mean())}
        if anomaly_digit is not None:
            err = np.asarray(reconstruction_error(jnp.asarray(logits), jnp.asarray(data.test_images),
                                                  model.config.loss))
            is_anomaly = data.test_labels == anomaly_digit
            scores.update(normal=err[~is_anomaly], anomaly=err[is_anomaly])
            out["anomaly_auroc"] = roc_auc(scores["normal"], scores["anomaly"])
        if is_main_process():
            n = 10
            grid = np.concatenate([data.test_images[:n], 1 / (1 + np.exp(-logits[:n]))])
            viz.save_image_grid(pathlib.Path(run_dir) / f"reconstructions-{step}.png", grid, n,
                                f"step {step}: originals (top), reconstructions (bottom)")
        return out

    return report


def make_task(config: AEConfig, data: ImageData, batch_size: int, run_dir,
              anomaly_digit: Optional[int] = None) -> tuple[Task, dict]:
    """The :class:`~genjax.train.loop.Task` of an Auto-Encoder trained on ``data`` (already
    without ``anomaly_digit``, if any), and the dict where its report keeps the latest
    anomaly scores (see :func:`make_report`).

    Raises:
      ValueError: ``batch_size`` larger than the training or held-out set.
    """
    model = AutoEncoder(config)
    train_batch, eval_batches = image_batch_fns(data, batch_size)
    scores: dict = {}
    task = Task(
        name="autoencoder",
        init_params=lambda key: model.init({"params": key}, jnp.zeros((1, 28, 28, 1)))["params"],
        loss_fn=make_loss_fn(model), train_batch=train_batch, eval_batches=eval_batches,
        eval_splits=("test",), meta={"family": "autoencoder", "model": dataclasses.asdict(config),
              "split": data.split_name},
        items_per_example=1, item_name="images",
        report=make_report(model, data, run_dir, anomaly_digit, scores))
    return task, scores


def final_figures(config: AEConfig, result: FitResult, data: ImageData, scores: dict,
                  anomaly_digit: Optional[int]) -> None:
    """The figures of the trained model in its run directory: ``latent-scatter.png`` of
    the held-out codes (latent_dim 2) and ``roc.png`` (with ``anomaly_digit``)."""
    params = result.engine.to_single_device(result.state.params)  # (every process: fsdp
    if not is_main_process():                                     # gathers collectively)
        return
    model = AutoEncoder(config)
    run_dir = result.run_dir
    if config.latent_dim == 2:
        encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoEncoder.encode))
        codes = np.asarray(encode(params, data.test_images))
        viz.save_scatter(run_dir / "latent-scatter.png", codes, data.test_labels,
                         "held-out codes (latent_dim 2)")
    if scores:
        viz.save_roc(run_dir / "roc.png", scores["normal"], scores["anomaly"],
                     roc_auc(scores["normal"], scores["anomaly"]),
                     f"digit {anomaly_digit} as anomaly")
