"""The data-parallel engines on 8 CPU devices (forced in conftest.py)."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from genjax.train.loop import fit
from genjax.train.parallel import make_engine
from genjax.train.steps import create_train_state, make_train_step
from helpers import tiny_gpt_task, tiny_train_config

ENGINES = ["pmap", "sharding"]


def test_eight_devices_are_there():
    assert jax.device_count() == 8


def one_step(task, kind, n_devices, batch, key):
    tx = optax.adamw(1e-2, weight_decay=0.01)
    engine = make_engine(kind, n_devices, batch[0].shape[0])
    params = task.init_params(jax.random.PRNGKey(0))
    state = engine.put_replicated(create_train_state(params, tx))
    step = engine.compile_train_step(task.loss_fn, tx)
    return step(state, engine.put_batch(batch), engine.put_replicated(key))


@pytest.mark.parametrize("kind", ENGINES)
def test_eight_devices_equal_one_device(kind, play_text):
    task, _, _ = tiny_gpt_task(play_text, dropout=0.0, batch_size=16)
    batch = task.train_batch(jax.random.PRNGKey(3), 0, 0, 16)
    ref_state, ref_metrics = one_step(task, "none", 1, batch, jax.random.PRNGKey(4))
    state, metrics = one_step(task, kind, 8, batch, jax.random.PRNGKey(4))
    chex.assert_trees_all_close(jax.device_get(state.params), jax.device_get(ref_state.params),
                                atol=1e-5)
    assert abs(float(metrics["loss"]) - float(ref_metrics["loss"])) < 1e-5
    assert int(state.step) == 1


class _Masks:
    """A loss whose metric is the mean dropout mask over the batch rows."""

    @staticmethod
    def loss_fn(params, batch, key, train):
        mask = nn.Dropout(0.5).apply({}, batch, deterministic=False, rngs={"dropout": key})
        return jnp.mean(mask * params["w"]), {"mask": mask.mean(axis=0)}


@pytest.mark.parametrize("kind", ENGINES)
def test_dropout_masks_differ_across_devices_and_steps(kind):
    engine = make_engine(kind, 8, 8)  # one row per device
    tx = optax.sgd(0.0)
    state = engine.put_replicated(create_train_state({"w": jnp.ones((64,))}, tx))
    step = engine.compile_train_step(_Masks.loss_fn, tx)
    batch = engine.put_batch(jnp.ones((8, 64)))
    dropout_key = engine.put_replicated(jax.random.PRNGKey(0))
    masks = []
    for k in range(2):  # the step's key: fold_in(dropout_key, state.step), inside the step
        state, metrics = step(state, batch, dropout_key)
        masks.append(np.asarray(metrics["mask"]))
    for m in masks:
        # With a mask shared by all devices each entry would be 0 or 2 (= 1 / keep rate).
        assert ((m > 0.01) & (m < 1.99)).any(), m
    assert not np.array_equal(masks[0], masks[1])
    # the same step again draws the same masks; the dropout key alone decides them
    fresh = engine.put_replicated(create_train_state({"w": jnp.ones((64,))}, tx))
    again = step(fresh, batch, dropout_key)[1]
    np.testing.assert_array_equal(np.asarray(again["mask"]), masks[0])
    other = step(engine.put_replicated(create_train_state({"w": jnp.ones((64,))}, tx)), batch,
                 engine.put_replicated(jax.random.PRNGKey(1)))[1]
    assert not np.array_equal(np.asarray(other["mask"]), masks[0])


def test_host_batch_step_folds_the_step_number_into_the_dropout_key():
    # fit passes the run's dropout key; the compiled step draws with fold_in(key, state.step),
    # the key that make_train_step is given for that step.
    engine = make_engine("none", 1, 8)
    tx = optax.sgd(0.0)
    fresh = lambda: create_train_state({"w": jnp.ones((64,))}, tx)  # noqa: E731
    step = engine.compile_train_step(_Masks.loss_fn, tx)
    plain = jax.jit(make_train_step(_Masks.loss_fn, tx))
    batch, dropout_key = jnp.ones((8, 64)), jax.random.PRNGKey(5)
    state, reference = engine.put_replicated(fresh()), fresh()
    for k in range(3):
        state, metrics = step(state, engine.put_batch(batch), engine.put_replicated(dropout_key))
        reference, expected = plain(reference, batch, jax.random.fold_in(dropout_key, k))
        np.testing.assert_array_equal(np.asarray(metrics["mask"]), np.asarray(expected["mask"]))
    assert int(state.step) == 3


@pytest.mark.parametrize("kind", ENGINES)
def test_replicas_stay_identical(kind, play_text):
    task, _, _ = tiny_gpt_task(play_text, dropout=0.3, batch_size=16)
    tx = optax.adamw(1e-2)
    engine = make_engine(kind, 8, 16)
    state = engine.put_replicated(create_train_state(task.init_params(jax.random.PRNGKey(0)), tx))
    step = engine.compile_train_step(task.loss_fn, tx)
    for k in range(3):  # different dropout masks on every device, one update everywhere
        batch = engine.put_batch(task.train_batch(jax.random.PRNGKey(1), k, 0, 16))
        state, _ = step(state, batch, engine.put_replicated(jax.random.PRNGKey(k)))
    for leaf in jax.tree.leaves(state.params):
        shards = [np.asarray(s.data) for s in leaf.addressable_shards]
        assert len(shards) == 8
        for s in shards[1:]:
            np.testing.assert_array_equal(s, shards[0])


@pytest.mark.parametrize("first, second", [
    (dict(parallel="pmap", devices=8), dict(parallel="none", devices=1)),
    (dict(parallel="none", devices=1), dict(parallel="fsdp", devices=8)),  # state sharded
])
def test_checkpoints_move_between_device_counts(first, second, tmp_path, play_text):
    task, _, _ = tiny_gpt_task(play_text, dropout=0.0, batch_size=16)
    cfg = dict(batch_size=16, max_iters=8, eval_interval=4)
    full = fit(task, tiny_train_config(**cfg, **first), tmp_path / "full", progress=False)
    fit(task, tiny_train_config(**{**cfg, "max_iters": 4}, **first), tmp_path / "moved",
        progress=False)
    resumed = fit(task, tiny_train_config(**cfg, **second), tmp_path / "moved", resume=True,
                  progress=False)
    assert int(resumed.state.step) == 8
    assert resumed.engine.n_devices == second["devices"]
    for key in ("train_loss", "val_loss", "batch_loss"):
        assert resumed.history[-1][key] == pytest.approx(full.history[-1][key], abs=1e-5)
    chex.assert_trees_all_close(jax.device_get(resumed.state.params),
                                jax.device_get(full.state.params), atol=1e-5)


def test_batch_not_divisible_by_devices_is_refused_before_compiling():
    with pytest.raises(ValueError, match="global batch size 10 is not divisible by the 8 devices"):
        make_engine("pmap", 8, 10)
    with pytest.raises(ValueError, match="--devices 9 exceeds the 8 available"):
        make_engine("sharding", 9, 72)
    with pytest.raises(ValueError, match="--parallel none runs on one device"):
        make_engine("none", 2, 8)


def test_engine_summary_names_engine_devices_and_per_device_batch():
    assert "engine=sharding devices=4 (cpu) processes=1 global_batch=16 per_device_batch=4" in \
        make_engine("sharding", 4, 16).describe(16)


def test_batches_drawn_inside_the_step_equal_host_batches(play_text):
    # The GPT task draws its batches inside the compiled step (as fit runs it); drawn on
    # the host and passed in, the same batches and dropout keys give the same steps. Here
    # under pmap, where each device slices its share; the other engines' in-step runs are
    # compared with pmap's in test_checkpoints_move_between_device_counts.
    task, _, _ = tiny_gpt_task(play_text, dropout=0.1, batch_size=16)
    assert task.batches_in_step
    tx = optax.adamw(1e-2, weight_decay=0.01)
    engine = make_engine("pmap", 8, 16)
    inside = engine.compile_train_step(
        task.loss_fn, tx, batch_fn=lambda key, step: task.train_batch(key, step, 0, 16))
    host = engine.compile_train_step(task.loss_fn, tx)
    fresh = lambda: engine.put_replicated(  # noqa: E731 - two states: steps donate them
        create_train_state(task.init_params(jax.random.PRNGKey(0)), tx))
    state_in, state_host = fresh(), fresh()
    data_key = engine.put_replicated(jax.random.PRNGKey(1))
    dropout_key = engine.put_replicated(jax.random.PRNGKey(2))
    for step in range(3):
        state_in, m_in = inside(state_in, data_key, dropout_key)
        batch = engine.put_batch(task.train_batch(data_key, step, 0, 16))
        state_host, m_host = host(state_host, batch, dropout_key)  # folds in state.step
        assert float(m_in["loss"]) == pytest.approx(float(m_host["loss"]), abs=1e-6)
    assert int(state_in.step) == 3
    chex.assert_trees_all_close(jax.device_get(state_in.params),
                                jax.device_get(state_host.params), atol=1e-6)


@pytest.mark.parametrize("kind", ["sharding", "fsdp"])
def test_a_batch_drawn_inside_the_step_is_split_over_the_devices(kind):
    # Under jit over a mesh the batch drawn inside the step is constrained to P('data'):
    # each device computes on its share (fsdp shards the state as well, not instead).
    seen = []

    def loss_fn(params, batch, key, train):
        jax.debug.inspect_array_sharding(batch, callback=seen.append)
        return jnp.mean((batch @ params["w"]) ** 2), {}

    engine = make_engine(kind, 8, 16)
    tx = optax.sgd(0.1)
    step = engine.compile_train_step(
        loss_fn, tx, batch_fn=lambda key, i: jax.random.normal(jax.random.fold_in(key, i),
                                                               (16, 64)))
    state = create_train_state({"w": jnp.ones((64, 32))}, tx)
    state = jax.device_put(state, engine.state_sharding(state))
    key = engine.put_replicated(jax.random.PRNGKey(0))
    state, metrics = step(state, key, key)
    jax.block_until_ready(metrics)
    assert seen and all(s.spec[0] == "data" and len(s.device_set) == 8 for s in seen), seen
    w = state.params["w"].sharding
    assert w.is_fully_replicated == (kind == "sharding")  # (64, 32): fsdp splits the 64


@pytest.mark.parametrize("kind,n_devices", [("pmap", 8), ("sharding", 8), ("none", 1)])
def test_evaluation_in_one_program_equals_the_host_loop(kind, n_devices, play_text):
    # fit runs the GPT's estimate_loss as one program (Task.eval_batch); it must give what
    # the host loop over Task.eval_batches gives: the same batches and the same keys. The
    # loss here also reads its key, so that a wrong key would show.
    from genjax.train.loop import evaluate

    task, _, _ = tiny_gpt_task(play_text, batch_size=16, eval_iters=3)
    gpt_loss = task.loss_fn

    def loss_fn(params, batch, key, train):
        loss, metrics = gpt_loss(params, batch, key, train)
        noise = jax.random.uniform(key)
        return loss + noise, {**metrics, "noise": noise}

    task = dataclasses.replace(task, loss_fn=loss_fn)
    engine = make_engine(kind, n_devices, 16)
    params = engine.put_replicated(task.init_params(jax.random.PRNGKey(0)))
    key = engine.put_replicated(jax.random.PRNGKey(7))
    host = evaluate(task, engine, engine.compile_eval_step(task.loss_fn), params, key, 16)
    program = engine.compile_eval_program(
        task.loss_fn, lambda split, k: task.eval_batch(split, k, 0, 16), task.eval_splits,
        task.eval_iters)
    inside = {k: float(v) for k, v in jax.device_get(program(params, key)).items()}
    assert sorted(inside) == sorted(host) == ["train_loss", "train_noise", "val_loss",
                                              "val_noise"]
    for name in host:
        assert inside[name] == pytest.approx(host[name], abs=1e-6), name
    assert host["train_loss"] != pytest.approx(host["val_loss"], abs=1e-3)  # two splits
    with pytest.raises(ValueError, match="at least one batch"):
        engine.compile_eval_program(task.loss_fn, lambda split, k: None, ("val",), 0)


def test_scaling_benchmark_measures_the_fit_step():
    from experiments.benchmark_scaling import Args, measure

    rows = measure(Args(steps=2, repeats=1, batch_size=16, engines=("pmap", "none")), 8)
    assert [(r["engine"], r["devices"], r["per_device_batch"]) for r in rows] == [("pmap", 8, 2)]
    assert rows[0]["step_ms"] > 0 and rows[0]["tokens_per_s"] == pytest.approx(
        16 * 64 / (rows[0]["step_ms"] / 1e3))


def test_roofline_counts_the_step_flops():
    from experiments.benchmark_scaling import roofline

    r = roofline("cpu", 12)
    # The GPT cpu preset's matrix products, forward, per token: 2 x (4 blocks x 12 C^2 +
    # the lm_head's C x 65) and attention's 2 x 2 T C per block; backward twice that.
    C, T, tokens = 128, 64, 12 * 64
    forward = 2 * (4 * 12 * C * C + C * 65) + 4 * (2 * 2 * T * C)
    assert r["gflop"] == pytest.approx(3 * forward * tokens / 1e9, rel=0.05)
    assert r["matmul_gflops"] > 0
    assert r["floor_ms"] == pytest.approx(r["gflop"] / r["matmul_gflops"] * 1e3)
