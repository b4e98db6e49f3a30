"""Deep Convolutional Generative Adversarial Network (DCGAN) for 28 x 28 images.

I. Goodfellow et al., "Generative Adversarial Nets", NeurIPS 2014: a generator G maps noise
z ~ N(0, I) to images, a discriminator D scores images as real or generated, and the two are
trained against each other; G minimises the non-saturating loss -log D(G(z)). A. Radford,
L. Metz and S. Chintala, "Unsupervised Representation Learning with Deep Convolutional
Generative Adversarial Networks", ICLR 2016: the architecture (transposed convolutions with
BatchNorm and ReLU in G, a tanh output; strided convolutions with LeakyReLU(0.2) in D,
BatchNorm on its inner layers; weights from N(0, 0.02)) and the optimiser (Adam, lr 2e-4,
beta1 0.5). Options: the hinge loss (J. H. Lim and J. C. Ye, "Geometric GAN", 2017) and
one-sided label smoothing (T. Salimans et al., "Improved Techniques for Training GANs",
NeurIPS 2016).

Shapes: B batch, L ``latent_dim``, images (B, 28, 28, 1) float32 in [-1, 1]
(:func:`to_gan_range` / :func:`to_unit_range` convert from and to [0, 1]). BatchNorm
follows PyTorch's defaults (momentum 0.1 for the running statistics, epsilon 1e-5).

The variables of both players are one Flax tree, ``{'params': {'generator': ...,
'discriminator': ...}, 'batch_stats': {'generator': ..., 'discriminator': ...}}``
(:func:`init_variables`); each update below trains one player and changes only that
player's running statistics.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from genjax.models.layers import ConvTranspose2x

IMAGE_SHAPE = (28, 28, 1)
PLAYERS = ("generator", "discriminator")

_weight_init = nn.initializers.normal(stddev=0.02)  # DCGAN's N(0, 0.02)


def _bn_scale_init(key, shape, dtype=jnp.float32):
    """DCGAN's BatchNorm scale init: N(1, 0.02)."""
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


@dataclasses.dataclass(frozen=True)
class GANConfig:
    """Hyperparameters of the DCGAN.

    Attributes:
      latent_dim: L, the size of z ~ N(0, I).
      g_features: the generator's channels at 7 x 7 and at 14 x 14.
      d_features: the discriminator's channels at 14 x 14 and at 7 x 7.
      loss: ``bce`` (the discriminator's binary cross-entropy, the generator's
        non-saturating -log D(G(z))) or ``hinge``.
      label_smoothing: s in [0, 1): real images' target is 1 - s in the discriminator's
        binary cross-entropy (one-sided: generated images keep 0); ``bce`` only.
      d_steps: discriminator updates per generator update, each on its own real batch.

    Raises:
      ValueError: a non-positive ``latent_dim``, channel count or ``d_steps``, an unknown
        loss, or a label smoothing outside [0, 1) (or with ``hinge``), naming the value.
    """

    latent_dim: int = 100
    g_features: tuple[int, int] = (128, 64)
    d_features: tuple[int, int] = (64, 128)
    loss: Literal["bce", "hinge"] = "bce"
    label_smoothing: float = 0.0
    d_steps: int = 1

    def __post_init__(self):
        for name in ("latent_dim", "d_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("g_features", "d_features"):
            value = tuple(getattr(self, name))
            if len(value) != 2 or any(not isinstance(f, int) or isinstance(f, bool) or f <= 0
                                      for f in value):
                raise ValueError(f"{name} must be two positive channel counts, got {value!r}")
            object.__setattr__(self, name, value)
        if self.loss not in ("bce", "hinge"):
            raise ValueError(f"loss must be 'bce' or 'hinge', got {self.loss!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.label_smoothing and self.loss != "bce":
            raise ValueError(f"label_smoothing={self.label_smoothing} applies to the bce loss "
                             f"only, not {self.loss!r}")


def _batch_norm(train: bool, axis_name: Optional[str]):
    # In training the batch's statistics, synchronised over ``axis_name`` under pmap (so
    # that a run on N devices normalises as one device would); in evaluation the running
    # statistics.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        axis_name=axis_name if train else None, use_fast_variance=False,
                        scale_init=_bn_scale_init)


class Generator(nn.Module):
    """G: z (B, L) -> images (B, 28, 28, 1) in [-1, 1].

    Dense to 7 x 7 maps, BatchNorm, ReLU; two transposed convolutions (kernel 4, stride 2,
    the form of PyTorch's ``ConvTranspose2d(k=4, s=2, padding=1)``, computed by
    :class:`~genjax.models.layers.ConvTranspose2x`) 7 -> 14 -> 28, the first with BatchNorm
    and ReLU, the last with tanh.
    """

    config: GANConfig
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, z, train: bool = False):
        f7, f14 = self.config.g_features
        B = z.shape[0]
        norm = functools.partial(_batch_norm, train, self.axis_name)
        x = nn.Dense(7 * 7 * f7, use_bias=False, kernel_init=_weight_init)(z)  # (B, 7*7*f7)
        x = nn.relu(norm()(x.reshape(B, 7, 7, f7)))                              # (B, 7, 7, f7)
        x = ConvTranspose2x(f14, use_bias=False, kernel_init=_weight_init,
                            name="ConvTranspose_0")(x)                           # (B, 14, 14, f14)
        x = nn.relu(norm()(x))
        x = ConvTranspose2x(1, kernel_init=_weight_init, name="ConvTranspose_1")(x)
        return jnp.tanh(x)                                                       # (B, 28, 28, 1)


