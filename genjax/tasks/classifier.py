"""The MNIST classifier's task: how :class:`~genjax.models.classifier.MNISTClassifier`,
MNIST batches and the cross-entropy meet :func:`genjax.train.loop.fit`, and the record
that makes its run usable by the sample-quality metrics (:mod:`genjax.metrics.mnist`)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from genjax.data.mnist import ImageData, image_batch_fns
from genjax.metrics import mnist as mnist_metrics
from genjax.models.classifier import ClassifierConfig, MNISTClassifier, init_params, make_loss_fn
from genjax.train.loop import FitResult, Task, is_main_process


_predictors: dict = {}


def heldout_accuracy(config: ClassifierConfig, params, images, labels, batch: int = 500) -> float:
    """The fraction of ``images`` (N, 28, 28, 1) whose most likely class is their label
    (N,), in evaluation mode, over every image."""
    if config not in _predictors:  # compiled once per config, not at every evaluation
        model = MNISTClassifier(config)
        _predictors[config] = jax.jit(lambda p, x: model.apply({"params": p}, x).argmax(-1))
    predict = _predictors[config]
    hits = sum(int((np.asarray(predict(params, images[i:i + batch])) == labels[i:i + batch]).sum())
               for i in range(0, len(images), batch))
    return hits / len(images)


def make_task(config: ClassifierConfig, data: ImageData, batch_size: int) -> Task:
    """The :class:`~genjax.train.loop.Task` of the classifier trained on ``data``: it logs
    ``test_loss`` and ``test_accuracy`` (the latter over every held-out image).

    Raises:
      ValueError: ``batch_size`` larger than the training or held-out set.
    """
    train_batch, eval_batches = image_batch_fns(data, batch_size)

    def report(params, key, step):
        # Over every held-out image: replaces the loop's figure over its batches.
        return {"test_accuracy": heldout_accuracy(config, params, data.test_images,
                                                  data.test_labels)}

    return Task(
        name="mnist_classifier", init_params=lambda key: init_params(config, key),
        loss_fn=make_loss_fn(MNISTClassifier(config)), train_batch=train_batch,
        eval_batches=eval_batches, eval_splits=("test",),
        meta={"family": mnist_metrics.FAMILY, "model": dataclasses.asdict(config),
              "split": data.split_name},
        items_per_example=1, item_name="images", report=report)


def real_figures(classifier: mnist_metrics.TrainedClassifier, data: ImageData,
                 n: int = mnist_metrics.N_SAMPLES) -> dict:
    """The figures of real images, the floor of a generator's: ``n`` training images
    (the first of a fixed permutation) scored against the held-out ones as generated
    samples are (:class:`~genjax.metrics.mnist.SampleQuality`)."""
    n = min(n, len(data.train_images))
    pick = np.random.default_rng(0).permutation(len(data.train_images))[:n]
    figures = mnist_metrics.SampleQuality(classifier, data.test_images)(data.train_images[pick])
    return {"n_samples": n, **figures}


def finish(config: ClassifierConfig, result: FitResult, data: ImageData) -> dict:
    """After training: the held-out accuracy of the final model over every held-out image
    and the real images' own figures, written to ``classifier.json`` in the run directory
    (process 0), which marks the run as a usable classifier; returns that record."""
    params = result.engine.to_single_device(result.state.params)
    step = int(result.state.step)
    record = {"accuracy": heldout_accuracy(config, params, data.test_images, data.test_labels),
              "heldout_images": len(data.test_images), "training_images": len(data.train_images),
              "step": step, "data": data.source, "split_name": data.split_name,
              "model": dataclasses.asdict(config)}
    if record["accuracy"] >= mnist_metrics.MIN_ACCURACY:
        classifier = mnist_metrics.TrainedClassifier(config, params, record, result.run_dir)
        record["real"] = real_figures(classifier, data)
    if is_main_process():
        mnist_metrics.write_record(result.run_dir, record)
    return record
