"""Convolutional Auto-Encoder: conv encoder -> latent z -> transposed-conv decoder.

G. E. Hinton and R. R. Salakhutdinov, "Reducing the Dimensionality of Data with Neural
Networks", Science 2006; convolutional form as in J. Masci et al., "Stacked Convolutional
Auto-Encoders", ICANN 2011. Shapes: B batch, H x W x C images (28 x 28 x 1 for MNIST).

The decoder's transposed convolutions use kernel 4, stride 2, ``SAME`` padding and
``transpose_kernel=True``: exactly PyTorch's ``ConvTranspose2d(kernel_size=4, stride=2,
padding=1)`` with the weight of shape (in, out, kh, kw) transposed to (kh, kw, out, in)
(see ``experiments/transposed_convolution.py``), computed by
:class:`genjax.models.layers.ConvTranspose2x` (the same parameters as Flax's
``nn.ConvTranspose``, a faster gradient).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from genjax.models.layers import ConvTranspose2x, max_pool_2x2

IMAGE_SHAPE = (28, 28, 1)


@dataclasses.dataclass(frozen=True)
class AEConfig:
    """Hyperparameters of :class:`AutoEncoder` (and the VAE's encoder/decoder).

    Attributes:
      latent_dim: size of the code z.
      features: channels of the encoder's two conv stages (the decoder mirrors them).
      loss: ``bce`` (per-pixel binary cross-entropy with logits) or ``mse``.

    Raises:
      ValueError: ``latent_dim`` <= 0, non-positive features, or an unknown loss.
    """

    latent_dim: int = 32
    features: tuple[int, int] = (32, 64)
    loss: Literal["bce", "mse"] = "bce"

    def __post_init__(self):
        if not isinstance(self.latent_dim, int) or self.latent_dim <= 0:
            raise ValueError(f"latent_dim must be a positive integer, got {self.latent_dim!r}")
        if len(self.features) != 2 or any(int(f) <= 0 for f in self.features):
            raise ValueError(f"features must be two positive channel counts, got {self.features!r}")
        object.__setattr__(self, "features", tuple(int(f) for f in self.features))
        if self.loss not in ("bce", "mse"):
            raise ValueError(f"loss must be 'bce' or 'mse', got {self.loss!r}")


def check_images(x) -> None:
    """Raise ``ValueError`` unless ``x`` has shape (B, 28, 28, 1)."""
    if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"images must have shape (B, 28, 28, 1), got {tuple(x.shape)}")


class ConvEncoder(nn.Module):
    """(B, 28, 28, 1) images -> (B, out_dim) features: two conv(3x3)+ReLU+maxpool(2) stages
    (28 -> 14 -> 7), flatten, dense."""

    features: Sequence[int]
    out_dim: int

    @nn.compact
    def __call__(self, x):
        check_images(x)
        for f in self.features:
            x = nn.relu(nn.Conv(f, (3, 3), padding="SAME")(x))             # (B, H, W, f)
            x = max_pool_2x2(x)                                              # (B, H/2, W/2, f)
        x = x.reshape(x.shape[0], -1)                                        # (B, 7*7*f)
        return nn.Dense(self.out_dim)(x)                                     # (B, out_dim)


class ConvDecoder(nn.Module):
    """(B, latent_dim) codes -> (B, 28, 28, 1) logits: dense to 7x7 maps, then two
    transposed convolutions (kernel 4, stride 2, SAME) 7 -> 14 -> 28."""

    features: Sequence[int]

    @nn.compact
    def __call__(self, z):
        f2, f1 = self.features[1], self.features[0]
        x = nn.relu(nn.Dense(7 * 7 * f2)(z)).reshape(z.shape[0], 7, 7, f2)  # (B, 7, 7, f2)
        x = nn.relu(ConvTranspose2x(f1, name="ConvTranspose_0")(x))         # (B, 14, 14, f1)
        return ConvTranspose2x(1, name="ConvTranspose_1")(x)                # (B, 28, 28, 1)


class AutoEncoder(nn.Module):
    """``apply(params, x)`` -> reconstruction logits (B, 28, 28, 1); ``method='encode'``
    gives z (B, latent_dim), ``method='decode'`` logits from z."""

    config: AEConfig

    def setup(self):
        self.encoder = ConvEncoder(self.config.features, self.config.latent_dim)
        self.decoder = ConvDecoder(self.config.features)

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)

    def __call__(self, x):
        return self.decode(self.encode(x))


def reconstruction_error(logits, x, kind: str = "bce"):
    """Per-image reconstruction loss, (B,) float32, summed over pixels.

    ``bce``: binary cross-entropy of the Bernoulli logits against pixel intensities in
    [0, 1] (nats); ``mse``: squared error of sigmoid(logits).
    """
    if kind == "bce":
        per_pixel = optax.sigmoid_binary_cross_entropy(logits, x)
    else:
        per_pixel = (jax.nn.sigmoid(logits) - x) ** 2
    return per_pixel.reshape(x.shape[0], -1).sum(-1)


def mse_and_psnr(logits, x):
    """Mean squared error per pixel of sigmoid(logits) against x in [0, 1] and the PSNR in
    dB, 10 log10(1 / MSE), both (B,) float32."""
    mse = ((jax.nn.sigmoid(logits) - x) ** 2).reshape(x.shape[0], -1).mean(-1)
    return mse, 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-12))


def make_loss_fn(model: AutoEncoder):
    """``(params, (images, labels), key, train) -> (loss, {'mse', 'psnr_db'})``: the mean
    over images of the per-image reconstruction loss (summed over pixels)."""

    def loss_fn(params, batch, key, train):
        x, _ = batch
        logits = model.apply({"params": params}, x)
        loss = reconstruction_error(logits, x, model.config.loss).mean()
        mse, psnr = mse_and_psnr(logits, x)
        return loss, {"mse": mse.mean(), "psnr_db": psnr.mean()}

    return loss_fn


def roc_auc(scores_negative, scores_positive) -> float:
    """Area under the ROC curve of ``scores`` ranking positives above negatives: the
    Mann-Whitney U statistic / (n_pos n_neg), ties counted half (scipy's ``rankdata``)."""
    from scipy.stats import rankdata

    neg, pos = np.asarray(scores_negative), np.asarray(scores_positive)
    ranks = rankdata(np.concatenate([neg, pos]))
    u = ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))

