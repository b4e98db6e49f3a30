"""Variational Auto-Encoder with a Bernoulli decoder.

D. P. Kingma and M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014: the encoder
gives q(z|x) = N(mean, diag(exp(logvar))), z = mean + exp(logvar / 2) * eps with
eps ~ N(0, I) (the reparameterisation trick), the decoder gives Bernoulli logits of
p(x|z), and the loss is the negative ELBO = reconstruction + KL(q(z|x) || N(0, I)), in nats
per image. The importance-weighted bound is Y. Burda, R. Grosse and R. Salakhutdinov,
"Importance Weighted Autoencoders", ICLR 2016.

Shapes: B batch, L latent_dim, images (B, 28, 28, 1) float32 in [0, 1].
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from genjax.models.autoencoder import AEConfig, ConvDecoder, ConvEncoder, reconstruction_error

# exp(logvar) stays finite in float32 for |logvar| up to ~88; clipping at 30 keeps the KL
# and the samples finite for any encoder output while leaving every sane value untouched.
LOGVAR_LIMIT = 30.0


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Hyperparameters of :class:`VAE`.

    Attributes:
      latent_dim: L, size of z.
      features: channels of the conv encoder's stages (the decoder mirrors them).
      beta: weight of the KL term (beta-VAE, I. Higgins et al., ICLR 2017); 1 = the ELBO.

    Raises:
      ValueError: ``latent_dim`` <= 0, bad features, or a negative ``beta``.
    """

    latent_dim: int = 20
    features: tuple[int, int] = (32, 64)
    beta: float = 1.0

    def __post_init__(self):
        AEConfig(latent_dim=self.latent_dim, features=self.features)  # same checks
        object.__setattr__(self, "features", tuple(int(f) for f in self.features))
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta!r}")


class VAE(nn.Module):
    """``apply(params, x, key)`` -> (logits (B, 28, 28, 1), mean (B, L), logvar (B, L));
    ``method='encode'`` -> (mean, logvar); ``method='decode'`` z -> logits."""

    config: VAEConfig

    def setup(self):
        self.encoder = ConvEncoder(self.config.features, 2 * self.config.latent_dim)
        self.decoder = ConvDecoder(self.config.features)

    def encode(self, x):
        h = self.encoder(x)                                   # (B, 2L)
        mean, logvar = jnp.split(h, 2, axis=-1)               # (B, L) each
        return mean, jnp.clip(logvar, -LOGVAR_LIMIT, LOGVAR_LIMIT)

    def decode(self, z):
        return self.decoder(z)                                # (B, 28, 28, 1) logits

    def __call__(self, x, key):
        mean, logvar = self.encode(x)
        z = reparameterize(key, mean, logvar)
        return self.decode(z), mean, logvar


def reparameterize(key, mean, logvar):
    """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I) drawn with ``key``; (B, L)."""
    logvar = jnp.clip(logvar, -LOGVAR_LIMIT, LOGVAR_LIMIT)
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def kl_standard_normal(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)) in closed form, summed over L: (B,) nats.

    0.5 * sum(exp(logvar) + mean^2 - 1 - logvar); finite for any finite input since logvar
    is clipped to +-LOGVAR_LIMIT.
    """
    logvar = jnp.clip(logvar, -LOGVAR_LIMIT, LOGVAR_LIMIT)
    return 0.5 * jnp.sum(jnp.exp(logvar) + mean ** 2 - 1.0 - logvar, axis=-1)


def make_loss_fn(model: VAE):
    """``(params, (images, labels), key, train) -> (loss, metrics)``: loss = mean over
    images of recon + beta * KL; metrics ``recon_nats``, ``kl_nats``, ``neg_elbo`` (the
    beta = 1 bound), per image."""

    def loss_fn(params, batch, key, train):
        x, _ = batch
        logits, mean, logvar = model.apply({"params": params}, x, key)
        recon = reconstruction_error(logits, x, "bce")                     # (B,)
        kl = kl_standard_normal(mean, logvar)                              # (B,)
        loss = (recon + model.config.beta * kl).mean()
        return loss, {"recon_nats": recon.mean(), "kl_nats": kl.mean(),
                      "neg_elbo": (recon + kl).mean()}

    return loss_fn


def iwae_nll(model: VAE, params, x, key, k: int = 100):
    """Importance-weighted upper bound on -log p(x) with ``k`` samples, (B,) nats.

    -log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x), z_i ~ q(z|x); k = 1 is the negative ELBO
    (in expectation) and the bound tightens as k grows (Burda et al., 2016).
    """
    mean, logvar = model.apply({"params": params}, x, method=VAE.encode)   # (B, L)

    def one(key_i):
        z = reparameterize(key_i, mean, logvar)                            # (B, L)
        logits = model.apply({"params": params}, z, method=VAE.decode)
        log_px = -reconstruction_error(logits, x, "bce")                   # (B,)
        log_pz = -0.5 * jnp.sum(z ** 2 + jnp.log(2 * jnp.pi), -1)
        log_qz = -0.5 * jnp.sum((z - mean) ** 2 / jnp.exp(logvar) + logvar
                                + jnp.log(2 * jnp.pi), -1)
        return log_px + log_pz - log_qz                                    # (B,)

    log_w = jax.lax.map(one, jax.random.split(key, k))                     # (k, B)
    return -(jax.nn.logsumexp(log_w, axis=0) - jnp.log(k))
