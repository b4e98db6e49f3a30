import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.gpt_shakespeare import PRESETS
from genjax.train.optim import make_optimizer, make_schedule


def params_and_grads():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w": jax.random.normal(k1, (3, 4)), "b": jax.random.normal(k2, (4,))}
    grads = {"w": jax.random.normal(k3, (3, 4)), "b": jax.random.normal(k4, (4,))}
    return params, grads


def adamw_reference(p, grads_seq, lr, b1, b2, eps, wd, decay):
    """torch.optim.AdamW's update, written out in numpy."""
    p = np.asarray(p, np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads_seq, start=1):
        g = np.asarray(g, np.float64)
        if decay:
            p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * mhat / (np.sqrt(vhat) + eps)
    return p


def test_lecture_preset_is_torch_adamw_defaults():
    _, cfg = PRESETS["lecture"]
    assert (cfg.learning_rate, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay) == \
        (3e-4, 0.9, 0.999, 1e-8, 0.01)
    tx, _ = make_optimizer(cfg)
    params, grads = params_and_grads()
    state = tx.init(params)
    p = params
    for _ in range(3):
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
    for name in ("w", "b"):  # every parameter decays, as torch's AdamW(lr=3e-4)
        ref = adamw_reference(params[name], [grads[name]] * 3, 3e-4, 0.9, 0.999, 1e-8, 0.01, True)
        np.testing.assert_allclose(p[name], ref, rtol=1e-6, atol=1e-7)


def test_cpu_preset_decays_matrices_only_and_clips():
    _, cfg = PRESETS["cpu"]
    cfg = type(cfg)(**{**cfg.__dict__, "lr_schedule": "constant"})
    tx, _ = make_optimizer(cfg)
    params, _ = params_and_grads()
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    # With zero gradients only the decay moves a parameter: -lr * wd * p on matrices.
    np.testing.assert_allclose(updates["w"], -1e-3 * 0.1 * params["w"], rtol=1e-5)
    np.testing.assert_array_equal(updates["b"], 0.0)
    big = jax.tree.map(lambda x: 100.0 * jnp.ones_like(x), params)
    clipped, _ = optax.clip_by_global_norm(1.0).update(big, optax.EmptyState())
    assert abs(float(optax.tree.norm(clipped)) - 1.0) < 1e-5


def test_cosine_schedule_follows_nanogpt():
    _, cfg = PRESETS["cpu"]
    lr = make_schedule(cfg)
    assert float(lr(0)) == 0.0
    assert float(lr(100)) == pytest.approx(1e-3)
    assert float(lr(50)) == pytest.approx(0.5e-3)
    assert float(lr(1050)) == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-4)
    assert float(lr(2000)) == pytest.approx(1e-4)
    assert float(lr(5000)) == pytest.approx(1e-4)
    # A final rate above the peak would make the "decay" climb: refused.
    with pytest.raises(ValueError, match="min_lr=0.01 must be between 0 and the peak "
                                         "learning_rate=0.001"):
        dataclasses.replace(cfg, min_lr=1e-2)


def test_optax_adamw_matches_torch_adamw():
    torch = pytest.importorskip("torch")
    _, cfg = PRESETS["lecture"]
    tx, _ = make_optimizer(cfg)
    params, grads = params_and_grads()
    tp = {k: torch.nn.Parameter(torch.tensor(np.asarray(v))) for k, v in params.items()}
    opt = torch.optim.AdamW(tp.values(), lr=3e-4)
    state, p = tx.init(params), params
    for i in range(3):
        g = jax.tree.map(lambda x: x * (i + 1), grads)
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
        for k in tp:
            tp[k].grad = torch.tensor(np.asarray(g[k]))
        opt.step()
    for k in tp:
        np.testing.assert_allclose(p[k], tp[k].detach().numpy(), rtol=1e-6, atol=1e-7)
