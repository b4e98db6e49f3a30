"""The PyTorch twins (experiments/torch_twins) compute what genjax computes: with the same
weights and inputs the outputs agree to 1e-5 (float32, dropout off), and one optimizer step
from the same state gives the same loss and parameters to 1e-4. Skipped without torch
(the optional ``torch`` extra)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from experiments.torch_twins import gpt as tgpt  # noqa: E402
from experiments.torch_twins import images as timg  # noqa: E402
from experiments.torch_twins.common import make_optimizer  # noqa: E402
from genjax.models import autoencoder as ae  # noqa: E402
from genjax.models import gan  # noqa: E402
from genjax.models import vae as vm  # noqa: E402
from genjax.models.gpt import GPT, GPTConfig, cross_entropy_loss, make_loss_fn  # noqa: E402
from genjax.tasks.gan import make_updates  # noqa: E402
from genjax.train.config import TrainConfig  # noqa: E402
from genjax.train.optim import make_optimizer as genjax_optimizer  # noqa: E402
from genjax.train.steps import create_train_state, make_train_step  # noqa: E402

ADAMW = TrainConfig(learning_rate=1e-3, lr_schedule="constant", weight_decay=0.01,
                    weight_decay_on="all", beta1=0.9, beta2=0.999, eps=1e-8)


def tensor(x):
    return torch.from_numpy(np.array(x, dtype=np.float32))


def nchw(x):
    return tensor(np.asarray(x).transpose(0, 3, 1, 2))


def close(a, b, tol):
    np.testing.assert_allclose(np.asarray(a), b.detach().numpy() if hasattr(b, "detach") else b,
                               rtol=tol, atol=tol)


def assert_same_state(twin, reference_twin, tol=1e-4):
    """Two twins hold the same parameters and buffers."""
    ours, theirs = twin.state_dict(), reference_twin.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        close(ours[name].numpy(), theirs[name], tol)


def torch_step(model, train, loss):
    opt = make_optimizer(model, train)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


@pytest.mark.parametrize("twin", [tgpt.LectureGPT, tgpt.FastGPT])
def test_gpt_twins(twin):
    assert sum(p.numel() for p in twin(GPTConfig(vocab_size=65)).parameters()) == 10_788_929
    cfg = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    model = GPT(cfg)
    params = model.init_params(jax.random.PRNGKey(0))
    idx = jax.random.randint(jax.random.PRNGKey(1), (3, 16), 0, 65)
    targets = jnp.roll(idx, -1, axis=1)
    t = tgpt.load_genjax(twin(cfg), params)
    logits, loss = t(torch.from_numpy(np.array(idx)).long(),  # (copies: JAX's are read-only)
                     torch.from_numpy(np.array(targets)).long())
    close(model.apply({"params": params}, idx), logits, 1e-5)
    assert float(cross_entropy_loss(model.apply({"params": params}, idx), targets)) == \
        pytest.approx(loss.item(), abs=1e-5)
    # One AdamW step from the same state.
    tx, _ = genjax_optimizer(ADAMW)
    state, metrics = jax.jit(make_train_step(make_loss_fn(model), tx))(
        create_train_state(params, tx), (idx, targets), jax.random.PRNGKey(2))
    assert torch_step(t, ADAMW, loss) == pytest.approx(float(metrics["loss"]), abs=1e-4)
    assert_same_state(t, tgpt.load_genjax(twin(cfg), state.params))


def test_autoencoder_twin():
    cfg = ae.AEConfig(latent_dim=8, features=(8, 16))
    model = ae.AutoEncoder(cfg)
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 28, 28, 1))
    params = model.init(jax.random.PRNGKey(1), x)["params"]
    t = timg.load_autoencoder(timg.AutoEncoder(cfg), params)
    close(np.asarray(model.apply({"params": params}, x)).transpose(0, 3, 1, 2), t(nchw(x)), 1e-5)
    tx, _ = genjax_optimizer(ADAMW)
    state, metrics = jax.jit(make_train_step(ae.make_loss_fn(model), tx))(
        create_train_state(params, tx), (x, None), jax.random.PRNGKey(2))
    assert torch_step(t, ADAMW, t.loss(nchw(x))) == pytest.approx(float(metrics["loss"]),
                                                                  rel=1e-5)
    assert_same_state(t, timg.load_autoencoder(timg.AutoEncoder(cfg), state.params))


def test_vae_twin():
    cfg = vm.VAEConfig(latent_dim=4, features=(8, 16), beta=0.5)
    model = vm.VAE(cfg)
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 28, 28, 1))
    params = model.init(jax.random.PRNGKey(1), x, jax.random.PRNGKey(0))["params"]
    key = jax.random.PRNGKey(2)
    eps = tensor(jax.random.normal(key, (4, 4)))  # the noise genjax draws with this key
    t = timg.load_autoencoder(timg.VAE(cfg), params)
    loss_fn = vm.make_loss_fn(model)
    assert float(loss_fn(params, (x, None), key, True)[0]) == pytest.approx(
        t.loss(nchw(x), eps).item(), rel=1e-6)
    tx, _ = genjax_optimizer(ADAMW)
    state, metrics = jax.jit(make_train_step(loss_fn, tx))(create_train_state(params, tx),
                                                           (x, None), key)
    assert torch_step(t, ADAMW, t.loss(nchw(x), eps)) == pytest.approx(float(metrics["loss"]),
                                                                       rel=1e-5)
    assert_same_state(t, timg.load_autoencoder(timg.VAE(cfg), state.params))


def test_dcgan_twin_in_both_batchnorm_modes_and_one_step():
    cfg = gan.GANConfig(latent_dim=8, g_features=(16, 8), d_features=(8, 16))
    variables = gan.init_variables(cfg, jax.random.PRNGKey(0))
    # Running statistics other than 0 and 1, so that evaluation mode is tested too.
    variables = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.1 * jax.random.uniform(jax.random.PRNGKey(len(path)), v.shape)
        if "batch_stats" in str(path[0]) else v, variables)
    G, D = timg.load_gan(timg.Generator(cfg), timg.Discriminator(cfg), variables)
    z = jax.random.normal(jax.random.PRNGKey(1), (8, 8))
    real = jax.random.uniform(jax.random.PRNGKey(2), (8, 28, 28, 1), minval=-1.0)
    for train in (False, True):
        G.train(train)
        D.train(train)
        ours = gan.generate(cfg, variables, z, train=train)
        ours = ours[0] if train else ours
        close(np.asarray(ours).transpose(0, 3, 1, 2), G(tensor(z)), 1e-5)
        logits = gan.discriminate(cfg, variables, real, train=train)
        close(logits[0] if train else logits, D(nchw(real)), 1e-5)
    # One train step, fresh twins: the discriminator's update, then the generator's, with
    # the z that genjax draws (update i: fold_in(key, i)).
    G, D = timg.load_gan(timg.Generator(cfg), timg.Discriminator(cfg), variables)
    adam = dataclasses.replace(ADAMW, learning_rate=2e-4, beta1=0.5, weight_decay=0.0)
    txs = {player: genjax_optimizer(adam)[0] for player in gan.PLAYERS}
    state = create_train_state(variables["params"], txs, {"batch_stats": variables["batch_stats"]})
    key = jax.random.PRNGKey(3)
    state, metrics = jax.jit(make_train_step(make_updates(cfg), txs))(state, real, key)
    z_d, z_g = (tensor(jax.random.normal(jax.random.fold_in(key, i), (8, 8))) for i in (0, 1))

    def running(module):
        return {k: v.clone() for k, v in module.state_dict().items() if "running" in k}

    g_stats = running(G)
    fake = G(z_d).detach()
    G.load_state_dict({**G.state_dict(), **g_stats})  # genjax's D update leaves G's alone
    d_loss = (torch.nn.functional.binary_cross_entropy_with_logits(
        D(nchw(real)), torch.ones(8)) + torch.nn.functional.binary_cross_entropy_with_logits(
        D(fake), torch.zeros(8)))
    assert torch_step(D, adam, d_loss) == pytest.approx(float(metrics["d_loss"]), abs=1e-4)
    d_stats = running(D)
    g_loss = torch.nn.functional.binary_cross_entropy_with_logits(D(G(z_g)), torch.ones(8))
    assert torch_step(G, adam, g_loss) == pytest.approx(float(metrics["g_loss"]), abs=1e-4)
    D.load_state_dict({**D.state_dict(), **d_stats})  # genjax's G update leaves D's alone
    G2, D2 = timg.load_gan(timg.Generator(cfg), timg.Discriminator(cfg),
                           {"params": state.params, **state.model_state})
    for twin, reference in ((G, G2), (D, D2)):
        ours, theirs = twin.state_dict(), reference.state_dict()
        for name in ours:
            if name.endswith("num_batches_tracked"):
                continue
            # PyTorch's running variance is the unbiased one (n / (n - 1)), Flax's the
            # biased one: 0.1 x var / (n - 1) apart after an update, n = B x H x W >= 392.
            tol = 1e-3 if name.endswith("running_var") else 1e-4
            close(ours[name].numpy(), theirs[name], tol)
