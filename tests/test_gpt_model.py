import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax.models.gpt import (GPT, BigramLanguageModel, GPTConfig, Head, MultiHeadAttention,
                               count_params, cross_entropy_loss, make_loss_fn)
from genjax.tasks.gpt import checkpoint_model_meta

TINY = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.2)


def test_lecture_config_has_the_lectures_parameter_count():
    cfg = GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2)
    shapes = jax.eval_shape(GPT(cfg).init_params, jax.random.PRNGKey(0))
    assert count_params(shapes) == 10_788_929


def test_init_follows_the_lecture():
    params = GPT(TINY).init_params(jax.random.PRNGKey(0))
    emb = params["token_embedding_table"]["embedding"]
    assert abs(float(emb.std()) - 0.02) < 0.003
    assert float(jnp.abs(params["lm_head"]["bias"]).max()) == 0.0
    np.testing.assert_array_equal(params["blocks_0"]["ln1"]["scale"], 1.0)
    assert params["blocks_0"]["sa"]["heads"]["query"]["kernel"].shape == (4, 32, 8)  # (H, C, D)


def test_loss_at_init_is_ln_vocab():
    params = GPT(TINY).init_params(jax.random.PRNGKey(0))
    x = jax.random.randint(jax.random.PRNGKey(1), (8, 16), 0, 65)
    y = jax.random.randint(jax.random.PRNGKey(2), (8, 16), 0, 65)
    loss, _ = make_loss_fn(GPT(TINY))(params, (x, y), jax.random.PRNGKey(3), False)
    assert loss.dtype == jnp.float32
    assert abs(float(loss) - math.log(65)) < 0.05


def test_cross_entropy_matches_reference():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5))
    y = jnp.array([[0, 4, 2], [1, 1, 3]])
    p = np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(-1, keepdims=True)
    ref = -np.mean([np.log(p[b, t, y[b, t]]) for b in range(2) for t in range(3)])
    assert abs(float(cross_entropy_loss(logits, y)) - ref) < 1e-6


def test_causality_later_tokens_do_not_change_earlier_logits():
    model = GPT(TINY)
    params = model.init_params(jax.random.PRNGKey(0))
    x = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 65)
    x2 = x.at[:, 10].set((x[:, 10] + 1) % 65)
    apply = jax.jit(model.apply)
    a, b = apply({"params": params}, x), apply({"params": params}, x2)
    np.testing.assert_array_equal(a[:, :10], b[:, :10])
    assert float(jnp.abs(a[:, 10:] - b[:, 10:]).max()) > 1e-4


def test_dropout_off_at_eval_and_keyed_in_training():
    model = GPT(TINY)
    params = model.init_params(jax.random.PRNGKey(0))
    x = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 65)
    apply = jax.jit(model.apply, static_argnums=2)
    ev = apply({"params": params}, x, True)
    np.testing.assert_array_equal(ev, apply({"params": params}, x, True,
                                            rngs={"dropout": jax.random.PRNGKey(5)}))
    tr1 = apply({"params": params}, x, False, rngs={"dropout": jax.random.PRNGKey(5)})
    tr2 = apply({"params": params}, x, False, rngs={"dropout": jax.random.PRNGKey(6)})
    tr1b = apply({"params": params}, x, False, rngs={"dropout": jax.random.PRNGKey(5)})
    np.testing.assert_array_equal(tr1, tr1b)
    assert float(jnp.abs(tr1 - tr2).max()) > 1e-3
    assert float(jnp.abs(tr1 - ev).max()) > 1e-3


def test_batched_heads_equal_the_lectures_list_of_heads():
    mha = MultiHeadAttention(n_head=4, head_size=8, dropout=0.0)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 32))
    variables = jax.jit(mha.init)(jax.random.PRNGKey(1), x)
    p = variables["params"]
    out = jax.jit(mha.apply)(variables, x)
    heads = []
    for h in range(4):  # one Head module per head, as the lecture's nn.ModuleList
        hp = jax.tree.map(lambda a: a[h], p["heads"])
        heads.append(jax.jit(Head(8, 0.0).apply)({"params": hp}, x))
    concat = jnp.concatenate(heads, axis=-1)
    ref = concat @ p["proj"]["kernel"] + p["proj"]["bias"]
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_bigram_model_shapes():
    m = BigramLanguageModel(65)
    x = jnp.zeros((3, 7), jnp.int32)
    params = m.init(jax.random.PRNGKey(0), x)
    assert m.apply(params, x).shape == (3, 7, 65)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_embd=30, n_head=4), "n_embd=30 is not divisible by n_head=4"),
    (dict(n_layer=0), "n_layer must be a positive integer, got 0"),
    (dict(block_size=-1), "block_size must be a positive integer"),
    (dict(dropout=1.0), "dropout must be in \\[0, 1\\)"),
    (dict(dtype="float16"), "dtype must be one of \\['bfloat16', 'float32'\\], got 'float16'"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


def test_sequence_longer_than_block_size_raises():
    model = GPT(TINY)
    params = model.init_params(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="sequence length 17 exceeds block_size=16"):
        model.apply({"params": params}, jnp.zeros((1, 17), jnp.int32))


# --- the fused attention path and mixed precision ------------------------------------------


def _loss_and_grads(cfg, attention, params, x, y, train=False, key=None):
    loss_fn = make_loss_fn(GPT(cfg, attention=attention))
    return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, (x, y), key, train)[0]))(params)


