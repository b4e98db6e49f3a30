"""Building blocks of the image models, in forms whose gradients XLA:CPU runs fast.

Each computes exactly what its Flax counterpart computes, with the same parameters (names,
shapes, initialisation), in a form whose gradient XLA compiles to fast code on a CPU (the
only backend measured here):

- :func:`max_pool_2x2`: ``nn.max_pool(x, (2, 2), strides=(2, 2))`` as a reshape and a max.
  XLA:CPU computes max pooling's gradient (``select_and_scatter``) slowly; the gradient of
  a max over a reshaped axis is an elementwise select.
- :class:`ConvTranspose2x`: ``nn.ConvTranspose(features, (4, 4), strides=(2, 2),
  padding='SAME', transpose_kernel=True)`` (PyTorch's ``ConvTranspose2d(kernel_size=4,
  stride=2, padding=1)``) as four 2 x 2 convolutions, one per output phase, interleaved
  ("sub-pixel" convolution: W. Shi et al., "Real-Time Single Image and Video
  Super-Resolution Using an Efficient Sub-Pixel Convolutional Neural Network", CVPR 2016).
  XLA:CPU computes the kernel gradient of ``lax.conv_transpose`` (a convolution of a
  dilated input) slowly; the phases' gradients are plain convolutions. (With jax 0.10.2,
  whose XLA:CPU runs convolutions through YNNPACK, the two forms took the same time in the
  Auto-Encoder's whole train step: 11 alternated rounds on 2026-12-01.) On other backends
  (GPUs, TPUs, whose libraries have transposed convolutions of their own) it stays
  ``lax.conv_transpose``.

What they gain in a whole train step: ``python -m experiments.benchmark_pytorch`` and the
README. ``tests/test_layers.py`` checks the equalities, gradients included.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

_DEFAULT_KERNEL_INIT = nn.initializers.lecun_normal()  # nn.ConvTranspose's default


def max_pool_2x2(x):
    """Max over non-overlapping 2 x 2 windows: (B, H, W, C) -> (B, H/2, W/2, C).

    Equal to ``nn.max_pool(x, (2, 2), strides=(2, 2))``. Its gradient goes to the window's
    maximum; where several elements tie for it, JAX shares the gradient among them
    (``select_and_scatter`` gives it to the first): after a ReLU the ties are zeros, whose
    ReLU gradient is 0 either way.

    Raises:
      ValueError: H or W odd.
    """
    B, H, W, C = x.shape
    if H % 2 or W % 2:
        raise ValueError(f"max_pool_2x2 needs even height and width, got {H} x {W}")
    return x.reshape(B, H // 2, 2, W // 2, 2, C).max(axis=(2, 4))


_DN = ("NHWC", "HWIO", "NHWC")


def conv_transpose_2x(x, kernel, sub_pixel: Optional[bool] = None):
    """PyTorch's ``ConvTranspose2d(kernel_size=4, stride=2, padding=1)`` without bias:
    (B, H, W, C) -> (B, 2H, 2W, O), ``kernel`` (4, 4, O, C) in the layout of
    ``nn.ConvTranspose(transpose_kernel=True)`` (PyTorch's (C, O, 4, 4) weight transposed).

    Output row 2m + r reads input rows m - 1 + r and m + r with kernel rows 3 - r and
    1 - r (the other two taps fall between input pixels), and likewise for columns; so each
    of the four phases (r, s) is a 2 x 2 convolution of the padded input, and the output
    interleaves them. With few output channels (O < 8) the four phases run as one 3 x 3
    convolution with 4 O outputs (each phase's taps in its 2 x 2 corner, zeros elsewhere):
    more multiplications, but one larger convolution instead of four tiny ones.

    ``sub_pixel``: compute it this way (default: on the CPU backend only; elsewhere as
    ``lax.conv_transpose``). Inputs of different float dtypes are promoted to a common one,
    as Flax's layers do.
    """
    dtype = jnp.result_type(x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if sub_pixel is None:
        sub_pixel = jax.default_backend() == "cpu"
    if not sub_pixel:
        return jax.lax.conv_transpose(x, kernel, (2, 2), "SAME", dimension_numbers=_DN,
                                      transpose_kernel=True)
    B, H, W, C = x.shape
    O = kernel.shape[2]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))                   # (B, H+2, W+2, C)
    if O < 8:
        k3 = jnp.zeros((3, 3, C, 2, 2, O), kernel.dtype)
        for r in (0, 1):
            for s in (0, 1):
                for i in (0, 1):
                    for j in (0, 1):
                        k3 = k3.at[r + i, s + j, :, r, s, :].set(kernel[3 - r - 2 * i,
                                                                        3 - s - 2 * j].T)
        y = jax.lax.conv_general_dilated(xp, k3.reshape(3, 3, C, 4 * O), (1, 1), "VALID",
                                         dimension_numbers=_DN)            # (B, H, W, 4 O)
        y = y.reshape(B, H, W, 2, 2, O).transpose(0, 1, 3, 2, 4, 5)      # (B, H, 2, W, 2, O)
        return y.reshape(B, 2 * H, 2 * W, O)
    rows = []
    for r in (0, 1):
        cols = []
        for s in (0, 1):
            taps = kernel[jnp.array([3 - r, 1 - r])][:, jnp.array([3 - s, 1 - s])]  # (2, 2, O, C)
            window = xp[:, r:r + H + 1, s:s + W + 1, :]                   # (B, H+1, W+1, C)
            cols.append(jax.lax.conv_general_dilated(
                window, taps.transpose(0, 1, 3, 2), (1, 1), "VALID",
                dimension_numbers=_DN))                                   # (B, H, W, O)
        rows.append(jnp.stack(cols, axis=3))                             # (B, H, W, 2, O)
    out = jnp.stack(rows, axis=2)                                        # (B, H, 2, W, 2, O)
    return out.reshape(B, 2 * H, 2 * W, out.shape[-1])


class ConvTranspose2x(nn.Module):
    """A transposed convolution that doubles height and width: kernel 4, stride 2,
    padding 1 (:func:`conv_transpose_2x`), plus a bias.

    The same parameters as ``nn.ConvTranspose(features, (4, 4), strides=(2, 2),
    padding='SAME', transpose_kernel=True, use_bias=use_bias)``: ``kernel`` (4, 4, features,
    C) and ``bias`` (features,), initialised alike (give it the same ``name`` to keep a
    checkpoint's parameter paths). Input (B, H, W, C) float32 -> (B, 2H, 2W, features).
    """

    features: int
    use_bias: bool = True
    kernel_init: Callable[..., Any] = _DEFAULT_KERNEL_INIT
    bias_init: Callable[..., Any] = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (4, 4, self.features, x.shape[-1]))
        y = conv_transpose_2x(x, kernel)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,))
        return y
