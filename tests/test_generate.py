import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax.models.gpt import GPT, GPTConfig, generate

CFG = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.0)


@pytest.fixture(scope="module")
def params():
    return GPT(CFG).init_params(jax.random.PRNGKey(0))


def greedy_reference(params, prompt, n):
    """The lecture's loop in plain Python: crop, forward, take the last logits."""
    apply, idx = jax.jit(GPT(CFG).apply), list(prompt)
    for _ in range(n):
        ctx = jnp.asarray(idx[-CFG.block_size:])[None]
        logits = apply({"params": params}, ctx)[0, -1]
        idx.append(int(jnp.argmax(logits)))
    return idx


def test_greedy_matches_python_reference_with_long_prompt(params):
    prompt = [i % 11 for i in range(13)]  # longer than block_size = 8
    out = GPT(CFG).generate(params, jnp.asarray(prompt), 10, jax.random.PRNGKey(0), temperature=0)
    assert out.shape == (23,) and out.dtype == jnp.int32
    assert out.tolist() == greedy_reference(params, prompt, 10)
    # Short prompt: padding beyond the current length must not matter.
    assert GPT(CFG).generate(params, jnp.asarray([3]), 5, jax.random.PRNGKey(0),
                             temperature=0).tolist() == greedy_reference(params, [3], 5)


def test_sampling_is_deterministic_per_key_and_varies_across_keys(params):
    a = generate(CFG, params, jnp.asarray([1, 2]), 40, jax.random.PRNGKey(3))
    b = generate(CFG, params, jnp.asarray([1, 2]), 40, jax.random.PRNGKey(3))
    c = generate(CFG, params, jnp.asarray([1, 2]), 40, jax.random.PRNGKey(4))
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).any()


def test_top_k_one_is_greedy_and_large_top_k_is_clamped(params):
    key = jax.random.PRNGKey(7)
    greedy = generate(CFG, params, jnp.asarray([5]), 12, key, temperature=0)
    np.testing.assert_array_equal(generate(CFG, params, jnp.asarray([5]), 12, key, top_k=1), greedy)
    np.testing.assert_array_equal(generate(CFG, params, jnp.asarray([5]), 12, key, top_k=1000),
                                  generate(CFG, params, jnp.asarray([5]), 12, key))


def test_empty_prompt_starts_from_start_id_and_batches(params):
    out = generate(CFG, params, jnp.zeros((0,), jnp.int32), 6, jax.random.PRNGKey(0), start_id=4)
    assert out.shape == (7,) and int(out[0]) == 4
    batch = generate(CFG, params, jnp.asarray([[1, 2], [3, 4]]), 5, jax.random.PRNGKey(0))
    assert batch.shape == (2, 7)
    assert generate(CFG, params, jnp.asarray([1]), 0, jax.random.PRNGKey(0)).tolist() == [1]


def test_one_compilation_for_the_whole_loop(params):
    from genjax.models import gpt

    gpt._generate_jit.clear_cache()
    generate(CFG, params, jnp.asarray([1, 2, 3]), 30, jax.random.PRNGKey(0))
    generate(CFG, params, jnp.asarray([4, 5, 6]), 30, jax.random.PRNGKey(1), temperature=0.5)
    assert gpt._generate_jit._cache_size() == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0 .*got nan"),
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    (dict(top_k=0), "top_k must be >= 1"),
])
def test_bad_arguments_raise(params, kwargs, match):
    args = dict(max_new_tokens=3, temperature=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(CFG, params, jnp.asarray([1]), key=jax.random.PRNGKey(0), **args)


def test_out_of_vocabulary_prompt_raises(params):
    with pytest.raises(ValueError, match="prompt ids must lie in \\[0, 11\\)"):
        generate(CFG, params, jnp.asarray([11]), 3, jax.random.PRNGKey(0))
