"""Sample-quality metrics of generated MNIST digits, with genjax's trained classifier.

The classifier (:class:`genjax.models.classifier.MNISTClassifier`) is trained once by
``python -m experiments.mnist_classifier``, which writes its run directory: Orbax
checkpoints and ``classifier.json``, the record of the finished run (held-out accuracy,
data, step, model config). :class:`TrainedClassifier` reads it back and refuses a
classifier that is missing, unreadable or not trained (held-out accuracy below
:data:`MIN_ACCURACY`); :class:`SampleQuality` turns its outputs into the figures of
:mod:`genjax.metrics.sample_quality`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Annotated, Any, Callable, Literal, Optional

import jax
import numpy as np

from genjax.metrics.sample_quality import (class_coverage, feature_statistics,
                                           frechet_distance, inception_score)
from genjax.models.classifier import ClassifierConfig, MNISTClassifier, init_params
from genjax.train.checkpoint import CheckpointError, load_latest
from genjax.train.cli import own_default, resumed_path

RECORD = "classifier.json"
FAMILY = "mnist_classifier"
MIN_ACCURACY = 0.9
"""Held-out accuracy below which a classifier counts as untrained: its features would make
the distances meaningless."""
CACHE_ENV = "GENJAX_CACHE_DIR"
N_SAMPLES = 1000
"""Samples per evaluation of a generator (the issue's and the README's figures use 1,000)."""


def default_classifier_dir(split_name: str) -> pathlib.Path:
    """Where ``python -m experiments.mnist_classifier`` keeps the classifier trained on the
    MNIST split ``split_name`` (see :attr:`genjax.data.mnist.ImageData.split_name`):
    ``$GENJAX_CACHE_DIR/mnist-classifier/<split_name>``, by default under
    ``~/.cache/genjax``."""
    base = os.environ.get(CACHE_ENV) or str(pathlib.Path("~/.cache/genjax").expanduser())
    return pathlib.Path(base) / "mnist-classifier" / split_name


def _train_command(directory) -> str:
    return f"python -m experiments.mnist_classifier --run-dir {directory}"


def _train_again(directory) -> str:
    """The advice for a directory that holds an unusable classifier (nothing is deleted
    for the user)."""
    return (f"move {directory} away (or delete it), then train the classifier again with "
            f"`{_train_command(directory)}`")


def write_record(run_dir, record: dict) -> pathlib.Path:
    """Write ``classifier.json`` into ``run_dir`` whole or not at all (a temporary file,
    then a rename): the mark of a finished, evaluated classifier run."""
    path = pathlib.Path(run_dir) / RECORD
    partial = path.with_name(RECORD + ".partial")
    partial.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    partial.replace(path)
    return path


@dataclasses.dataclass(frozen=True)
class TrainedClassifier:
    """A trained MNIST classifier on one device, with the record of its training.

    Attributes:
      config: its :class:`~genjax.models.classifier.ClassifierConfig`.
      params: its parameters.
      record: the contents of ``classifier.json`` (``accuracy``, ``heldout_images``,
        ``step``, ``data``, ``model``, and the real images' own figures under ``real``).
      directory: the run directory it was read from.
    """

    config: ClassifierConfig
    params: Any
    record: dict
    directory: pathlib.Path

    @classmethod
    def load(cls, directory, min_accuracy: float = MIN_ACCURACY,
             log: Callable[[str], None] = print) -> "TrainedClassifier":
        """Read the classifier of a finished ``experiments.mnist_classifier`` run.

        Raises:
          FileNotFoundError: no such directory, or no ``classifier.json`` in it (a run
            that never finished); the message gives the command that trains one.
          ValueError: a ``classifier.json`` that is not a classifier's record, a held-out
            accuracy below ``min_accuracy``, or a checkpoint that is not the evaluated one
            or does not fit the recorded model.
          genjax.train.checkpoint.CheckpointError: no readable checkpoint.
        """
        directory = pathlib.Path(directory).expanduser().absolute()
        if directory.name == RECORD and directory.is_file():  # the record given for its run
            directory = directory.parent
        path = directory / RECORD
        if not path.is_file():
            what = "is not a directory" if not directory.is_dir() else f"holds no {RECORD}"
            raise FileNotFoundError(f"no trained MNIST classifier: {directory} {what}; train one "
                                    f"with `{_train_command(directory)}`")
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or not isinstance(record.get("model"), dict):
                raise TypeError("not a JSON object with a 'model' object")
            accuracy, step = float(record["accuracy"]), int(record["step"])
            config = ClassifierConfig(**{k: tuple(v) if isinstance(v, list) else v
                                         for k, v in record["model"].items()})
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{path} is not a classifier record ({type(e).__name__}: {e}); "
                             f"{_train_again(directory)}") from None
        if not accuracy >= min_accuracy:
            raise ValueError(f"the MNIST classifier in {directory} has held-out accuracy "
                             f"{accuracy:.2%}, below the {min_accuracy:.0%} that meaningful "
                             f"sample-quality metrics need: train it longer with "
                             f"`{_train_command(directory)} --resume --max-iters N`, or "
                             "delete that directory and train it again")
        try:
            saved_step, state, meta = load_latest(directory, log=log)
        except CheckpointError as e:
            raise CheckpointError(f"the MNIST classifier in {directory} has no readable "
                                  f"checkpoint ({e}); {_train_again(directory)}") from None
        if meta.get("family") != FAMILY or saved_step != step:
            raise ValueError(f"the checkpoint in {directory} (family {meta.get('family')!r}, "
                             f"step {saved_step}) is not the classifier that {RECORD} "
                             f"evaluated (step {step}); {_train_again(directory)}")
        params = state["train"]["params"]
        expected = jax.eval_shape(lambda k: init_params(config, k), jax.random.PRNGKey(0))
        shapes = jax.tree.map(lambda x: tuple(x.shape), params)
        if jax.tree.map(lambda x: tuple(x.shape), expected) != shapes:
            raise ValueError(f"the checkpoint in {directory} does not fit the model that {RECORD} "
                             f"records ({record['model']}); {_train_again(directory)}")
        return cls(config=config, params=params, record=record, directory=directory)

    @property
    def accuracy(self) -> float:
        """Held-out accuracy recorded when the run finished, in [0, 1]."""
        return float(self.record["accuracy"])

    def outputs(self, images, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """``(features (N, F), class probabilities (N, 10))``, float64, of ``images``
        (N, 28, 28, 1) in [0, 1], in evaluation mode (no dropout), ``batch`` at a time.

        Raises:
          ValueError: images of another shape, non-finite values, or values outside [0, 1].
        """
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[1:] != (28, 28, 1) or len(images) == 0:
            raise ValueError(f"images must have shape (N, 28, 28, 1), got {images.shape}")
        if not np.isfinite(images).all():
            raise ValueError("images hold non-finite values (nan or inf): a generator that "
                             "diverged cannot be scored")
        if images.min() < -1e-6 or images.max() > 1 + 1e-6:
            raise ValueError(f"images must lie in [0, 1] (got [{images.min():.3f}, "
                             f"{images.max():.3f}]): map a GAN's [-1, 1] back first")
        apply = _outputs_program(self.config)
        parts = [apply(self.params, images[i:i + batch]) for i in range(0, len(images), batch)]
        features = np.concatenate([np.asarray(f) for f, _ in parts]).astype(np.float64)
        probs = np.concatenate([np.asarray(p) for _, p in parts]).astype(np.float64)
        return features, probs / probs.sum(axis=1, keepdims=True)


_programs: dict = {}


def _outputs_program(config: ClassifierConfig):
    if config not in _programs:
        model = MNISTClassifier(config)

        def outputs(module, x):
            h = module.features(x)
            return h, jax.nn.softmax(module.head(h), axis=-1)

        _programs[config] = jax.jit(lambda p, x: model.apply({"params": p}, x, method=outputs))
    return _programs[config]


class SampleQuality:
    """The figures of generated images against held-out real ones.

    Args:
      classifier: a :class:`TrainedClassifier`.
      real_images: the held-out real images (N, 28, 28, 1) in [0, 1]: the reference of
        the Frechet distance (their feature statistics are computed once, here).

    Calling it on generated images (M, 28, 28, 1) in [0, 1] gives ``frechet_distance``
    (to the real images' features), ``inception_score``, ``classes_covered`` and
    ``class_entropy`` (see :mod:`genjax.metrics.sample_quality`).
    """

    def __init__(self, classifier: TrainedClassifier, real_images):
        self.classifier = classifier
        features, _ = classifier.outputs(real_images)
        self.real_statistics = feature_statistics(features)

    def __call__(self, images) -> dict:
        features, probs = self.classifier.outputs(images)
        distance = frechet_distance(*feature_statistics(features), *self.real_statistics)
        return {"frechet_distance": distance, "inception_score": inception_score(probs),
                **class_coverage(probs)}


def find_classifier(given: Optional[str], split_name: str, enabled: bool = True,
                    say: Callable[[str], None] = print) -> Optional[TrainedClassifier]:
    """The classifier of an experiment's sample-quality metrics, or None when they are off.

    ``given`` (``--classifier DIR``) must hold a trained classifier; without it the
    default directory of ``split_name`` (:func:`default_classifier_dir`) is used when it
    holds one, and otherwise the metrics are off, with one line saying how to train it.

    Raises:
      FileNotFoundError, ValueError, CheckpointError: as :meth:`TrainedClassifier.load`,
        for ``given``, or for a default directory holding an unusable classifier.
    """
    if not enabled:
        return None
    if given is not None:
        return TrainedClassifier.load(given, log=say)
    default = default_classifier_dir(split_name)
    if not (default / RECORD).is_file():
        say(f"sample-quality metrics off: no trained MNIST classifier in {default}; train it "
            f"once with `python -m experiments.mnist_classifier` (with the same --data-dir), "
            "or pass --classifier DIR")
        return None
    return TrainedClassifier.load(default, log=say)


@dataclasses.dataclass(frozen=True)
class MetricsArgs:
    """The flags of an experiment with sample-quality metrics (a ``tyro`` mixin)."""

    classifier: Annotated[Optional[str], own_default("DIR")] = None
    """Run directory of the trained MNIST classifier of the sample-quality metrics
    (default: the one experiments.mnist_classifier keeps for this data's split, when
    trained; on --resume, the one the run used)."""
    metrics: Annotated[Optional[Literal["on", "off"]], own_default("{on,off}")] = None
    """Sample-quality metrics of 1,000 samples at each evaluation (default: on; on --resume,
    the run's)."""


def sample_quality_for(args: MetricsArgs, saved: Optional[dict], data,
                       say: Callable[[str], None] = print) -> tuple[Optional[SampleQuality], dict]:
    """The :class:`SampleQuality` of an experiment on ``data`` (an
    :class:`~genjax.data.mnist.ImageData`; its held-out images are the reference), or None
    when the metrics are off, and the entries of the run's config record that say so:
    ``metrics`` (``on``/``off``) and ``classifier`` (the directory of the classifier used,
    so that a resumed run goes on with the same one).

    ``--metrics`` and ``--classifier`` left out take the resumed run's values (``saved``,
    its config record), else: on, with the classifier that :func:`find_classifier` finds.

    Raises:
      FileNotFoundError, ValueError, CheckpointError: see :func:`find_classifier`.
    """
    saved = saved or {}
    metrics = args.metrics or {False: "off", True: "on"}.get(saved.get("metrics"),
                                                           saved.get("metrics")) or "on"
    classifier_dir = resumed_path(args.classifier, saved.get("classifier"))
    classifier = find_classifier(classifier_dir, data.split_name, metrics == "on", say)
    if classifier is None:
        return None, {"metrics": metrics, "classifier": classifier_dir}
    say(f"sample-quality metrics with the MNIST classifier in {classifier.directory} "
        f"(held-out accuracy {classifier.accuracy:.2%})")
    return (SampleQuality(classifier, data.test_images),
            {"metrics": metrics, "classifier": str(classifier.directory)})


def describe(figures: dict) -> str:
    """The figures of :class:`SampleQuality` in one line."""
    if not figures or "frechet_distance" not in figures:
        return "no sample-quality metrics"
    return (f"Frechet distance {figures['frechet_distance']:.2f}, inception score "
            f"{figures['inception_score']:.2f}, {figures['classes_covered']} of 10 digits "
            f"covered (entropy {figures['class_entropy']:.3f} nats of ln 10 = "
            f"{math.log(10):.3f})")
