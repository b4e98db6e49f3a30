"""genjax/models/layers.py: the fast forms compute what Flax's layers compute, gradients
included, with the same parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax.models.layers import ConvTranspose2x, conv_transpose_2x, max_pool_2x2


@pytest.mark.parametrize("features", [1, 3, 16])  # one 3x3 convolution below 8, phases above
def test_conv_transpose_2x_equals_flax_conv_transpose(features):
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 7, 12))
    ours = ConvTranspose2x(features)
    theirs = nn.ConvTranspose(features, (4, 4), strides=(2, 2), padding="SAME",
                              transpose_kernel=True)
    params = ours.init(jax.random.PRNGKey(1), x)
    flax_params = theirs.init(jax.random.PRNGKey(1), x)
    # The same parameters, drawn alike: a checkpoint of either fits the other.
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(flax_params)):
        np.testing.assert_array_equal(a, b)
    y = ours.apply(params, x)
    assert y.shape == (3, 14, 14, features)
    np.testing.assert_allclose(y, theirs.apply(params, x), atol=2e-5)

    def grads(module):
        return jax.grad(lambda p, x: jnp.sum(module.apply(p, x) ** 2), argnums=(0, 1))(params, x)

    for a, b in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(theirs))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # The form other backends use, and mixed precision (promoted as Flax promotes).
    kernel = params["params"]["kernel"]
    np.testing.assert_allclose(conv_transpose_2x(x, kernel, sub_pixel=False),
                               conv_transpose_2x(x, kernel, sub_pixel=True), atol=2e-5)
    assert conv_transpose_2x(x.astype(jnp.bfloat16), kernel).dtype == jnp.float32


def test_max_pool_2x2_equals_flax_max_pool():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 28, 28, 5))
    np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
    g = jax.random.normal(jax.random.PRNGKey(1), (2, 14, 14, 5))
    ours = jax.vjp(max_pool_2x2, x)[1](g)[0]
    theirs = jax.vjp(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)), x)[1](g)[0]
    np.testing.assert_array_equal(ours, theirs)  # no ties among random values
    with pytest.raises(ValueError, match="even height and width, got 7 x 7"):
        max_pool_2x2(jnp.zeros((1, 7, 7, 1)))
