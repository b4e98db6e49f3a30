"""The DCGAN (genjax/models/gan.py, genjax/tasks/gan.py, experiments/gan_mnist.py) and the
core's model state and grouped updates that it needs."""

import json
import math
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from genjax.data.mnist import ImageData
from genjax.models import gan
from genjax.tasks.gan import make_evaluation, make_task, make_updates
from genjax.train.checkpoint import load_latest
from genjax.train.loop import Task, fit
from genjax.train.steps import create_train_state, make_train_step
from helpers import tiny_train_config
from test_mnist_data import write_idx

SMALL = gan.GANConfig(latent_dim=8, g_features=(16, 8), d_features=(8, 16))


def fresh_state(config=SMALL, seed=0):
    variables = gan.init_variables(config, jax.random.PRNGKey(seed))
    txs = {player: optax.adam(2e-4, b1=0.5) for player in gan.PLAYERS}
    state = create_train_state(variables["params"], txs,
                               {"batch_stats": variables["batch_stats"]})
    return state, txs


def real_batch(n=8, seed=1, d_steps=1):
    x = jax.random.uniform(jax.random.PRNGKey(seed), (n, d_steps, 28, 28, 1), minval=-1.0)
    return x[:, 0] if d_steps == 1 else x


def identical(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def changed(a, b):
    return any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_shapes_and_bad_config():
    v = gan.init_variables(SMALL, jax.random.PRNGKey(0))
    z = jax.random.normal(jax.random.PRNGKey(1), (3, 8))
    images = gan.generate(SMALL, v, z)
    assert images.shape == (3, 28, 28, 1) and float(jnp.abs(images).max()) <= 1.0
    assert gan.discriminate(SMALL, v, images).shape == (3,)
    with pytest.raises(ValueError,
                       match=r"images must have shape \(B, 28, 28, 1\), got \(3, 28, 28\)"):
        gan.discriminate(SMALL, v, images[..., 0])
    with pytest.raises(ValueError, match="latent_dim must be a positive integer, got 0"):
        gan.GANConfig(latent_dim=0)
    with pytest.raises(ValueError, match="d_steps must be a positive integer, got 0"):
        gan.GANConfig(d_steps=0)
    with pytest.raises(ValueError, match="label_smoothing=0.1 applies to the bce loss only"):
        gan.GANConfig(loss="hinge", label_smoothing=0.1)
    # The DCGAN initialisation: weights N(0, 0.02), BatchNorm scales N(1, 0.02).
    kernel = np.asarray(v["params"]["generator"]["Dense_0"]["kernel"])
    assert abs(kernel.std() - 0.02) < 0.002 and abs(kernel.mean()) < 0.002
    scale = np.asarray(v["params"]["discriminator"]["BatchNorm_0"]["scale"])
    assert abs(scale.mean() - 1.0) < 0.02 and 0 < scale.std() < 0.05


def test_losses_when_every_logit_is_zero():
    zeros = jnp.zeros((16,))
    assert float(gan.discriminator_loss(zeros, zeros)) == pytest.approx(2 * math.log(2), abs=1e-6)
    assert float(gan.generator_loss(zeros)) == pytest.approx(math.log(2), abs=1e-6)
    assert float(gan.discriminator_loss(zeros, zeros, "hinge")) == pytest.approx(2.0)
    assert float(gan.generator_loss(zeros, "hinge")) == 0.0
    # BCE(l, t) = softplus(l) - t l is ln 2 at l = 0 whatever the target; one-sided
    # smoothing moves the real target to 1 - s: softplus(3) - 0.9 * 3 at logit 3.
    assert float(gan.discriminator_loss(zeros, zeros, "bce", 0.1)) == pytest.approx(2 * math.log(2))
    smoothed = gan.discriminator_loss(jnp.full(4, 3.0), jnp.zeros(4), "bce", 0.1)
    assert float(smoothed) == pytest.approx(math.log1p(math.exp(3.0)) - 0.9 * 3.0 + math.log(2),
                                            abs=1e-6)
    # The same through the players: with D's last layer zeroed every logit is 0.
    state, _ = fresh_state()
    variables = jax.tree.map(lambda x: x, state.variables)
    dense = variables["params"]["discriminator"]["Dense_0"]
    dense["kernel"], dense["bias"] = jnp.zeros_like(dense["kernel"]), jnp.zeros_like(dense["bias"])
    z = jax.random.normal(jax.random.PRNGKey(2), (8, 8))
    d_loss, _ = gan.discriminator_update_loss(SMALL, variables, real_batch(), z)
    g_loss, _ = gan.generator_update_loss(SMALL, variables, z)
    assert float(d_loss) == pytest.approx(1.3863, abs=1e-4)
    assert float(g_loss) == pytest.approx(0.6931, abs=1e-4)


def one_update(which: int, kind: str, config=SMALL):
    """One train step made of the discriminator's (0) or the generator's (1) update alone,
    on one device or pmapped over 6 (where the state is averaged across devices: a mean
    of 6 equal float32 values is not always that value)."""
    from genjax.train.parallel import make_engine

    state, txs = fresh_state(config)
    warm_up = jax.jit(make_train_step(make_updates(config), txs))
    for i in range(2):  # running statistics other than the init's exact 0 and 1
        state, _ = warm_up(state, real_batch(12, seed=10 + i, d_steps=config.d_steps),
                           jax.random.PRNGKey(i))
    old = jax.device_get(state)
    engine = make_engine(kind, 1 if kind == "none" else 6, 12)
    step = engine.compile_train_step((make_updates(config)[which],), txs)
    new, metrics = step(engine.put_replicated(state),
                        engine.put_batch(real_batch(12, d_steps=config.d_steps)),
                        engine.put_replicated(jax.random.PRNGKey(3)))
    return old, jax.device_get(new), metrics


@pytest.mark.parametrize("kind", ["none", "pmap"])
def test_discriminator_update_leaves_the_generator_bit_identical(kind):
    old, new, metrics = one_update(0, kind)
    identical(new.params["generator"], old.params["generator"])
    identical(new.opt_state["generator"], old.opt_state["generator"])
    identical(new.model_state["batch_stats"]["generator"], old.model_state["batch_stats"]["generator"])
    assert changed(new.params["discriminator"], old.params["discriminator"])
    assert changed(new.model_state["batch_stats"]["discriminator"],
                   old.model_state["batch_stats"]["discriminator"])
    assert {"d_loss", "d_x", "d_g_z", "d_grad_norm"} <= set(metrics)


@pytest.mark.parametrize("kind", ["none", "pmap"])
def test_generator_update_leaves_the_discriminator_bit_identical(kind):
    old, new, metrics = one_update(1, kind)
    identical(new.params["discriminator"], old.params["discriminator"])
    identical(new.opt_state["discriminator"], old.opt_state["discriminator"])
    identical(new.model_state["batch_stats"]["discriminator"],
              old.model_state["batch_stats"]["discriminator"])
    assert changed(new.params["generator"], old.params["generator"])
    assert changed(new.model_state["batch_stats"]["generator"],
                   old.model_state["batch_stats"]["generator"])
    assert set(metrics) == {"g_loss", "g_grad_norm"}


def test_generator_gradient_flows_through_the_discriminator():
    state, _ = fresh_state()
    z = jax.random.normal(jax.random.PRNGKey(4), (8, 8))

    def g_grads(variables):
        def loss(g_params):
            v = {**variables, "params": {**variables["params"], "generator": g_params}}
            return gan.generator_update_loss(SMALL, v, z)[0]
        return jax.grad(loss)(variables["params"]["generator"])

    grads = g_grads(state.variables)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert float(jnp.abs(g).max()) > 0, path  # every generator parameter gets a gradient
    # G's loss reaches G only through D's logits: with D's last layer zeroed, D(G(z)) is
    # constant and G's gradient is exactly zero.
    variables = jax.tree.map(lambda x: x, state.variables)
    dense = variables["params"]["discriminator"]["Dense_0"]
    dense["kernel"] = jnp.zeros_like(dense["kernel"])
    for g in jax.tree.leaves(g_grads(variables)):
        assert float(jnp.abs(g).max()) == 0.0


def test_samples_use_the_running_statistics():
    state, txs = fresh_state()
    step = jax.jit(make_train_step(make_updates(SMALL), txs))
    for i in range(3):  # running statistics that differ from the init's 0 / 1
        state, _ = step(state, real_batch(seed=i), jax.random.PRNGKey(i))
    z = jax.random.normal(jax.random.PRNGKey(5), (16, 8))
    v = state.variables
    # Evaluation mode: each image depends on its own z only.
    np.testing.assert_allclose(gan.generate(SMALL, v, z[:4]), gan.generate(SMALL, v, z)[:4],
                               atol=1e-6)
    train_mode = gan.generate(SMALL, v, z[:4], train=True)[0]
    assert not np.allclose(train_mode, gan.generate(SMALL, v, z, train=True)[0][:4], atol=1e-4)


def test_d_steps_discriminator_updates_per_generator_update():
    config = gan.GANConfig(latent_dim=8, g_features=(16, 8), d_features=(8, 16), d_steps=2)
    state, txs = fresh_state(config)
    step = jax.jit(make_train_step(make_updates(config), txs))
    state, metrics = step(state, real_batch(d_steps=2), jax.random.PRNGKey(0))
    assert int(state.step) == 1
    # Adam counts its updates: two for D, one for G.
    assert int(state.opt_state["discriminator"][0].count) == 2
    assert int(state.opt_state["generator"][0].count) == 1
    assert {"d_loss", "g_loss"} <= set(metrics)


def _fit(run_dir, steps, parallel, devices, resume=False):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (80, 28, 28, 1)).astype(np.float32)
    data = ImageData(images[:64], np.zeros(64, np.int32), images[64:], np.zeros(16, np.int32))
    task = make_task(SMALL, data, 16, run_dir)
    cfg = tiny_train_config(batch_size=16, max_iters=steps, eval_interval=2,
                            learning_rate=2e-4, beta1=0.5, weight_decay=0.0,
                            parallel=parallel, devices=devices)
    return fit(task, cfg, run_dir, resume=resume, progress=False)


