import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from genjax.data.mnist import ImageData, image_batch_fns, load_mnist
from genjax.models import autoencoder as ae
from genjax.models import vae
from genjax.train.loop import Task, fit
from helpers import tiny_train_config
from test_mnist_data import fake_mnist

SMALL_AE = ae.AEConfig(latent_dim=8, features=(8, 16))
SMALL_VAE = vae.VAEConfig(latent_dim=4, features=(8, 16))


def blobs(n=32, seed=0):
    """Images of one bright square each, at random places: easy to learn."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 28, 28, 1), np.float32)
    for i in range(n):
        r, c = rng.integers(0, 20, 2)
        x[i, r:r + 8, c:c + 8] = 1.0
    return x, np.zeros(n, np.int32)


def train_steps(model, loss_fn, batch, steps=60, lr=3e-3):
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch[0][:1],
                                 *([jax.random.PRNGKey(1)] if isinstance(model, vae.VAE) else []))
    params = params["params"]
    tx = optax.adam(lr)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, key):
        (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key, True)
        updates, opt = tx.update(g, opt)
        return optax.apply_updates(params, updates), opt, loss

    losses = []
    for i in range(steps):
        params, opt, loss = step(params, opt, jax.random.PRNGKey(i))
        losses.append(float(loss))
    return params, losses


def test_autoencoder_shapes_and_bad_input():
    model = ae.AutoEncoder(SMALL_AE)
    x = jnp.zeros((3, 28, 28, 1))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    assert jax.jit(model.apply)(params, x).shape == (3, 28, 28, 1)
    z = jax.jit(lambda p, x: model.apply(p, x, method=ae.AutoEncoder.encode))(params, x)
    assert z.shape == (3, 8)
    with pytest.raises(ValueError, match="images must have shape \\(B, 28, 28, 1\\), got \\(3, 28, 28\\)"):
        jax.jit(model.apply)(params, jnp.zeros((3, 28, 28)))
    with pytest.raises(ValueError, match="latent_dim must be a positive integer, got 0"):
        ae.AEConfig(latent_dim=0)
    with pytest.raises(ValueError, match="latent_dim must be a positive integer, got -2"):
        vae.VAEConfig(latent_dim=-2)


def test_autoencoder_loss_falls():
    model = ae.AutoEncoder(SMALL_AE)
    _, losses = train_steps(model, ae.make_loss_fn(model), blobs(), steps=80)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_vae_loss_falls():
    model = vae.VAE(SMALL_VAE)
    _, losses = train_steps(model, vae.make_loss_fn(model), blobs(), steps=50)
    assert losses[-1] < 0.7 * losses[0], (losses[0], losses[-1])


def test_kl_matches_monte_carlo():
    mean = jnp.array([[0.5, -1.0, 2.0]])
    logvar = jnp.array([[0.3, -0.7, 1.2]])
    z = vae.reparameterize(jax.random.PRNGKey(0), jnp.repeat(mean, 200_000, 0),
                           jnp.repeat(logvar, 200_000, 0))
    log_q = -0.5 * jnp.sum((z - mean) ** 2 / jnp.exp(logvar) + logvar + jnp.log(2 * jnp.pi), -1)
    log_p = -0.5 * jnp.sum(z ** 2 + jnp.log(2 * jnp.pi), -1)
    mc = float(jnp.mean(log_q - log_p))
    closed = float(vae.kl_standard_normal(mean, logvar)[0])
    assert closed == pytest.approx(mc, rel=0.02)
    assert float(vae.kl_standard_normal(jnp.zeros((1, 4)), jnp.zeros((1, 4)))[0]) == 0.0


def test_reparameterised_samples_have_the_right_moments():
    mean, logvar = jnp.full((100_000, 2), 1.5), jnp.log(jnp.full((100_000, 2), 0.25))
    z = vae.reparameterize(jax.random.PRNGKey(3), mean, logvar)
    np.testing.assert_allclose(z.mean(0), 1.5, atol=0.01)
    np.testing.assert_allclose(z.var(0), 0.25, rtol=0.02)


@pytest.mark.parametrize("big", [50.0, -50.0])
def test_extreme_logvar_stays_finite(big):
    mean = jnp.zeros((2, 3))
    logvar = jnp.full((2, 3), big)
    assert np.isfinite(np.asarray(vae.kl_standard_normal(mean, logvar))).all()
    grad = jax.grad(lambda lv: vae.kl_standard_normal(mean, lv).sum()
                    + vae.reparameterize(jax.random.PRNGKey(0), mean, lv).sum())(logvar)
    assert np.isfinite(np.asarray(grad)).all()


def test_iwae_bound_is_at_least_the_elbo():
    model = vae.VAE(SMALL_VAE)
    x, _ = blobs(16)
    params, _ = train_steps(model, vae.make_loss_fn(model), (x, None), steps=30)
    loss_fn = vae.make_loss_fn(model)
    neg_elbo = np.mean([float(loss_fn(params, (x, None), jax.random.PRNGKey(100 + i), False)[1]
                              ["neg_elbo"]) for i in range(50)])
    nll = float(jax.jit(lambda p, x, k: vae.iwae_nll(model, p, x, k, 100))(
        params, x, jax.random.PRNGKey(7)).mean())
    assert nll <= neg_elbo, (nll, neg_elbo)  # log p(x) >= IWAE bound >= ELBO


def test_roc_auc_against_counting():
    assert ae.roc_auc([1, 2, 3], [2.5, 4]) == pytest.approx(5 / 6)
    assert ae.roc_auc([1, 2], [2, 3]) == pytest.approx(0.875)  # a tie counts half
    assert ae.roc_auc([5, 6], [1, 2]) == 0.0


def _fit_ae(data, run_dir, steps, resume=False):
    model = ae.AutoEncoder(SMALL_AE)
    train_batch, eval_batches = image_batch_fns(data, 32)
    task = Task(name="ae", init_params=lambda k: model.init(k, jnp.zeros((1, 28, 28, 1)))["params"],
                loss_fn=ae.make_loss_fn(model), train_batch=train_batch,
                eval_batches=eval_batches, eval_splits=("test",),
                meta={"model": dataclasses.asdict(SMALL_AE)},  # its tuple is saved as a list
                item_name="images")
    cfg = tiny_train_config(batch_size=32, max_iters=steps, eval_interval=max(steps // 2, 1),
                            learning_rate=3e-3)
    return model, fit(task, cfg, run_dir, resume=resume, progress=False)


def test_autoencoder_resume_equals_uninterrupted(tmp_path):
    x, y = blobs(96)
    data = ImageData(x[:64], y[:64], x[64:], y[64:])
    _, full = _fit_ae(data, tmp_path / "full", 6)
    _fit_ae(data, tmp_path / "split", 3)
    _, resumed = _fit_ae(data, tmp_path / "split", 6, resume=True)
    for a, b in zip(jax.tree.leaves(full.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed.history[-1]["test_loss"] == full.history[-1]["test_loss"]


def test_anomaly_score_ranks_the_unseen_digit_higher(mnist_dir, tmp_path):
    data = load_mnist(mnist_dir, log=lambda s: None)
    data = ImageData(data.train_images[:3000], data.train_labels[:3000],
                     data.test_images, data.test_labels)
    digit = 7

    def auroc(train_data, name):
        model, result = _fit_ae(train_data, tmp_path / name, 200)
        params = result.engine.to_single_device(result.state.params)
        logits = jax.jit(model.apply)({"params": params}, data.test_images)
        err = np.asarray(ae.reconstruction_error(logits, data.test_images))
        is_d = data.test_labels == digit
        return ae.roc_auc(err[~is_d], err[is_d])

    unseen = auroc(data.without_digit(digit), "without")
    seen = auroc(data, "with")
    assert unseen > 0.5 and unseen > seen + 0.05, (unseen, seen)


@pytest.mark.parametrize("experiment", ["autoencoder_mnist", "vae_mnist"])
def test_image_experiments_end_to_end(experiment, tmp_path):
    import importlib

    exp = importlib.import_module(f"experiments.{experiment}")
    folder = fake_mnist(tmp_path / "data" / "mnist", n_test=200)
    run = tmp_path / "run"
    flags = ["--data-dir", str(tmp_path / "data"), "--run-dir", str(run), "--max-iters", "4",
             "--eval-interval", "2", "--batch-size", "16", "--warmup-iters", "1", "--latent-dim", "2"]
    extra = ["--anomaly-digit", "3"] if experiment == "autoencoder_mnist" else ["--iwae-k", "5"]
    exp.main(flags + extra)
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    if experiment == "autoencoder_mnist":
        assert {"test_mse", "test_psnr_db", "anomaly_auroc", "elapsed_s"} <= set(records[-1])
        assert "psnr_db" not in records[-1]  # one PSNR figure, over every held-out image
        for name in ("reconstructions-4.png", "latent-scatter.png", "roc.png", "loss.png"):
            assert (run / name).stat().st_size > 1000, name
    else:
        assert {"recon_nats", "kl_nats", "neg_elbo", "iwae_nll", "elapsed_s"} <= set(records[-1])
        assert "iwae_nll" not in records[1]  # intermediate evaluations skip the costly bound
        assert records[-1]["iwae_nll"] <= records[-1]["neg_elbo"] + 5.0
        for name in ("samples-4.png", "interpolation.png", "manifold.png", "loss.png"):
            assert (run / name).stat().st_size > 1000, name
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        exp.main(flags + extra)
    if experiment == "autoencoder_mnist":
        # --resume alone continues with the run's saved config: latent_dim 2, batch 16, eval
        # every 2 steps, the held-out digit and the data folder, not the preset's or none.
        # (The VAE resolves its flags with the same genjax.train.cli.resolve_configs.)
        exp.main(["--run-dir", str(run), "--resume", "--max-iters", "6"])
        records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [0, 2, 4, 6]
        config = json.loads((run / "config.json").read_text())
        resumed = json.loads((run / "config.resume-4.json").read_text())
        assert resumed["model"] == config["model"] and resumed["model"]["latent_dim"] == 2
        assert resumed["train"] == {**config["train"], "max_iters": 6, "lr_decay_iters": 6}
        assert resumed["anomaly_digit"] == config["anomaly_digit"] == 3
        assert resumed["data_dir"] == config["data_dir"] == str(tmp_path / "data")
        # the same run on other data (the full 60,000/10,000 split, not the test set's own
        # 9,000/1,000): refused, its held-out images would include ones it trained on
        fake_mnist(tmp_path / "full" / "mnist", n_test=30, n_train=40)
        with pytest.raises(SystemExit, match="the checkpoint's split differs from this run's "
                                             "\\(checkpoint 'mnist-test-split' vs this run "
                                             "'mnist'\\)"):
            exp.main(["--run-dir", str(run), "--resume", "--max-iters", "8", "--data-dir",
                      str(tmp_path / "full"), "--batch-size", "8"])
    with pytest.raises(SystemExit, match="--latent-dim must be a positive integer"):
        exp.main(flags[:-2] + ["--latent-dim", "0", "--run-dir", str(tmp_path / "r2")])
    # another experiment's commands on this run: one line naming the one that wrote it
    from experiments import gan_mnist, gpt_shakespeare

    wrote = f"holds a run of experiments.{experiment}, not of experiments."
    with pytest.raises(SystemExit, match=wrote + "gpt_shakespeare: use python -m experiments."):
        gpt_shakespeare.main(["sample", "--run-dir", str(run)])
    with pytest.raises(SystemExit, match=wrote + "gan_mnist"):
        gan_mnist.main(["--run-dir", str(run), "--resume"])
    del folder


def test_image_grid_is_one_mosaic_of_the_images_row_major(tmp_path):
    """The experiments' image grids: images tiled row by row, ``gap`` white pixels between
    them and in a short last row's empty cells, values clipped to [0, 1]; saved as a PNG of
    that mosaic."""
    from genjax import viz

    images = np.stack([np.full((2, 3, 1), v, np.float32) for v in (0.25, 0.5, 0.75)])
    images[2, 0, 0, 0] = 7.0  # clipped to 1
    mosaic = viz.image_mosaic(images, ncols=2, gap=1)
    assert mosaic.shape == (2 * 2 + 1, 2 * 3 + 1)
    np.testing.assert_array_equal(mosaic[:2, :3], 0.25)
    np.testing.assert_array_equal(mosaic[:2, 4:], 0.5)
    np.testing.assert_array_equal(mosaic[3:, :3], [[1.0, 0.75, 0.75], [0.75, 0.75, 0.75]])
    np.testing.assert_array_equal(mosaic[3:, 4:], 1.0)  # the empty cell
    np.testing.assert_array_equal(mosaic[2], 1.0)        # the gap between rows
    np.testing.assert_array_equal(mosaic[:, 3], 1.0)     # and between columns
    assert viz.image_mosaic(images, ncols=5, gap=0).shape == (2, 9)  # one row of three
    with pytest.raises(ValueError, match=r"got shape \(3, 6\)"):
        viz.image_mosaic(images.reshape(3, 6), ncols=2)
    with pytest.raises(ValueError, match="ncols=0"):
        viz.image_mosaic(images, ncols=0)
    from matplotlib.image import imread

    png = imread(viz.save_image_grid(tmp_path / "grid.png", blobs(6)[0], 3, "title"))
    assert png.shape[0] > 100 and png.shape[1] > 150  # 2 x 3 cells of 0.8 in at 80 dpi