class Discriminator(nn.Module):
    """D: images (B, 28, 28, 1) in [-1, 1] -> logits (B,) float32 (> 0: "real").

    Two strided convolutions (kernel 4, stride 2, padding 1) 28 -> 14 -> 7 with
    LeakyReLU(0.2), BatchNorm on the second (inner) one, then a dense layer to one logit.

    Raises:
      ValueError: images not of shape (B, 28, 28, 1) (at trace time).
    """

    config: GANConfig
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"images must have shape (B, 28, 28, 1), got {tuple(x.shape)}")
        f14, f7 = self.config.d_features
        B = x.shape[0]
        down = functools.partial(nn.Conv, kernel_size=(4, 4), strides=(2, 2),
                                 padding=((1, 1), (1, 1)), kernel_init=_weight_init)
        x = nn.leaky_relu(down(f14)(x), 0.2)                                    # (B, 14, 14, f14)
        x = down(f7, use_bias=False)(x)                                          # (B, 7, 7, f7)
        x = nn.leaky_relu(_batch_norm(train, self.axis_name)(x), 0.2)
        logits = nn.Dense(1, kernel_init=_weight_init)(x.reshape(B, -1))        # (B, 1)
        return logits[:, 0].astype(jnp.float32)                                 # (B,)


class DCGAN(nn.Module):
    """Both players under one tree of variables (used by :func:`init_variables`)."""

    config: GANConfig

    def setup(self):
        self.generator = Generator(self.config)
        self.discriminator = Discriminator(self.config)

    def __call__(self, z, x, train: bool = False):
        return self.generator(z, train), self.discriminator(x, train)


def init_variables(config: GANConfig, key: jax.Array) -> dict:
    """Fresh variables of both players: ``{'params': {player: ...}, 'batch_stats':
    {player: ...}}`` (running means 0, variances 1)."""
    z = jnp.zeros((1, config.latent_dim), jnp.float32)
    x = jnp.zeros((1,) + IMAGE_SHAPE, jnp.float32)
    return DCGAN(config).init({"params": key}, z, x)


def player_variables(variables: dict, player: str) -> dict:
    """One player's Flax variables (``{'params': ..., 'batch_stats': ...}``) out of both."""
    return {collection: tree[player] for collection, tree in variables.items()}


def _state_with(variables: dict, player: str, batch_stats) -> dict:
    """The model state after ``player``'s running statistics became ``batch_stats``; the
    other player's are the very arrays they were."""
    return {"batch_stats": {**variables["batch_stats"], player: batch_stats}}


def _apply(module: nn.Module, variables: dict, player: str, x, train: bool):
    """``module`` (one player) on ``x``: its output, and in training also its new
    batch_stats (the batch's statistics are used and the running ones updated)."""
    own = player_variables(variables, player)
    if not train:
        return module.apply(own, x, False)
    out, updated = module.apply(own, x, True, mutable=["batch_stats"])
    return out, updated["batch_stats"]


def generate(config: GANConfig, variables: dict, z, train: bool = False,
             axis_name: Optional[str] = None):
    """G(z): (B, L) float32 -> images (B, 28, 28, 1) in [-1, 1].

    In evaluation (``train=False``) BatchNorm uses the running statistics, so each image
    depends on its own z alone; in training it uses the batch's and the call returns
    ``(images, new generator batch_stats)``.
    """
    return _apply(Generator(config, axis_name), variables, "generator", z, train)


def discriminate(config: GANConfig, variables: dict, images, train: bool = False,
                 axis_name: Optional[str] = None):
    """D(images): (B, 28, 28, 1) in [-1, 1] -> logits (B,); in training also the new
    discriminator batch_stats, as :func:`generate`."""
    return _apply(Discriminator(config, axis_name), variables, "discriminator", images, train)