def test_resume_and_eight_devices_equal_an_uninterrupted_run_on_one(tmp_path):
    full = _fit(tmp_path / "full", 4, "pmap", 8)
    _fit(tmp_path / "split", 2, "pmap", 8)
    resumed = _fit(tmp_path / "split", 4, "pmap", 8, resume=True)
    # Resumed from the checkpoint at step 2: the same steps, BatchNorm statistics and all.
    assert [r["step"] for r in resumed.history] == [4]
    for key in ("test_d_loss", "test_g_loss", "test_d_accuracy", "batch_d_loss", "batch_g_loss"):
        assert resumed.history[-1][key] == full.history[-1][key], key
    identical(jax.device_get(resumed.state.params), jax.device_get(full.state.params))
    identical(jax.device_get(resumed.state.model_state), jax.device_get(full.state.model_state))
    identical(jax.device_get(resumed.state.opt_state), jax.device_get(full.state.opt_state))
    # 8 devices (synchronised BatchNorm, z drawn for the global batch) equal 1 device.
    one = _fit(tmp_path / "one", 4, "none", 1)
    for a, b in zip(one.history, full.history):
        for key in ("test_d_loss", "test_g_loss", "test_d_x", "test_d_g_z"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    chex.assert_trees_all_close(jax.device_get(full.state.params),
                                jax.device_get(one.state.params), atol=1e-5)
    chex.assert_trees_all_close(jax.device_get(full.state.model_state),
                                jax.device_get(one.state.model_state), atol=1e-5)


def test_sharding_engine_step_equals_one_device():
    # Under jit over a mesh the batch is global: BatchNorm's statistics and z are those
    # of one device. fsdp also shards the two players' parameters, optimizer states and
    # BatchNorm statistics over the devices.
    from genjax.train.parallel import make_engine, state_bytes_per_device

    results = []
    for kind, n in (("none", 1), ("sharding", 8), ("fsdp", 8)):
        engine = make_engine(kind, n, 16)
        state, txs = fresh_state()
        step = engine.compile_train_step(make_updates(SMALL), txs)
        state = jax.device_put(state, engine.state_sharding(state))
        for i in range(2):
            state, metrics = step(state, engine.put_batch(real_batch(16, seed=i)),
                                  engine.put_replicated(jax.random.PRNGKey(i)))
        results.append(jax.device_get((state.params, state.model_state, metrics)))
        if kind == "sharding":
            replicated = state_bytes_per_device(state)
        if kind == "fsdp":
            assert state_bytes_per_device(state) < replicated / 2
    chex.assert_trees_all_close(results[1], results[0], atol=1e-5)
    chex.assert_trees_all_close(results[2], results[0], atol=1e-5)


def test_task_needs_a_loss_or_updates_and_an_evaluation():
    common = dict(name="t", init_params=lambda k: {}, train_batch=None, eval_batches=None,
                  eval_splits=("test",), meta={})
    with pytest.raises(ValueError, match="give either loss_fn, or updates and evaluation"):
        Task(**common)
    with pytest.raises(ValueError, match="give either loss_fn, or updates and evaluation"):
        Task(**common, evaluation=make_evaluation(SMALL))  # an evaluation trains nothing
    with pytest.raises(ValueError, match="give either loss_fn, or updates and evaluation"):
        Task(**common, loss_fn=lambda *a: None, updates=make_updates(SMALL))
    with pytest.raises(ValueError, match="give either loss_fn, or updates and evaluation"):
        Task(**common, updates=make_updates(SMALL))  # no evaluation
    with pytest.raises(ValueError, match="a model state needs updates"):
        Task(**common, loss_fn=lambda *a: None, init_model_state=lambda k: {})


def test_updates_with_the_same_metric_names_are_refused():
    from genjax.train.steps import Update

    def loss(variables, batch, key, axis_name):
        return jnp.sum(variables["a"] ** 2) + jnp.sum(variables["b"]), ({"norm": 0.0}, None)

    txs = {"a": optax.sgd(0.1), "b": optax.sgd(0.1)}
    state = create_train_state({"a": jnp.ones(2), "b": jnp.ones(2)}, txs)
    step = make_train_step((Update(loss, "a", "x"), Update(loss, "b", "y")), txs)
    with pytest.raises(ValueError, match=r"updates report the same metric names \['norm'\]"):
        step(state, jnp.zeros(1), jax.random.PRNGKey(0))
    # One update alone (not in a sequence) is a train step too.
    new, metrics = make_train_step(Update(lambda v, b, k, a: (jnp.sum(v["a"] ** 2), ({}, None)),
                                          "a", "x"), txs)(state, jnp.zeros(1), jax.random.PRNGKey(0))
    np.testing.assert_allclose(new.params["a"], 0.8)  # 1 - 0.1 * 2
    identical(new.params["b"], state.params["b"])
    assert set(metrics) == {"x_loss", "x_grad_norm"}


def test_gan_experiment_end_to_end(digits_dir, digits_classifier, tmp_path, capsys):
    from experiments import gan_mnist

    run = tmp_path / "run"
    flags = ["--data-dir", str(digits_dir), "--run-dir", str(run), "--max-iters", "4",
             "--eval-interval", "2", "--batch-size", "16", "--latent-dim", "16",
             "--classifier", str(digits_classifier)]
    gan_mnist.main(flags)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    for r in records:
        assert {"test_d_loss", "test_g_loss", "test_d_x", "test_d_g_z", "test_d_accuracy",
                "frechet_distance", "inception_score", "classes_covered",
                "class_entropy"} <= set(r)
        assert 1.0 <= r["inception_score"] <= 10.0 and 1 <= r["classes_covered"] <= 10
    assert records[0]["test_g_loss"] == pytest.approx(math.log(2), abs=0.05)  # D starts near 0
    assert {"batch_d_loss", "batch_g_loss", "images_per_s"} <= set(records[-1])
    for name in ("samples-0.png", "samples-4.png", "real-vs-generated.png", "loss.png"):
        assert (run / name).stat().st_size > 1000, name
    assert "Frechet distance" in capsys.readouterr().out
    step, state, meta = load_latest(run)
    assert step == 4 and meta["family"] == "gan"
    assert set(state["train"]["model_state"]["batch_stats"]) == {"generator", "discriminator"}
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["latent_dim"] == 16 and config["classifier"] == str(digits_classifier)
    # --resume continues with the run's config (latent_dim 16, batch 16, the classifier it
    # used, its metrics setting); the loss options may change, the architecture may not.
    gan_mnist.main(["--run-dir", str(run), "--resume", "--max-iters", "6",
                    "--label-smoothing", "0.1"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4, 6] and "frechet_distance" in records[-1]
    resumed = json.loads((run / "config.resume-4.json").read_text())
    assert resumed["model"] == {**config["model"], "label_smoothing": 0.1}
    assert resumed["classifier"] == str(digits_classifier) and resumed["metrics"] == "on"
    with pytest.raises(SystemExit, match="model config differs .*--latent-dim: checkpoint 16 vs "
                                         "requested 8"):
        gan_mnist.main(["--run-dir", str(run), "--resume", "--max-iters", "8",
                        "--latent-dim", "8"])


def test_gan_bad_input_is_one_line_and_writes_nothing(digits_dir, digits_classifier, tmp_path):
    from experiments import gan_mnist

    run = tmp_path / "run"
    base = ["--data-dir", str(digits_dir), "--run-dir", str(run), "--max-iters", "2",
            "--batch-size", "16"]
    with pytest.raises(SystemExit, match="--latent-dim must be a positive integer, got 0"):
        gan_mnist.main(base + ["--latent-dim", "0", "--classifier", str(digits_classifier)])
    with pytest.raises(SystemExit, match="--eval-iters: this experiment evaluates every "
                                         "held-out image"):
        gan_mnist.main(base + ["--eval-iters", "3"])
    with pytest.raises(SystemExit, match="--batch-size 32: an evaluation batch takes 32 "
                                         "held-out images, but there are 20"):
        gan_mnist.main(base[:-1] + ["32", "--metrics", "off"])
    # A resume of nothing says so before any data is read (this data folder does not exist).
    with pytest.raises(SystemExit, match="--resume: no checkpoint in"):
        gan_mnist.main(["--data-dir", str(tmp_path / "no-data"), "--run-dir", str(run),
                        "--resume"])
    with pytest.raises(SystemExit, match="no trained MNIST classifier: .*nowhere is not a directory; "
                                         "train one with `python -m experiments.mnist_classifier"):
        gan_mnist.main(base + ["--classifier", str(tmp_path / "nowhere")])
    corrupt = tmp_path / "corrupt"
    shutil.copytree(digits_classifier, corrupt)
    (corrupt / "classifier.json").write_text('{"accuracy": ')
    with pytest.raises(SystemExit, match="classifier.json is not a classifier record"):
        gan_mnist.main(base + ["--classifier", str(corrupt)])
    record = json.loads((digits_classifier / "classifier.json").read_text())
    (corrupt / "classifier.json").write_text(json.dumps({**record, "accuracy": 0.31}))
    with pytest.raises(SystemExit, match="held-out accuracy 31.00%, below the 90%"):
        gan_mnist.main(base + ["--classifier", str(corrupt)])
    (corrupt / "classifier.json").write_text(json.dumps(record))
    shutil.rmtree(corrupt / "checkpoints")
    with pytest.raises(SystemExit, match="has no readable checkpoint .*; move .*corrupt away "
                                         "\\(or delete it\\), then train the classifier again"):
        gan_mnist.main(base + ["--classifier", str(corrupt)])
    wrong = tmp_path / "wrong" / "mnist"
    wrong.mkdir(parents=True)
    write_idx(wrong / "t10k-images-idx3-ubyte.gz", np.zeros((40, 32, 32)))
    write_idx(wrong / "t10k-labels-idx1-ubyte.gz", np.arange(40) % 10)
    with pytest.raises(SystemExit, match=r"images of shape \(32, 32\), expected \(28, 28\)"):
        gan_mnist.main(["--data-dir", str(wrong.parent), "--run-dir", str(run),
                        "--metrics", "off"])
    assert not run.exists()  # nothing was written
