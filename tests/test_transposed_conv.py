import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.transposed_convolution import conv_transpose, transpose_as_gradient


def test_shapes_same_and_valid():
    x = jnp.ones((1, 2, 2, 1))
    k = jnp.ones((3, 3, 1, 1))
    assert conv_transpose(x, k, 2, "SAME").shape == (1, 4, 4, 1)
    assert conv_transpose(x, k, 2, "VALID").shape == (1, 5, 5, 1)


def test_stamps_add_up():
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
    k = jnp.arange(1.0, 10.0).reshape(3, 3, 1, 1)
    out = np.asarray(conv_transpose(x, k, 2, "VALID", transpose_kernel=True)[0, ..., 0])
    ref = np.zeros((5, 5))
    for i in range(2):
        for j in range(2):
            ref[2 * i:2 * i + 3, 2 * j:2 * j + 3] += float(x[0, i, j, 0]) * np.asarray(k[..., 0, 0])
    np.testing.assert_allclose(out, ref)


@pytest.mark.parametrize("padding, in_hw", [("VALID", (9, 9)), ("SAME", (8, 8))])
def test_transposed_convolution_is_the_gradient_of_the_strided_convolution(padding, in_hw):
    k = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 2, 4))   # (kh, kw, C_in, C_out)
    y = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 4))
    grad = transpose_as_gradient(y, k, 2, in_hw, padding)
    ours = conv_transpose(y, k, 2, padding, transpose_kernel=True)
    assert grad.shape == ours.shape == (2, *in_hw, 2)
    np.testing.assert_allclose(ours, grad, atol=1e-5)


@pytest.mark.parametrize("size, torch_padding", [(3, 0), (4, 1)])
def test_flax_and_pytorch_conventions(size, torch_padding):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 3, size, size)).astype(np.float32)       # torch (in, out, kh, kw)
    x = rng.normal(size=(1, 2, 5, 5)).astype(np.float32)             # NCHW
    ref = torch.nn.functional.conv_transpose2d(torch.tensor(x), torch.tensor(w), stride=2,
                                               padding=torch_padding).numpy()
    x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
    ours = np.asarray(conv_transpose(x_nhwc, jnp.asarray(w.transpose(2, 3, 1, 0)), 2, "SAME",
                                     transpose_kernel=True)).transpose(0, 3, 1, 2)
    assert ours.shape[2:] == (10, 10)
    np.testing.assert_allclose(ours, ref[:, :, :10, :10], atol=1e-5)
    # transpose_kernel=False needs the kernel flipped spatially, in/out as (in, out).
    flipped = jnp.asarray(w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1))
    ours_f = np.asarray(conv_transpose(x_nhwc, flipped, 2, "SAME")).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(ours_f, ref[:, :, :10, :10], atol=1e-5)
    if size == 3:  # padding=1, output_padding=1 is one pixel off
        shifted = torch.nn.functional.conv_transpose2d(
            torch.tensor(x), torch.tensor(w), stride=2, padding=1, output_padding=1).numpy()
        assert np.abs(shifted - ours).max() > 1e-2
