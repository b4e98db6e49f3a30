"""The image models in PyTorch: the Auto-Encoder, the VAE and the DCGAN, as their references
write them (plain ``nn.Module`` s over NCHW images), with genjax's parameters loadable.

Layouts: genjax works in NHWC, PyTorch in NCHW, so the dense layers that meet the feature
maps have their rows or columns permuted by ``load_genjax`` (see
:mod:`experiments.torch_twins.common`), and the convolution kernels are transposed. The
expert's faster form of these models is the same modules in ``channels_last`` memory
(``model.to(memory_format=torch.channels_last)``, inputs likewise).

Shapes: B batch, L latent size; images (B, 1, 28, 28) float32.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn import functional as F

from experiments.torch_twins.common import (conv_transpose_weight, conv_weight,
                                            dense_from_nhwc, dense_to_nhwc, put)


class ConvEncoder(nn.Module):
    """Two conv(3x3) + ReLU + max-pool(2) stages 28 -> 14 -> 7, then a dense layer."""

    def __init__(self, features, out_dim: int):
        super().__init__()
        f1, f2 = features
        self.conv1 = nn.Conv2d(1, f1, 3, padding=1)
        self.conv2 = nn.Conv2d(f1, f2, 3, padding=1)
        self.dense = nn.Linear(7 * 7 * f2, out_dim)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)                      # (B, f1, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)                      # (B, f2, 7, 7)
        return self.dense(x.flatten(1))                                   # (B, out_dim)


class ConvDecoder(nn.Module):
    """Dense to 7x7 maps, then ``ConvTranspose2d(k=4, s=2, padding=1)`` twice: 7 -> 14 -> 28
    logits."""

    def __init__(self, features, latent_dim: int):
        super().__init__()
        f1, f2 = features
        self.f2 = f2
        self.dense = nn.Linear(latent_dim, 7 * 7 * f2)
        self.up1 = nn.ConvTranspose2d(f2, f1, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(f1, 1, 4, stride=2, padding=1)

    def forward(self, z):
        x = F.relu(self.dense(z)).view(-1, self.f2, 7, 7)                # (B, f2, 7, 7)
        return self.up2(F.relu(self.up1(x)))                              # (B, 1, 28, 28)


class AutoEncoder(nn.Module):
    """The convolutional Auto-Encoder of :class:`genjax.models.autoencoder.AEConfig`;
    ``forward(x)`` gives reconstruction logits."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.encoder = ConvEncoder(config.features, config.latent_dim)
        self.decoder = ConvDecoder(config.features, config.latent_dim)

    def forward(self, x):
        return self.decoder(self.encoder(x))

    def loss(self, x):
        """Per-pixel binary cross-entropy (or MSE of sigmoid), summed over pixels, mean over
        images: genjax's ``reconstruction_error(...).mean()``."""
        logits = self(x)
        if self.config.loss == "bce":
            per_pixel = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        else:
            per_pixel = (torch.sigmoid(logits) - x) ** 2
        return per_pixel.flatten(1).sum(1).mean()


class VAE(nn.Module):
    """The VAE of :class:`genjax.models.vae.VAEConfig` (Kingma and Welling, 2014)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.encoder = ConvEncoder(config.features, 2 * config.latent_dim)
        self.decoder = ConvDecoder(config.features, config.latent_dim)

    def loss(self, x, eps=None):
        """Mean over images of recon (Bernoulli, summed over pixels) + beta KL, with
        z = mean + exp(logvar / 2) eps; ``eps`` (B, L) drawn here when not given."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)                    # (B, L) each
        logvar = logvar.clamp(-30.0, 30.0)
        eps = torch.randn_like(mean) if eps is None else eps
        z = mean + torch.exp(0.5 * logvar) * eps
        logits = self.decoder(z)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        kl = 0.5 * (logvar.exp() + mean ** 2 - 1.0 - logvar).sum(1)
        return (recon + self.config.beta * kl).mean()