def discriminator_loss(real_logits, fake_logits, kind: str = "bce",
                       label_smoothing: float = 0.0):
    """The discriminator's loss, a float32 scalar, from its logits on real (B,) and
    generated (B,) images.

    ``bce``: -[log D(x)] - [log(1 - D(G(z)))], batch means, computed from logits with
    ``optax.sigmoid_binary_cross_entropy`` (stable for any logit), the real target
    1 - ``label_smoothing``; 2 ln 2 = 1.3863 when every logit is 0. ``hinge``:
    mean(relu(1 - D(x))) + mean(relu(1 + D(G(z)))) on the logits.
    """
    if kind == "hinge":
        return jax.nn.relu(1.0 - real_logits).mean() + jax.nn.relu(1.0 + fake_logits).mean()
    real = optax.sigmoid_binary_cross_entropy(real_logits, jnp.full_like(real_logits,
                                                                          1.0 - label_smoothing))
    fake = optax.sigmoid_binary_cross_entropy(fake_logits, jnp.zeros_like(fake_logits))
    return real.mean() + fake.mean()


def generator_loss(fake_logits, kind: str = "bce"):
    """The generator's loss from D's logits on generated images (B,): ``bce``, the
    non-saturating -log D(G(z)) (ln 2 = 0.6931 at logit 0); ``hinge``, -mean(D(G(z)))."""
    if kind == "hinge":
        return -fake_logits.mean()
    return optax.sigmoid_binary_cross_entropy(fake_logits, jnp.ones_like(fake_logits)).mean()


def discriminator_update_loss(config: GANConfig, variables: dict, real, z,
                              axis_name: Optional[str] = None):
    """The discriminator update's objective: ``(loss, (metrics, model_state))``.

    G(z) is made with the batch's statistics and held constant (its running statistics
    are not changed here); D scores the real batch, then the generated one, in training
    mode, as two batches (its running statistics see both, in that order).

    Args:
      variables: both players' variables (see :func:`init_variables`).
      real: (B, 28, 28, 1) real images in [-1, 1]; z: (B, L) noise.

    Returns:
      ``loss`` (:func:`discriminator_loss`), ``metrics`` ``d_x`` and ``d_g_z`` (the means
      of sigmoid(D(x)) and sigmoid(D(G(z))): the probability D gives "real"), and the
      model state with the discriminator's new running statistics.
    """
    fake, _ = generate(config, variables, z, train=True, axis_name=axis_name)
    fake = jax.lax.stop_gradient(fake)
    real_logits, stats = discriminate(config, variables, real, True, axis_name)
    after_real = {"params": variables["params"], **_state_with(variables, "discriminator", stats)}
    fake_logits, stats = discriminate(config, after_real, fake, True, axis_name)
    loss = discriminator_loss(real_logits, fake_logits, config.loss, config.label_smoothing)
    metrics = {"d_x": jax.nn.sigmoid(real_logits).mean(),
               "d_g_z": jax.nn.sigmoid(fake_logits).mean()}
    return loss, (metrics, _state_with(variables, "discriminator", stats))


def generator_update_loss(config: GANConfig, variables: dict, z,
                          axis_name: Optional[str] = None):
    """The generator update's objective: ``(loss, (metrics, model_state))``.

    G(z) in training mode, scored by D in training mode (the batch's statistics); the
    gradient flows through D(G(z)) into G. Only G's running statistics change: D's, like
    its parameters, are the ones given.

    Returns:
      ``loss`` (:func:`generator_loss`), no metrics, and the model state with the
      generator's new running statistics.
    """
    fake, stats = generate(config, variables, z, train=True, axis_name=axis_name)
    logits, _ = discriminate(config, variables, fake, True, axis_name)
    return generator_loss(logits, config.loss), ({}, _state_with(variables, "generator", stats))


def evaluation_metrics(config: GANConfig, variables: dict, real, z) -> dict:
    """Both players in evaluation mode on held-out ``real`` (B, 28, 28, 1) in [-1, 1] and as
    many generated images from ``z`` (B, L): float32 batch means ``d_loss``, ``g_loss``,
    ``d_x``, ``d_g_z`` (as :func:`discriminator_update_loss`) and ``d_accuracy``, the
    fraction of the 2B images that D classifies right (logit > 0 for real, < 0 for
    generated): 0.5 means D can no longer tell them apart."""
    fake = generate(config, variables, z)
    real_logits = discriminate(config, variables, real)
    fake_logits = discriminate(config, variables, fake)
    accuracy = 0.5 * ((real_logits > 0).mean() + (fake_logits < 0).mean())
    return {"d_loss": discriminator_loss(real_logits, fake_logits, config.loss,
                                         config.label_smoothing),
            "g_loss": generator_loss(fake_logits, config.loss),
            "d_x": jax.nn.sigmoid(real_logits).mean(),
            "d_g_z": jax.nn.sigmoid(fake_logits).mean(),
            "d_accuracy": accuracy.astype(jnp.float32)}


def to_gan_range(images):
    """[0, 1] -> [-1, 1] (2x - 1)."""
    return images * 2.0 - 1.0


def to_unit_range(images):
    """[-1, 1] -> [0, 1] ((x + 1) / 2), for pictures and metrics."""
    return (images + 1.0) / 2.0