@pytest.mark.parametrize("train", [False, True])
def test_fused_attention_equals_the_heads_path(train):
    cfg = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    params = GPT(cfg).init_params(jax.random.PRNGKey(0))
    x = jax.random.randint(jax.random.PRNGKey(1), (4, 16), 0, 65)
    y = jax.random.randint(jax.random.PRNGKey(2), (4, 16), 0, 65)
    key = jax.random.PRNGKey(3)
    heads, g_heads = _loss_and_grads(cfg, "heads", params, x, y, train, key)
    fused, g_fused = _loss_and_grads(cfg, "fused", params, x, y, train, key)
    assert abs(float(heads) - float(fused)) < 1e-5
    for a, b in zip(jax.tree.leaves(g_heads), jax.tree.leaves(g_fused)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # the same parameters, so a checkpoint of either path loads in the other
    fused_init = GPT(cfg, attention="fused").init({"params": jax.random.PRNGKey(0)}, x)
    assert jax.tree.structure(fused_init["params"]) == jax.tree.structure(params)
    assert jax.tree.map(jnp.shape, fused_init["params"]) == jax.tree.map(jnp.shape, params)


def test_fused_attention_with_dropout_is_keyed_and_has_the_same_eval():
    params = GPT(TINY).init_params(jax.random.PRNGKey(0))
    x = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 65)
    fused = jax.jit(GPT(TINY, attention="fused").apply, static_argnums=2)
    heads = jax.jit(GPT(TINY, attention="heads").apply, static_argnums=2)
    np.testing.assert_allclose(fused({"params": params}, x, True),
                               heads({"params": params}, x, True), atol=1e-5)
    tr1 = fused({"params": params}, x, False, rngs={"dropout": jax.random.PRNGKey(5)})
    tr2 = fused({"params": params}, x, False, rngs={"dropout": jax.random.PRNGKey(6)})
    np.testing.assert_array_equal(
        tr1, fused({"params": params}, x, False, rngs={"dropout": jax.random.PRNGKey(5)}))
    assert float(jnp.abs(tr1 - tr2).max()) > 1e-3


def test_unknown_attention_is_refused():
    params = GPT(TINY).init_params(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="attention must be one of .* got 'flash'"):
        GPT(TINY, attention="flash").apply({"params": params}, jnp.zeros((1, 4), jnp.int32))


BF16 = dataclasses.replace(TINY, dtype="bfloat16", dropout=0.0)


def test_bfloat16_keeps_float32_parameters_loss_and_zero_logit_loss():
    params = GPT(BF16).init_params(jax.random.PRNGKey(0))
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    x = jax.random.randint(jax.random.PRNGKey(1), (8, 16), 0, 65)
    y = jax.random.randint(jax.random.PRNGKey(2), (8, 16), 0, 65)
    loss, grads = _loss_and_grads(BF16, "auto", params, x, y)
    assert loss.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    f32_loss, _ = _loss_and_grads(TINY, "auto", params, x, y)
    assert abs(float(loss) - float(f32_loss)) < 0.02  # bf16 products, same model
    zero_head = jax.tree.map(jnp.zeros_like, params["lm_head"])
    for attention in ("heads", "fused"):  # zero logits: exactly ln(vocab), as float32
        loss, _ = _loss_and_grads(BF16, attention, {**params, "lm_head": zero_head}, x, y)
        assert loss.dtype == jnp.float32 and float(loss) == pytest.approx(math.log(65), abs=1e-6)


def test_compute_dtype_is_not_part_of_the_checkpoint():
    assert checkpoint_model_meta(BF16) == checkpoint_model_meta(
        dataclasses.replace(BF16, dtype="float32"))
    assert "dtype" not in checkpoint_model_meta(BF16)