class Generator(nn.Module):
    """DCGAN generator: z (B, L) -> images (B, 1, 28, 28) in [-1, 1]."""

    def __init__(self, config):
        super().__init__()
        f7, f14 = config.g_features
        self.f7 = f7
        self.dense = nn.Linear(config.latent_dim, 7 * 7 * f7, bias=False)
        self.bn0 = nn.BatchNorm2d(f7, momentum=0.1, eps=1e-5)
        self.up1 = nn.ConvTranspose2d(f7, f14, 4, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(f14, momentum=0.1, eps=1e-5)
        self.up2 = nn.ConvTranspose2d(f14, 1, 4, stride=2, padding=1)

    def forward(self, z):
        x = F.relu(self.bn0(self.dense(z).view(-1, self.f7, 7, 7)))       # (B, f7, 7, 7)
        x = F.relu(self.bn1(self.up1(x)))                                 # (B, f14, 14, 14)
        return torch.tanh(self.up2(x))                                    # (B, 1, 28, 28)


class Discriminator(nn.Module):
    """DCGAN discriminator: images (B, 1, 28, 28) -> logits (B,)."""

    def __init__(self, config):
        super().__init__()
        f14, f7 = config.d_features
        self.down1 = nn.Conv2d(1, f14, 4, stride=2, padding=1)
        self.down2 = nn.Conv2d(f14, f7, 4, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(f7, momentum=0.1, eps=1e-5)
        self.dense = nn.Linear(7 * 7 * f7, 1)

    def forward(self, x):
        x = F.leaky_relu(self.down1(x), 0.2)                              # (B, f14, 14, 14)
        x = F.leaky_relu(self.bn(self.down2(x)), 0.2)                     # (B, f7, 7, 7)
        return self.dense(x.flatten(1))[:, 0]                             # (B,)


def _load_encoder(encoder: ConvEncoder, p, f2: int) -> None:
    put(encoder.conv1.weight, conv_weight(p["Conv_0"]["kernel"]))
    put(encoder.conv1.bias, p["Conv_0"]["bias"])
    put(encoder.conv2.weight, conv_weight(p["Conv_1"]["kernel"]))
    put(encoder.conv2.bias, p["Conv_1"]["bias"])
    put(encoder.dense.weight, dense_from_nhwc(p["Dense_0"]["kernel"], 7, 7, f2))
    put(encoder.dense.bias, p["Dense_0"]["bias"])


def _load_decoder(decoder: ConvDecoder, p, f2: int) -> None:
    weight, bias = dense_to_nhwc(p["Dense_0"]["kernel"], p["Dense_0"]["bias"], 7, 7, f2)
    put(decoder.dense.weight, weight)
    put(decoder.dense.bias, bias)
    for name, up in (("ConvTranspose_0", decoder.up1), ("ConvTranspose_1", decoder.up2)):
        put(up.weight, conv_transpose_weight(p[name]["kernel"]))
        put(up.bias, p[name]["bias"])


def load_autoencoder(model, params):
    """Copy a genjax :class:`~genjax.models.autoencoder.AutoEncoder` 's or
    :class:`~genjax.models.vae.VAE` 's parameters into its twin; returns it."""
    f2 = model.config.features[1]
    _load_encoder(model.encoder, params["encoder"], f2)
    _load_decoder(model.decoder, params["decoder"], f2)
    return model


def _load_batch_norm(bn: nn.BatchNorm2d, params, stats) -> None:
    put(bn.weight, params["scale"])
    put(bn.bias, params["bias"])
    put(bn.running_mean, stats["mean"])
    put(bn.running_var, stats["var"])


def load_gan(generator: Generator, discriminator: Discriminator, variables: dict):
    """Copy a genjax DCGAN's variables (``init_variables``' tree: parameters and BatchNorm
    statistics of both players) into the twins; returns them."""
    g, d = variables["params"]["generator"], variables["params"]["discriminator"]
    gs, ds = variables["batch_stats"]["generator"], variables["batch_stats"]["discriminator"]
    f7 = generator.f7
    weight, _ = dense_to_nhwc(g["Dense_0"]["kernel"], None, 7, 7, f7)
    put(generator.dense.weight, weight)
    _load_batch_norm(generator.bn0, g["BatchNorm_0"], gs["BatchNorm_0"])
    put(generator.up1.weight, conv_transpose_weight(g["ConvTranspose_0"]["kernel"]))
    _load_batch_norm(generator.bn1, g["BatchNorm_1"], gs["BatchNorm_1"])
    put(generator.up2.weight, conv_transpose_weight(g["ConvTranspose_1"]["kernel"]))
    put(generator.up2.bias, g["ConvTranspose_1"]["bias"])
    put(discriminator.down1.weight, conv_weight(d["Conv_0"]["kernel"]))
    put(discriminator.down1.bias, d["Conv_0"]["bias"])
    put(discriminator.down2.weight, conv_weight(d["Conv_1"]["kernel"]))
    _load_batch_norm(discriminator.bn, d["BatchNorm_0"], ds["BatchNorm_0"])
    f7 = discriminator.bn.num_features
    put(discriminator.dense.weight, dense_from_nhwc(d["Dense_0"]["kernel"], 7, 7, f7))
    put(discriminator.dense.bias, d["Dense_0"]["bias"])
    return generator, discriminator
