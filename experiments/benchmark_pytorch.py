"""genjax against PyTorch, side by side, for every model family: the training step.

    pip install -e '.[torch]'
    python -m experiments.benchmark_pytorch [--model gpt|autoencoder|vae|gan] [--preset P]
        [--steps 20] [--warmup 3] [--repeats 5] [--pause 0.5] [--json PATH]
        [--torch-threads N]

For the model's preset (default: ``cpu`` without an accelerator), on the same configuration,
the same initial weights (genjax's, copied into the twins) and the same batches, it times:

- ``genjax``: the step that ``genjax.train.fit`` runs, with fit's host work per step (the
  image families' batches gathered on the host and sent to the devices), on the devices
  the experiment uses on a CPU (one XLA device per core that divides the batch), or on one
  accelerator, as the PyTorch twins use one;
- ``torch-reference``: the PyTorch twin as the reference writes it (the lecture's GPT with
  a list of ``Head`` modules; the image models as plain NCHW modules), eager;
- ``torch-fast``: the same maths as a PyTorch expert writes it for speed (the GPT with one
  fused q/k/v projection, ``scaled_dot_product_attention`` and one gather for the batch;
  the image models in ``channels_last`` memory), eager;
- ``torch-compiled``: ``torch.compile`` of the fast twin.

Each variant runs in its own process, with its framework's default settings (PyTorch's
OpenMP threads, for one, spin after each parallel region by default: sharing a process with
JAX would change either one's speed), and first runs ``--warmup`` steps (the first one's
extra time is reported as compile time: genjax's with its persistent compilation cache and
PyTorch's with inductor's, both warm after a first run). Then the variants take turns, in a
random order each round, ``--steps`` steps each, ``--repeats`` rounds, with ``--pause``
seconds of rest before each turn so that the previous one's threads have gone idle. Every
step is timed to completion (JAX's asynchronous dispatch is waited on; at most two genjax
steps are in flight, as in fit). Reported: the median step time and its spread (min to max
over the rounds), throughput, compile time, peak device memory where the platform reports it
(GPUs), model FLOPs utilisation, and each variant's time over genjax's; as a Markdown table,
and with ``--json`` as a JSON file, with the device (on a CPU its model, cores and vector
extension, and the ones PyTorch's kernels use), library versions, thread counts and every
round's time. Under the table, genjax's time over the fastest PyTorch variant's, as
the ratio of the medians and as the median of each round's ratio (the two measured minutes
apart at most, so the machine's drift between rounds cancels out), with its quartiles. On
a GPU both sides run float32 without TF32.

Model FLOPs are XLA's cost analysis of genjax's whole train step on the global batch
(forward, backward and optimizer: every device's work; for the image models it counts the
zero taps of the transposed convolutions' 3 x 3 form, about 2% of the AE's); the same count
serves every variant. The peak they are divided by (:func:`peak_flops`, looked up before any
timing): on a CPU the machine's measured float32 matrix-product rate (all its cores), on GPUs
and TPUs the vendor's dense bf16 figure per device, times the devices used (so float32 runs
show a conservative utilisation).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Literal, Optional

import numpy as np

from genjax.train.cli import parse_args

Model = Literal["gpt", "autoencoder", "vae", "gan"]
VARIANTS = ("genjax", "torch-reference", "torch-fast", "torch-compiled")
EXPERIMENT = {"gpt": "gpt_shakespeare", "autoencoder": "autoencoder_mnist",
              "vae": "vae_mnist", "gan": "gan_mnist"}

# Dense bf16 peaks per device, from the vendors' data sheets (FLOP/s). The CPU's comes from
# a measurement (cpu_matmul_flops), never from this table.
PEAK_BF16 = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5", 197e12), ("TPU v4", 275e12),
)


@dataclasses.dataclass(frozen=True)
class Args:
    """Time one training step of a model family in genjax and in PyTorch, side by side."""

    model: Model = "gpt"
    """The model family."""
    preset: Optional[str] = None
    """The experiment's preset (default: cpu without an accelerator, else the experiment's
    accelerator preset: lecture for the GPT, gpu for the image families)."""
    steps: int = 20
    """Timed steps per variant per repeat."""
    warmup: int = 3
    """Untimed steps per variant first (the first compiles)."""
    repeats: int = 5
    """Rounds of turns; the figures are medians over them."""
    variants: tuple[str, ...] = VARIANTS
    """Which of genjax, torch-reference, torch-fast, torch-compiled to run."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """GPT only: bfloat16 is mixed precision, genjax's --dtype bfloat16 against PyTorch's
    torch.autocast(dtype=torch.bfloat16), float32 parameters in both."""
    torch_threads: Optional[int] = None
    """torch.set_num_threads (default: PyTorch's own, one per core)."""
    torch_malloc: Literal["default", "genjax"] = "default"
    """The PyTorch workers' malloc on a CPU: glibc's defaults, as PyTorch runs, or the
    settings genjax's own process takes (genjax.train.host.tune_host_allocator)."""
    pause: float = 0.5
    """Seconds of rest before each turn (the previous variant's threads go idle)."""
    json: Optional[str] = None
    """Also write the results to this JSON file."""
    seed: int = 0
    worker: Optional[str] = None
    """Internal: run this variant as a worker process of the harness."""
    shared: Optional[str] = None
    """Internal: the file where the genjax worker leaves the batches and initial weights."""

    def __post_init__(self):
        for name in ("steps", "warmup", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.pause < 0:
            raise ValueError(f"--pause must be >= 0, got {self.pause}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype {self.dtype}: choose float32 or bfloat16")
        if self.dtype != "float32" and self.model != "gpt":
            raise ValueError(f"--dtype {self.dtype}: mixed precision is the GPT's "
                             f"(--model gpt); the {self.model} trains in float32")
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown or not self.variants:
            raise ValueError(f"--variants {unknown or '(none)'}: choose among {list(VARIANTS)}")


@dataclasses.dataclass
class Runner:
    """One variant: ``step(i)`` runs training step i (on the workload's batch i) and
    returns something to wait on; ``wait(x)`` blocks until it is done."""

    name: str
    step: Callable[[int], Any]
    wait: Callable[[Any], None]
    platform: str
    peak_memory: Callable[[], Optional[int]] = lambda: None
    note: str = ""


# --- the workload: preset, data and batches, shared by every variant --------------------


def load_preset(model: str, preset: Optional[str], accelerator: Optional[bool] = None,
                dtype: str = "float32"):
    """``(preset, model config, TrainConfig)`` of the family's experiment (the cosine
    schedule decaying over the run, as the experiments set it). ``preset`` None: ``cpu``
    without an accelerator (``accelerator``; None: ask JAX), else the accelerator preset.
    ``dtype``: the GPT's compute dtype.

    Raises:
      ValueError: a preset the experiment does not have.
    """
    import importlib

    presets = importlib.import_module(f"experiments.{EXPERIMENT[model]}").PRESETS
    if preset is None:
        if accelerator is None:
            import jax

            accelerator = jax.default_backend() != "cpu"
        preset = ("lecture" if model == "gpt" else "gpu") if accelerator else "cpu"
    if preset not in presets:
        raise ValueError(f"--preset {preset}: {EXPERIMENT[model]} has {sorted(presets)}")
    model_cfg, train = presets[preset]
    if train.lr_schedule == "cosine":
        train = dataclasses.replace(train, lr_decay_iters=train.max_iters)
    if model == "gpt":
        model_cfg = dataclasses.replace(model_cfg, vocab_size=65, dtype=dtype)
    return preset, model_cfg, train


@dataclasses.dataclass
class Workload:
    """What every variant trains on: the configs, the synthetic data and, for each step i,
    the same batch ``batches[i]`` (GPT: the B window starts; images: the B indices)."""

    model: str
    model_cfg: Any
    train: Any
    data: np.ndarray
    batches: list
    data_key: Any


def make_workload(model: str, model_cfg, train, seed: int, n_steps: int,
                  batches: Optional[list] = None) -> Workload:
    """Synthetic data shaped like the experiment's (random tokens of a 65-character
    vocabulary; uniform 28x28 images, 9,000 of them to train on, 1,000 held out; NumPy) and
    the batches of ``n_steps`` steps, as genjax draws them from ``PRNGKey(seed)``
    (:func:`genjax.data.text.get_batch`, :func:`genjax.data.mnist.epoch_batch_indices`),
    unless ``batches`` are given (a PyTorch worker reads them from the genjax worker, and
    so never starts JAX)."""
    rng = np.random.default_rng(seed)
    B = train.batch_size
    if model == "gpt":
        data = rng.integers(0, 65, 200_000).astype(np.int32)
    else:
        data = rng.random((10_000, 28, 28, 1), dtype=np.float32)
    if batches is not None:
        return Workload(model, model_cfg, train, data, batches, None)
    import jax

    key = jax.random.PRNGKey(seed)
    if model == "gpt":
        T = model_cfg.block_size
        # get_batch's window starts for fold_in(key, step)
        starts = jax.jit(jax.vmap(lambda k: jax.random.randint(k, (B,), 0, len(data) - T)))
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(np.arange(n_steps))
        return Workload(model, model_cfg, train, data, list(np.asarray(starts(keys))), key)
    from genjax.data.mnist import epoch_batch_indices

    per_example = model_cfg.d_steps if model == "gan" else 1
    batches = [epoch_batch_indices(key, i, 9000, B * per_example) for i in range(n_steps)]
    return Workload(model, model_cfg, train, data, batches, key)


def save_shared(path: str, w: Workload) -> None:
    """What the PyTorch workers take from the genjax worker: the batches and genjax's
    initial weights (flattened to ``a/b/c`` names), in one ``.npz`` file."""
    from flax.traverse_util import flatten_dict

    weights = flatten_dict(genjax_initial_weights(w), sep="/")
    np.savez(path, batches=np.stack(w.batches), **{f"w/{k}": np.asarray(v)
                                                    for k, v in weights.items()})


def load_shared(path: str) -> tuple[list, dict]:
    """``(batches, weights)`` written by :func:`save_shared`."""
    from flax.traverse_util import unflatten_dict

    with np.load(path) as f:
        weights = unflatten_dict({k[2:]: f[k] for k in f.files if k.startswith("w/")}, sep="/")
        return list(f["batches"]), weights


# --- genjax --------------------------------------------------------------------------------


def genjax_runner(w: Workload) -> tuple[Runner, float]:
    """fit's train step on ``w`` (genjax's initial weights from ``PRNGKey(0)``) and its model
    FLOPs per step (XLA's cost analysis of the same step on the global batch)."""
    import jax

    from genjax.train.parallel import make_engine
    from genjax.train.steps import init_train_state, make_train_step

    task = _genjax_task(w)
    tx, schedule = task.optimizers(w.train)
    if jax.default_backend() == "cpu":  # the experiment's own engine over the host's devices
        engine = make_engine(w.train.parallel, w.train.devices, w.train.batch_size)
    else:  # one accelerator, as the PyTorch twins use one
        engine = make_engine("none", 1, w.train.batch_size)
    state = init_train_state(task.init_params, tx, jax.random.PRNGKey(0), engine.state_sharding,
                             task.init_model_state)
    B = w.train.batch_size
    data_key = engine.put_replicated(w.data_key)
    dropout_key = engine.put_replicated(jax.random.PRNGKey(1))
    if task.batches_in_step:
        step_fn = engine.compile_train_step(
            task.objective, tx, schedule,
            batch_fn=lambda k, s: task.train_batch(k, s, 0, B))
    else:
        step_fn = engine.compile_train_step(task.objective, tx, schedule)
    box = {"state": state, "previous": None}

    def step(i):
        if task.batches_in_step:  # batch i: the state's step counts the steps run
            box["state"], metrics = step_fn(box["state"], data_key, dropout_key)
        else:  # as fit: the batch gathered on the host (the step's key is folded inside)
            batch = engine.put_batch(task.train_batch(w.data_key, i, 0, B))
            box["state"], metrics = step_fn(box["state"], batch, dropout_key)
        if box["previous"] is not None:
            jax.block_until_ready(box["previous"])  # two steps in flight at most, as fit
        box["previous"] = metrics
        return metrics

    def peak_memory():
        stats = engine.devices[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")

    single = jax.jit(make_train_step(task.objective, tx, schedule))
    key = jax.random.PRNGKey(0)
    batch = jax.eval_shape(lambda: task.train_batch(key, 0, 0, B)) if task.batches_in_step \
        else task.train_batch(w.data_key, 0, 0, B)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    cost = single.lower(abstract, batch, key).compile().cost_analysis()
    flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    platform_name = engine.devices[0].platform
    note = f"{engine.kind} over {engine.n_devices} {platform_name} device(s)"
    return Runner("genjax", step, jax.block_until_ready, platform_name, peak_memory, note), flops


def genjax_initial_weights(w: Workload):
    """genjax's initial parameters (and model state) of ``w``, as :func:`genjax_runner`
    starts from them: the twins load these."""
    import jax

    task = _genjax_task(w)
    params = jax.jit(task.init_params)(jax.random.PRNGKey(0))
    if task.init_model_state is None:
        return params
    return {"params": params, **jax.jit(task.init_model_state)(jax.random.PRNGKey(0))}


def _genjax_task(w: Workload):
    from genjax.data.mnist import ImageData

    if w.model == "gpt":
        from genjax.data.text import CharTokenizer, TextData
        from genjax.tasks.gpt import make_task

        import jax.numpy as jnp

        tokens = jnp.asarray(w.data)
        data = TextData(CharTokenizer("".join(chr(32 + i) for i in range(65))), tokens, tokens)
        return make_task(w.model_cfg, data, w.train.batch_size, 1)
    labels = np.zeros(len(w.data), np.int32)
    data = ImageData(w.data[:9000], labels[:9000], w.data[9000:], labels[9000:])
    if w.model == "autoencoder":
        from genjax.tasks.autoencoder import make_task

        return make_task(w.model_cfg, data, w.train.batch_size, None)[0]
    if w.model == "vae":
        from genjax.tasks.vae import make_task

        return make_task(w.model_cfg, data, w.train.batch_size, None, 1, w.train.max_iters)
    from genjax.tasks.gan import make_task

    return make_task(w.model_cfg, data, w.train.batch_size, None)


# --- PyTorch ------------------------------------------------------------------------------


def torch_runner(w: Workload, name: str, threads: Optional[int], weights=None) -> Runner:
    """A PyTorch variant, starting from genjax's initial weights (``weights``, else
    computed here with JAX on the CPU)."""
    import torch
    from torch.nn import functional as F

    from experiments.torch_twins import gpt as tgpt
    from experiments.torch_twins import images as timg
    from experiments.torch_twins.common import clip, make_optimizer

    if threads:
        torch.set_num_threads(threads)
    fast, compiled = name != "torch-reference", name == "torch-compiled"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # float32 without TF32, as genjax on a GPU here
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    if weights is None:
        weights = genjax_initial_weights(w)
    train, cfg = w.train, w.model_cfg
    sync = (lambda x: torch.cuda.synchronize()) if device == "cuda" else (lambda x: None)
    memory = (lambda: torch.cuda.max_memory_allocated()) if device == "cuda" else (lambda: None)
    platform_name = "gpu" if device == "cuda" else "cpu"
    layout = torch.channels_last if fast else torch.contiguous_format

    def prepare(module):
        module = module.to(device)
        if w.model != "gpt":
            module = module.to(memory_format=layout)
        return module

    if w.model == "gpt":
        data = torch.from_numpy(w.data.astype(np.int64)).to(device)
        T = cfg.block_size
        offsets = torch.arange(T, device=device)
        model = prepare(tgpt.load_genjax((tgpt.FastGPT if fast else tgpt.LectureGPT)(cfg), weights))
        forward = torch.compile(model) if compiled else model
        opt = make_optimizer(model, train)
        autocast = torch.autocast(device, dtype=torch.bfloat16,
                                  enabled=cfg.dtype == "bfloat16")  # mixed precision

        def step(i):
            ix = torch.from_numpy(w.batches[i]).to(device)
            if fast:  # one gather
                idx = ix[:, None] + offsets                               # (B, T)
                x, y = data[idx], data[idx + 1]
            else:  # the lecture's get_batch
                x = torch.stack([data[j:j + T] for j in ix])
                y = torch.stack([data[j + 1:j + T + 1] for j in ix])
            with autocast:
                _, loss = forward(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip(model, train)
            opt.step()
            return loss

        return Runner(name, step, sync, platform_name, memory)

    images = torch.from_numpy(w.data.transpose(0, 3, 1, 2).copy()).to(device)
    images = images.contiguous(memory_format=layout)

    def batch(i):
        return images[torch.from_numpy(w.batches[i]).to(device)]

    if w.model in ("autoencoder", "vae"):
        twin = timg.AutoEncoder if w.model == "autoencoder" else timg.VAE
        model = prepare(timg.load_autoencoder(twin(cfg), weights))
        loss_of = torch.compile(model.loss) if compiled else model.loss
        opt = make_optimizer(model, train)

        def step(i):
            loss = loss_of(batch(i))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip(model, train)
            opt.step()
            return loss

        return Runner(name, step, sync, platform_name, memory)

    G, D = timg.load_gan(timg.Generator(cfg), timg.Discriminator(cfg), weights)
    G, D = prepare(G), prepare(D)
    g, d = (torch.compile(G), torch.compile(D)) if compiled else (G, D)
    opt_g, opt_d = make_optimizer(G, train), make_optimizer(D, train)
    B, L, k = train.batch_size, cfg.latent_dim, cfg.d_steps

    def d_loss(real_logits, fake_logits):
        if cfg.loss == "hinge":
            return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
        target = torch.full_like(real_logits, 1.0 - cfg.label_smoothing)
        return (F.binary_cross_entropy_with_logits(real_logits, target)
                + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))

    def step(i):
        real = batch(i).reshape(B, k, 1, 28, 28)
        for r in range(k):  # d_steps discriminator updates, each on its own real images
            with torch.no_grad():
                fake = g(torch.randn(B, L, device=device))
            loss_d = d_loss(d(real[:, r].contiguous(memory_format=layout)), d(fake))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
        logits = d(g(torch.randn(B, L, device=device)))
        loss_g = (-logits.mean() if cfg.loss == "hinge" else
                  F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        return loss_g

    return Runner(name, step, sync, platform_name, memory)


# --- timing and reporting -------------------------------------------------------------------


def peak_flops(device_kind: str, platform_name: str, n_devices: int) -> tuple[float, str]:
    """``(FLOP/s, source)``: the peak that model FLOPs utilisation divides by. A CPU's is
    measured (:func:`cpu_matmul_flops`, all cores at once); a GPU's or TPU's is the dense
    bf16 figure of :data:`PEAK_BF16` for its ``device_kind``, times ``n_devices``.

    Raises:
      ValueError: an accelerator whose kind is not in the table.
    """
    if platform_name == "cpu":
        return cpu_matmul_flops(), "measured float32 1024x1024 matmul rate"
    for name, peak in PEAK_BF16:
        if name.lower() in device_kind.lower():
            return peak * n_devices, f"{name} dense bf16 peak x {n_devices}"
    raise ValueError(f"no peak FLOP/s known for device kind {device_kind!r}: add it to PEAK_BF16")


def cpu_matmul_flops(size: int = 1024, tries: int = 20) -> float:
    """This CPU's float32 matrix-product rate: the best of ``tries`` ``jnp.dot`` of two
    ``size`` x ``size`` matrices, in FLOP/s."""
    import jax
    import jax.numpy as jnp

    a = jax.device_put(jnp.ones((size, size), jnp.float32), jax.devices("cpu")[0])
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(tries):
        t = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best


# Vector extensions by /proc/cpuinfo flag, widest first (x86 "flags", Arm "Features").
_VECTOR_EXTENSIONS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"),
                      ("sse4_2", "SSE4.2"), ("sve2", "SVE2"), ("sve", "SVE"), ("asimd", "NEON"))


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The host CPU in a few words, for the records of a CPU run (its speed depends on it):
    its model name (from ``cpuinfo``, Linux's ``/proc/cpuinfo``; without one,
    :func:`platform.processor` or else :func:`platform.machine`), the cores this process may
    run on, and its widest vector extension (x86 or Arm), e.g. ``AMD EPYC, 2 cores, AVX-512``.
    A file that is missing or unreadable leaves out what it would have given."""
    name, flags = "", set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # (not on macOS or Windows)
        cores = os.cpu_count()
    isa = next((label for flag, label in _VECTOR_EXTENSIONS if flag in flags), None)
    return f"{name}, {cores or '?'} cores" + (f", {isa}" if isa else "")


def batch_checksum(w: Workload, n: int) -> int:
    """A number that depends on every index of the first ``n`` batches and their order:
    every worker reports it, so the parent can check that they trained on the same ones."""
    total = 0
    for i in range(n):
        total = (total * 1_000_003 + int(np.asarray(w.batches[i], np.int64).sum()) + i) % 2**61
    return total


_PROTOCOL = "@@ "  # a worker's lines to the harness; anything else it prints is left alone


def preset_batch_size(args: Args) -> int:
    """The preset's batch size, read without starting JAX (the CPU split depends on it)."""
    import importlib

    presets = importlib.import_module(f"experiments.{EXPERIMENT[args.model]}").PRESETS
    preset = presets.get(args.preset or "cpu") or presets["cpu"]  # (a bad name: said later)
    return preset[1].batch_size


def worker(args: Args) -> None:
    """Run one variant in this process, driven by the harness: after the warm-up it prints
    ``@@ READY {json}``; then ``RUN n`` on stdin runs n steps and prints ``@@ TIME
    seconds``; ``DONE`` prints ``@@ STATS {json}`` and ends."""
    if args.worker == "genjax":
        from genjax.train.cli import enable_compile_cache
        from genjax.train.host import tune_host_allocator
        from genjax.train.parallel import split_host_into_devices

        split_host_into_devices(preset_batch_size(args))  # before JAX starts, as the experiments
        enable_compile_cache(None)
        import jax

        malloc_tuned = jax.default_backend() == "cpu" and tune_host_allocator()  # as fit

        if jax.default_backend() == "gpu":  # float32 without TF32, as PyTorch here
            jax.config.update("jax_default_matmul_precision", "highest")
    accelerator = None
    if args.worker != "genjax":
        import torch

        from genjax.train.host import tune_host_allocator

        accelerator = torch.cuda.is_available()
        malloc_tuned = (not accelerator and args.torch_malloc == "genjax"
                        and tune_host_allocator())
    preset, model_cfg, train = load_preset(args.model, args.preset, accelerator, args.dtype)
    n_steps = args.warmup + args.repeats * args.steps
    if args.worker == "genjax":
        import jax

        w = make_workload(args.model, model_cfg, train, args.seed, n_steps)
        if args.shared:
            save_shared(args.shared, w)
        runner, flops = genjax_runner(w)
        device = jax.devices()[0]
        peak, peak_source = peak_flops(device.device_kind, device.platform,
                                       1 if device.platform != "cpu" else jax.device_count())
        extra = {"flops": flops, "peak": peak, "peak_source": peak_source,
                 "device": (f"cpu ({cpu_description()})" if device.platform == "cpu"
                            else f"{device.platform} ({device.device_kind})"),
                 "xla_devices": jax.device_count()}
    else:  # with the genjax worker's batches and weights, this process never starts JAX
        batches, weights = load_shared(args.shared) if args.shared else (None, None)
        w = make_workload(args.model, model_cfg, train, args.seed, n_steps, batches)
        runner = torch_runner(w, args.worker, args.torch_threads, weights)
        import torch

        extra = {"torch_threads": torch.get_num_threads(),
                 "torch_cpu_kernels": torch.backends.cpu.get_cpu_capability()}
    counter = {"i": 0}

    def run(n: int) -> float:
        t = time.perf_counter()
        out = None
        for _ in range(n):
            out = runner.step(counter["i"])
            counter["i"] += 1
        runner.wait(out)
        return time.perf_counter() - t

    first = run(1)
    if args.warmup > 1:
        run(args.warmup - 1)

    def say(tag: str, payload) -> None:
        print(f"{_PROTOCOL}{tag} {json.dumps(payload)}", flush=True)

    say("READY", {"first_s": first, "note": runner.note, "platform": runner.platform,
                  "preset": preset, "malloc_tuned": bool(malloc_tuned), **extra})
    for line in sys.stdin:
        command = line.split()
        if command and command[0] == "RUN":
            say("TIME", run(int(command[1])))
        elif command and command[0] == "DONE":
            say("STATS", {"peak_memory_bytes": runner.peak_memory(),
                          "batch_checksum": batch_checksum(w, counter["i"])})
            return


class _Worker:
    """A variant's process, as the harness drives it."""

    def __init__(self, args: Args, variant: str, preset: Optional[str], shared: Optional[str]):
        import os
        import subprocess

        env = dict(os.environ)
        if variant != "genjax":  # JAX there only draws batches and weights: on the CPU
            env["JAX_PLATFORMS"] = "cpu"
        cmd = [sys.executable, "-m", "experiments.benchmark_pytorch", "--model", args.model,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats",
               str(args.repeats), "--seed", str(args.seed), "--worker", variant]
        if preset:
            cmd += ["--preset", preset]
        if shared:
            cmd += ["--shared", shared]
        if args.torch_threads:
            cmd += ["--torch-threads", str(args.torch_threads)]
        cmd += ["--torch-malloc", args.torch_malloc]
        cmd += ["--dtype", args.dtype]
        self.variant = variant
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, bufsize=1, env=env)

    def read(self, tag: str):
        for line in self.process.stdout:
            if line.startswith(_PROTOCOL + tag + " "):
                return json.loads(line[len(_PROTOCOL) + len(tag) + 1:])
        raise RuntimeError(f"the {self.variant} worker ended before saying {tag} (exit status "
                           f"{self.process.wait()}; its errors are above)")

    def send(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def measure(args: Args) -> dict:
    """Run the benchmark in one worker process per variant; returns the JSON-ready results
    (see the module docstring).

    Raises:
      ValueError: PyTorch on another platform than JAX (a TPU host: PyTorch would run on
        its CPU), or workers that trained on different batches.
      RuntimeError: a worker that failed.
    """
    import random
    import tempfile

    variants = [v for v in VARIANTS if v in args.variants]
    workers, ready = [], {}
    preset = args.preset
    folder = tempfile.TemporaryDirectory(prefix="genjax-bench-")
    shared = f"{folder.name}/shared.npz" if "genjax" in variants else None
    try:
        for v in variants:  # one at a time (genjax first): a warm-up has the machine alone
            workers.append(_Worker(args, v, preset, shared))
            ready[v] = workers[-1].read("READY")
            preset = ready[v]["preset"]  # the first worker's choice, for all
        platforms = {ready[v]["platform"] for v in variants}
        if len(platforms) > 1:
            raise ValueError(f"the variants run on different platforms {sorted(platforms)}: "
                             "compare like with like (--variants genjax on a TPU host)")
        times = {v: [] for v in variants}
        order = random.Random(args.seed)
        for _ in range(args.repeats):
            for wk in order.sample(workers, len(workers)):
                time.sleep(args.pause)
                wk.send(f"RUN {args.steps}")
                times[wk.variant].append(wk.read("TIME") / args.steps)
        stats = {}
        for wk in workers:
            wk.send("DONE")
            stats[wk.variant] = wk.read("STATS")
    finally:
        for wk in workers:
            wk.close()
        folder.cleanup()
    if len({s["batch_checksum"] for s in stats.values()}) > 1:
        raise ValueError(f"the variants trained on different batches: {stats}")
    _, _, train = load_preset(args.model, preset)
    g = ready.get("genjax", {})
    flops, peak = g.get("flops"), g.get("peak")
    rows = []
    for v in variants:
        ts = times[v]
        step_s = statistics.median(ts)
        rows.append({
            "variant": v, "note": ready[v]["note"], "step_ms": step_s * 1e3,
            "step_ms_min": min(ts) * 1e3, "step_ms_max": max(ts) * 1e3,
            "compile_s": max(ready[v]["first_s"] - step_s, 0.0),
            "peak_memory_bytes": stats[v]["peak_memory_bytes"],
            "mfu": flops / step_s / peak if flops and peak else None,
        })
    w_items, item_name = _items_per_step(args.model, preset)
    base = next((row["step_ms"] for row in rows if row["variant"] == "genjax"), None)
    for row in rows:
        row[f"{item_name}_per_s"] = w_items / (row["step_ms"] / 1e3)
        row["vs_genjax"] = row["step_ms"] / base if base else None
        row["step_ms_rounds"] = [t * 1e3 for t in times[row["variant"]]]
        # paired: each round's time over genjax's in the same round (drift hits both)
        row["vs_genjax_rounds"] = ([a / b for a, b in zip(times[row["variant"]], times["genjax"])]
                                   if base else None)
    versions = {"python": platform.python_version()}
    for lib in ("jax", "flax", "optax", "torch"):
        try:
            versions[lib] = __import__(lib).__version__
        except ImportError:
            pass
    threads = {"xla_devices": g.get("xla_devices")}
    threads.update({"torch": r["torch_threads"] for r in ready.values() if "torch_threads" in r})
    # the vector instructions PyTorch's CPU kernels were dispatched to (None without torch)
    torch_kernels = next((r["torch_cpu_kernels"] for r in ready.values()
                          if "torch_cpu_kernels" in r), None)
    malloc = {("genjax" if v == "genjax" else "torch"): r.get("malloc_tuned", False)
              for v, r in ready.items()}
    return {"model": args.model, "preset": preset, "dtype": args.dtype,
            "batch_size": train.batch_size,
            "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
            "device": g.get("device") or (f"cpu ({cpu_description()})"  # (PyTorch alone)
                                          if ready[variants[0]]["platform"] == "cpu"
                                          else ready[variants[0]]["platform"]),
            "machine": platform.machine(), "versions": versions, "threads": threads,
            "malloc_tuned": malloc, "torch_cpu_kernels": torch_kernels,
            "model_gflop_per_step": flops / 1e9 if flops else None,
            "peak_gflops": peak / 1e9 if peak else None,
            "peak_source": g.get("peak_source"), "rows": rows}


def _items_per_step(model: str, preset: str) -> tuple[int, str]:
    """Tokens (GPT) or images per train step, and their name."""
    _, model_cfg, train = load_preset(model, preset)
    if model == "gpt":
        return train.batch_size * model_cfg.block_size, "tokens"
    return train.batch_size * (model_cfg.d_steps if model == "gan" else 1), "images"


def _quartiles(xs: list) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of ``xs`` (all three the value itself for
    one value)."""
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def genjax_against_fastest(result: dict) -> Optional[str]:
    """One line: genjax's step over the fastest PyTorch variant's, as the ratio of their
    medians and as the median (and quartiles) of the rounds' paired ratios; None without a
    genjax row and a PyTorch row."""
    rows = {r["variant"]: r for r in result["rows"]}
    torch_rows = [r for r in result["rows"] if r["variant"] != "genjax"]
    if "genjax" not in rows or not torch_rows:
        return None
    fastest = min(torch_rows, key=lambda r: r["step_ms"])
    paired = [1 / x for x in fastest["vs_genjax_rounds"]]  # genjax / fastest, per round
    q1, median, q3 = _quartiles(paired)
    return (f"genjax / fastest PyTorch ({fastest['variant']}): "
            f"{rows['genjax']['step_ms'] / fastest['step_ms']:.2f}x (medians); per round "
            f"{median:.2f}x, quartiles {q1:.2f}-{q3:.2f}x over {len(paired)} rounds")


def markdown(result: dict) -> str:
    """The results as a Markdown table with a heading line and, with PyTorch rows, the
    line of :func:`genjax_against_fastest`."""
    rate = next(k for k in result["rows"][0] if k.endswith("_per_s"))
    lines = [f"{result['model']} `{result['preset']}` preset, {result['dtype']}, "
             f"batch {result['batch_size']}, "
             f"{result['device']}; {result['steps']} steps x {result['repeats']} rounds; "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
             + f"; threads {result['threads']}"
             + (f"; PyTorch's CPU kernels {result['torch_cpu_kernels']}"
                if result.get("torch_cpu_kernels") and result["device"].startswith("cpu") else "")
             + ("; malloc tuned (genjax.train.host): " + ", ".join(
                 f"{k} {'yes' if v else 'no'}" for k, v in result["malloc_tuned"].items())
                if result.get("malloc_tuned") else "")
             + (f"; {result['model_gflop_per_step']:.2f} GFLOP per step against "
                f"{result['peak_gflops']:,.0f} GFLOP/s ({result['peak_source']})"
                if result["model_gflop_per_step"] else ""),
             "",
             f"| variant | step (ms), median | min-max | {rate.replace('_', ' ')} | compile (s) "
             "| peak memory | MFU | time / genjax |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        memory = f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB" if r["peak_memory_bytes"] else "n/a"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        ratio = f"{r['vs_genjax']:.2f}x" if r["vs_genjax"] else "-"
        name = r["variant"] + (f" ({r['note']})" if r["note"] else "")
        lines.append(f"| {name} | {r['step_ms']:.1f} | {r['step_ms_min']:.1f}-"
                     f"{r['step_ms_max']:.1f} | {r[rate]:,.0f} | {r['compile_s']:.1f} | "
                     f"{memory} | {mfu} | {ratio} |")
    summary = genjax_against_fastest(result)
    if summary:
        lines += ["", summary]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(Args, argv, "python -m experiments.benchmark_pytorch")
    if args.worker is not None:
        return worker(args)
    result = measure(args)
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
