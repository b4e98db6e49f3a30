"""Transposed convolution, worked through with printed matrices.

    python -m experiments.transposed_convolution

1. A 2x2 input and a 3x3 kernel at stride 2 give a 4x4 output with ``SAME`` padding and a
   5x5 one with ``VALID``: every input pixel stamps a copy of the kernel, scaled by its
   value, at stride 2, and overlapping stamps add up.
2. A transposed convolution is the gradient (vector-Jacobian product) of the strided
   convolution with the same kernel (V. Dumoulin and F. Visin, "A guide to convolution
   arithmetic for deep learning", 2016).
3. Porting weights between Flax ``nn.ConvTranspose`` and PyTorch ``ConvTranspose2d``:
   PyTorch's weight (in, out, kh, kw) becomes Flax's (kh, kw, out, in) with
   ``transpose_kernel=True``, or the same spatially flipped as (kh, kw, in, out) with the
   default ``transpose_kernel=False``. With kernel 3, stride 2, Flax ``SAME`` equals PyTorch
   ``padding=0`` cropped to its first 4x4 (not ``padding=1, output_padding=1``, which is one
   pixel off); with kernel 4, stride 2, Flax ``SAME`` equals PyTorch ``padding=1``. The
   genjax decoders use the kernel-4 form.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tyro


def conv_transpose(x, kernel, stride: int, padding: str, transpose_kernel: bool = False):
    """Flax ``nn.ConvTranspose`` with a given kernel, no bias.

    Args:
      x: (B, H, W, C_in) float32.
      kernel: (kh, kw, C_in, C_out) when ``transpose_kernel`` is False, else
        (kh, kw, C_out, C_in) (the layout of the forward convolution it transposes).
    Returns:
      (B, H', W', C_out): H' = H * stride for ``SAME``, (H - 1) * stride + kh for ``VALID``.
    """
    features = kernel.shape[2] if transpose_kernel else kernel.shape[3]
    layer = nn.ConvTranspose(features, kernel.shape[:2], strides=(stride, stride),
                             padding=padding, use_bias=False, transpose_kernel=transpose_kernel)
    return layer.apply({"params": {"kernel": kernel}}, x)


def conv(x, kernel, stride: int, padding):
    """The strided convolution (cross-correlation) ``lax.conv_general_dilated``, NHWC/HWIO."""
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def transpose_as_gradient(y, kernel, stride: int, input_hw: tuple[int, int], padding):
    """The VJP of ``conv(., kernel, stride, padding)`` at an input of size ``input_hw``,
    applied to ``y``: the transposed convolution. kernel (kh, kw, C_in, C_out)."""
    x0 = jnp.zeros((y.shape[0], *input_hw, kernel.shape[2]), y.dtype)
    _, vjp = jax.vjp(lambda x: conv(x, kernel, stride, padding), x0)
    return vjp(y)[0]


@dataclasses.dataclass(frozen=True)
class Demo:
    """Transposed convolution worked through with printed matrices: the SAME and VALID
    outputs of a 2x2 input and a 3x3 kernel at stride 2, the transposed convolution as the
    gradient of the strided one, and the weight layout against PyTorch's ConvTranspose2d
    (with the torch extra). No flags."""


def main(argv=None):
    """Print the demo (``--help``: what it shows)."""
    tyro.cli(Demo, args=argv, prog="python -m experiments.transposed_convolution")
    np.set_printoptions(precision=1, suppress=True, linewidth=100)
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
    k = jnp.arange(1.0, 10.0).reshape(3, 3, 1, 1)
    print("input (2x2):\n", np.asarray(x[0, ..., 0]))
    print("kernel (3x3):\n", np.asarray(k[..., 0, 0]))
    for padding in ("VALID", "SAME"):
        out = conv_transpose(x, k, 2, padding, transpose_kernel=True)
        print(f"\nflax ConvTranspose(transpose_kernel=True), stride 2, {padding} -> "
              f"{out.shape[1]}x{out.shape[2]}:")
        print(np.asarray(out[0, ..., 0]))
    print("\nEach input pixel adds value * kernel at stride 2 and overlaps add up; VALID is the "
          "full 5x5 sum of the stamps, SAME its first 4x4. With the default "
          "transpose_kernel=False Flax stamps the spatially flipped kernel:")
    print(np.asarray(conv_transpose(x, k, 2, "VALID")[0, ..., 0]))

    # The gradient identity: transposed conv = VJP of the strided conv (kernel flipped
    # spatially, in/out swapped, as transpose_kernel=True does).
    y = jnp.arange(1.0, 5.0).reshape(1, 2, 2, 1)
    grad = transpose_as_gradient(y, k, 2, (5, 5), "VALID")
    tconv = conv_transpose(y, k, 2, "VALID", transpose_kernel=True)
    print("\nVJP of the stride-2 VALID convolution (5x5 -> 2x2) applied to [[1, 2], [3, 4]]:")
    print(np.asarray(grad[0, ..., 0]))
    print("ConvTranspose(transpose_kernel=True) of the same: equal =",
          bool(jnp.allclose(grad, tconv)))

    try:
        import torch
    except ImportError:
        print("\n(PyTorch not installed: pip install -e '.[torch]' to compare with ConvTranspose2d)")
        return
    for size, torch_padding in ((3, 0), (4, 1)):
        w = np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)  # (in, out)
        xin = np.random.default_rng(1).normal(size=(1, 2, 5, 5)).astype(np.float32)     # NCHW
        ref = torch.nn.functional.conv_transpose2d(torch.tensor(xin), torch.tensor(w), stride=2,
                                                   padding=torch_padding).numpy()
        ours = conv_transpose(jnp.asarray(xin.transpose(0, 2, 3, 1)),
                              jnp.asarray(w.transpose(2, 3, 1, 0)), 2, "SAME",
                              transpose_kernel=True)
        ours = np.asarray(ours).transpose(0, 3, 1, 2)
        ref = ref[:, :, :ours.shape[2], :ours.shape[3]]
        print(f"\nkernel {size}: flax SAME vs torch padding={torch_padding} (cropped to "
              f"{ours.shape[2]}x{ours.shape[3]}): max |diff| = {np.abs(ours - ref).max():.2e}")


if __name__ == "__main__":
    main()
