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


def test_the_schedule_is_optax_warmup_cosine_and_an_argument_of_the_update():
    base = PRESETS["cpu"][1]
    for lr, min_lr, warmup, decay in [(1e-3, 1e-4, 100, 2000), (6e-4, 6e-5, 0, 500),
                                      (3e-4, 0.0, 1, 7), (2.5e-3, 1.3e-5, 17, 1013)]:
        cfg = dataclasses.replace(base, learning_rate=lr, min_lr=min_lr, warmup_iters=warmup,
                                  lr_decay_iters=decay, max_iters=decay)
        ours = make_schedule(cfg)
        ref = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay, min_lr)
        steps = np.arange(0, decay + 20, 7)
        # on the host, the same float32 operations: equal
        assert [float(ours(s)) for s in steps] == [float(ref(s)) for s in steps]
        # traced, as the compiled step takes it: XLA may round a division differently
        traced = jax.jit(lambda schedule, s: jax.vmap(schedule)(s))(ours, steps)
        np.testing.assert_allclose(traced, jax.vmap(ref)(steps), rtol=2e-6, atol=1e-7 * lr)
    constant = make_schedule(PRESETS["lecture"][1])
    assert float(constant(0)) == float(constant(10 ** 6)) == np.float32(3e-4)
    # The optimizer: optax.adamw's state (checkpoints load either way) and updates; the
    # schedule given to update as its lr_schedule argument replaces the configured one.
    cfg = dataclasses.replace(base, warmup_iters=2, lr_decay_iters=10, max_iters=10)
    tx, schedule = make_optimizer(cfg)
    ref = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, 2, 10, cfg.min_lr),
        b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay,
        mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
    params, grads = params_and_grads()
    state, ref_state = tx.init(params), ref.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    other = make_schedule(dataclasses.replace(cfg, learning_rate=2 * cfg.learning_rate,
                                              min_lr=2 * cfg.min_lr))
    for _ in range(4):
        updates, new_state = tx.update(grads, state, params)
        ref_updates, ref_state = ref.update(grads, ref_state, params)
        doubled, _ = tx.update(grads, state, params, lr_schedule=other)
        for name in params:
            np.testing.assert_array_equal(updates[name], ref_updates[name])
            np.testing.assert_allclose(doubled[name], 2 * updates[name], rtol=1e-5,
                                       atol=1e-12)
        state = new_state


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
