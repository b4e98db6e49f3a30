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

import jax
import tyro
import jax.numpy as jnp
import numpy as np

from genjax.data.mnist import ImageData, image_batch_fns, load_mnist
from genjax.models.autoencoder import (AEConfig, AutoEncoder, make_loss_fn, mse_and_psnr,
                                       reconstruction_error, roc_auc)
from genjax.train.cli import (RunArgs, default_preset_for, own_default, planned_batch_size,
                              preset_default, resolve_configs, resumed_path, run_command, say,
                              start_run)
from genjax.train.config import TrainConfig
from genjax.train.loop import Task, fit, is_main_process
from genjax import viz

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
    return preset, model, train, digit, resumed_path(args.data_dir, saved.get("data_dir"))


def reconstruct(apply, params, images, batch: int = 500) -> np.ndarray:
    """Reconstruction logits (N, 28, 28, 1) of all ``images`` by the jitted ``apply``, in
    batches on one device."""
    return np.concatenate([np.asarray(apply({"params": params}, images[i:i + batch]))
                           for i in range(0, len(images), batch)])


def make_report(model: AutoEncoder, data: ImageData, run_dir, anomaly_digit, scores: dict):
    """The AE's held-out figures and its reconstruction grid at each evaluation; the
    anomaly scores of the latest evaluation go to ``scores['normal'/'anomaly']``."""

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
            viz.save_image_grid(run_dir / f"reconstructions-{step}.png", grid, n,
                                f"step {step}: originals (top), reconstructions (bottom)")
        return out

    return report


def main(argv=None):
    return run_command(run, tyro.cli(Args, args=argv, prog="python -m experiments.autoencoder_mnist"))


def run(args: Args):
    """Train, evaluate and write the figures; returns the ``FitResult``."""
    # config
    run_dir = start_run(args, planned_batch_size(args, PRESETS, "cpu"), "autoencoder_mnist")
    preset, model_cfg, train_cfg, anomaly_digit, data_dir = resolve(args)
    # data
    full = load_mnist(data_dir, log=say)
    data = full if anomaly_digit is None else full.without_digit(anomaly_digit)
    say(f"preset {preset}; MNIST from {full.source}: {len(data.train_images):,} training, "
        f"{len(data.test_images):,} held-out images; latent_dim {model_cfg.latent_dim}: "
        f"{28 * 28} bytes per image in, {4 * model_cfg.latent_dim} bytes (float32 code) out")
    # state, steps, loop
    model = AutoEncoder(model_cfg)
    train_batch, eval_batches = image_batch_fns(data, train_cfg.batch_size)
    scores: dict = {}
    report = make_report(model, data, run_dir, anomaly_digit, scores)
    task = Task(
        name="autoencoder",
        init_params=lambda key: model.init({"params": key}, jnp.zeros((1, 28, 28, 1)))["params"],
        loss_fn=make_loss_fn(model), train_batch=train_batch, eval_batches=eval_batches,
        eval_splits=("test",), meta={"family": "autoencoder", "model": dataclasses.asdict(model_cfg)},
        items_per_example=1, item_name="images", report=report)
    record = {"preset": preset, "model": dataclasses.asdict(model_cfg),
              "train": dataclasses.asdict(train_cfg), "data": full.source, "data_dir": data_dir,
              "anomaly_digit": anomaly_digit}
    result = fit(task, train_cfg, run_dir, resume=args.resume, config_record=record)

    # figures of the final model
    if is_main_process():
        params = result.engine.to_single_device(result.state.params)
        if model_cfg.latent_dim == 2:
            encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoEncoder.encode))
            codes = np.asarray(encode(params, data.test_images))
            viz.save_scatter(run_dir / "latent-scatter.png", codes, data.test_labels,
                             "held-out codes (latent_dim 2)")
        if scores:
            viz.save_roc(run_dir / "roc.png", scores["normal"], scores["anomaly"],
                         roc_auc(scores["normal"], scores["anomaly"]),
                         f"digit {anomaly_digit} as anomaly")
    last = result.history[-1] if result.history else {}
    say(f"held-out MSE {last.get('test_mse', float('nan')):.5f}, PSNR "
        f"{last.get('test_psnr_db', float('nan')):.2f} dB"
        + (f", anomaly AUROC {last['anomaly_auroc']:.3f}" if "anomaly_auroc" in last else ""))
    return result


if __name__ == "__main__":
    main()
