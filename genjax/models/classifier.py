"""A small convolutional MNIST classifier, the feature extractor of the sample-quality
metrics (:mod:`genjax.metrics`).

Y. LeCun et al., "Gradient-Based Learning Applied to Document Recognition", Proc. IEEE
1998, in its common modern form: two conv(3x3) + ReLU + max-pool stages, a dense hidden
layer (the penultimate features that the Frechet distance compares, as FID compares
Inception's pool features; M. Heusel et al., "GANs Trained by a Two Time-Scale Update Rule
Converge to a Local Nash Equilibrium", NeurIPS 2017), dropout, and the class logits.

Shapes: B batch, images (B, 28, 28, 1) float32 in [0, 1], F ``hidden`` features,
10 classes.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from genjax.models.layers import max_pool_2x2

IMAGE_SHAPE = (28, 28, 1)
N_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Hyperparameters of :class:`MNISTClassifier`.

    Attributes:
      features: channels of the two conv stages.
      hidden: F, the width of the penultimate (feature) layer.
      dropout: dropout rate on the features while training, in [0, 1).

    Raises:
      ValueError: non-positive sizes or a dropout outside [0, 1), naming the value.
    """

    features: tuple[int, int] = (32, 64)
    hidden: int = 128
    dropout: float = 0.5

    def __post_init__(self):
        features = tuple(self.features)
        if len(features) != 2 or any(not isinstance(f, int) or isinstance(f, bool) or f <= 0
                                     for f in features):
            raise ValueError(f"features must be two positive channel counts, got {self.features!r}")
        object.__setattr__(self, "features", features)
        if not isinstance(self.hidden, int) or isinstance(self.hidden, bool) or self.hidden <= 0:
            raise ValueError(f"hidden must be a positive integer, got {self.hidden!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


class MNISTClassifier(nn.Module):
    """``apply(params, x)`` -> logits (B, 10); ``method='features'`` -> the penultimate
    features (B, F) (after the ReLU, before dropout).

    Raises:
      ValueError: images not of shape (B, 28, 28, 1) (at trace time).
    """

    config: ClassifierConfig

    def setup(self):
        f1, f2 = self.config.features
        self.conv1 = nn.Conv(f1, (3, 3), padding="SAME")
        self.conv2 = nn.Conv(f2, (3, 3), padding="SAME")
        self.hidden = nn.Dense(self.config.hidden)
        self.dropout = nn.Dropout(self.config.dropout)
        self.head = nn.Dense(N_CLASSES)

    def features(self, x):
        if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"images must have shape (B, 28, 28, 1), got {tuple(x.shape)}")
        x = max_pool_2x2(nn.relu(self.conv1(x)))                          # (B, 14, 14, f1)
        x = max_pool_2x2(nn.relu(self.conv2(x)))                          # (B, 7, 7, f2)
        return nn.relu(self.hidden(x.reshape(x.shape[0], -1)))            # (B, F)

    def __call__(self, x, train: bool = False):
        h = self.dropout(self.features(x), deterministic=not train)        # (B, F)
        return self.head(h)                                                # (B, 10)


def make_loss_fn(model: MNISTClassifier):
    """``(params, (images, labels), key, train) -> (loss, {'accuracy'})``: mean softmax
    cross-entropy in nats (dropout keyed by ``key`` when ``train``) and the fraction of
    images whose largest logit is their label."""

    def loss_fn(params, batch, key, train):
        x, y = batch
        logits = model.apply({"params": params}, x, train, rngs={"dropout": key} if train else None)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        accuracy = (jnp.argmax(logits, -1) == y).mean(dtype=jnp.float32)
        return loss, {"accuracy": accuracy}

    return loss_fn


def init_params(config: ClassifierConfig, key: jax.Array):
    """Fresh parameters (float32) drawn with ``key``."""
    return MNISTClassifier(config).init({"params": key}, jnp.zeros((1,) + IMAGE_SHAPE))["params"]
