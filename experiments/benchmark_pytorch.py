"""genjax against PyTorch, side by side, for every model family: the training step.

    pip install -e '.[torch]'
    python -m experiments.benchmark_pytorch [--model gpt|autoencoder|vae|gan] [--preset P]
        [--steps 20] [--warmup 3] [--repeats 5] [--json PATH] [--torch-threads N]

For the model's preset (default: ``cpu`` without an accelerator), on the same configuration
and the same batches, it times:

- ``genjax``: the step that ``genjax.train.fit`` runs (its engine on the devices the
  experiment would use: on a CPU one XLA device per core that divides the batch), with
  fit's host work per step (the image families' batches are gathered on the host and sent
  to the devices);
- ``torch-reference``: the PyTorch twin as the reference writes it (the lecture's GPT with
  a list of ``Head`` modules; the image models as plain NCHW modules), eager;
- ``torch-fast``: the same maths as a PyTorch expert writes it for speed (the GPT with one
  fused q/k/v projection and ``scaled_dot_product_attention``; the image models in
  ``channels_last`` memory), eager;
- ``torch-compiled``: ``torch.compile`` of the fast twin.

Each variant first runs ``--warmup`` steps (the first one's extra time is reported as its
compile time), then the variants take turns, ``--steps`` steps each, ``--repeats`` times
(the order rotating each repeat, so that the machine's drift hits all alike). Every step is
timed to completion (JAX's asynchronous dispatch is waited on; at most two genjax steps are
in flight, as in fit). Reported: the median step time and its spread (min to max over the
repeats), throughput, compile time, peak device memory where the platform reports it, the
model FLOPs utilisation, and each PyTorch variant's time over genjax's; as a Markdown table,
and with ``--json`` as a JSON file, with the device, library versions and thread counts.

Model FLOPs are XLA's cost analysis of genjax's whole train step on the global batch
(forward, backward and optimizer: every device's work); the same count serves every
variant. The peak they are divided by (:func:`peak_flops`): on a CPU the machine's measured
float32 matrix-product rate (all its cores), on GPUs and TPUs the vendor's dense bf16 figure
per device, times the devices used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Literal, Optional

import numpy as np
import tyro

Model = Literal["gpt", "autoencoder", "vae", "gan"]
VARIANTS = ("genjax", "torch-reference", "torch-fast", "torch-compiled")
EXPERIMENT = {"gpt": "gpt_shakespeare", "autoencoder": "autoencoder_mnist",
              "vae": "vae_mnist", "gan": "gan_mnist"}

# Dense bf16 peaks per device, from the vendors' data sheets (FLOP/s). The CPU's comes from
# a measurement (cpu_matmul_flops), never from this table.
PEAK_BF16 = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
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
    torch_threads: Optional[int] = None
    """torch.set_num_threads (default: PyTorch's own, one per core)."""
    json: Optional[str] = None
    """Also write the results to this JSON file."""
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "warmup", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown or not self.variants:
            raise ValueError(f"--variants {unknown or '(none)'}: choose among {list(VARIANTS)}")


@dataclasses.dataclass
class Runner:
    """One variant: ``step(i)`` runs training step i and returns something to wait on;
    ``wait(x)`` blocks until it is done."""

    name: str
    step: Callable[[int], Any]
    wait: Callable[[Any], None]
    peak_memory: Callable[[], Optional[int]] = lambda: None
    note: str = ""


# --- the workload: preset, data and batches, shared by every variant --------------------


def load_preset(model: str, preset: Optional[str]):
    """``(preset, model config, TrainConfig)`` of the family's experiment (the cosine
    schedule decaying over the run, as the experiments set it).

    Raises:
      ValueError: a preset the experiment does not have.
    """
    import importlib

    presets = importlib.import_module(f"experiments.{EXPERIMENT[model]}").PRESETS
    if preset is None:
        import jax

        accelerator = "lecture" if model == "gpt" else "gpu"
        preset = "cpu" if jax.default_backend() == "cpu" else accelerator
    if preset not in presets:
        raise ValueError(f"--preset {preset}: {EXPERIMENT[model]} has {sorted(presets)}")
    model_cfg, train = presets[preset]
    if train.lr_schedule == "cosine":
        train = dataclasses.replace(train, lr_decay_iters=train.max_iters)
    if model == "gpt":
        model_cfg = dataclasses.replace(model_cfg, vocab_size=65)
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
    items_per_step: int
    item_name: str


def make_workload(model: str, model_cfg, train, seed: int, n_steps: int) -> Workload:
    """Synthetic data shaped like the experiment's (random tokens of a 65-character
    vocabulary; uniform 28x28 images, 9,000 of them to train on, 1,000 held out) and the
    batches of ``n_steps`` steps, as genjax draws them from ``PRNGKey(seed)``
    (:func:`genjax.data.text.get_batch`, :func:`genjax.data.mnist.epoch_batch_indices`)."""
    import jax

    rng = np.random.default_rng(seed)
    B, key = train.batch_size, jax.random.PRNGKey(seed)
    if model == "gpt":
        tokens = rng.integers(0, 65, 200_000).astype(np.int32)
        T = model_cfg.block_size
        # get_batch's window starts for fold_in(key, step)
        starts = jax.jit(jax.vmap(lambda k: jax.random.randint(k, (B,), 0, len(tokens) - T)))
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(np.arange(n_steps))
        batches = list(np.asarray(starts(keys)))
        return Workload(model, model_cfg, train, tokens, batches, key, B * T, "tokens")
    from genjax.data.mnist import epoch_batch_indices

    images = rng.random((10_000, 28, 28, 1), dtype=np.float32)
    per_example = model_cfg.d_steps if model == "gan" else 1
    batches = [epoch_batch_indices(key, i, 9000, B * per_example) for i in range(n_steps)]
    return Workload(model, model_cfg, train, images, batches, key, B * per_example, "images")


# --- genjax --------------------------------------------------------------------------------


def genjax_runner(w: Workload) -> tuple[Runner, float]:
    """fit's train step on ``w`` and its model FLOPs per step (XLA's cost analysis)."""
    import jax

    from genjax.train.parallel import make_engine
    from genjax.train.steps import init_train_state, make_train_step

    task = _genjax_task(w)
    tx, schedule = task.optimizers(w.train)
    engine = make_engine(w.train.parallel, w.train.devices, w.train.batch_size)
    state = init_train_state(task.init_params, tx, jax.random.PRNGKey(0), engine.replicated,
                             task.init_model_state)
    B = w.train.batch_size
    data_key = w.data_key
    dropout_key = engine.put_replicated(jax.random.PRNGKey(1))
    if task.batches_in_step:
        step_fn = engine.compile_train_step(
            task.objective, tx, schedule,
            batch_fn=lambda k, s: task.train_batch(k, s, 0, B))
        data_key = engine.put_replicated(data_key)
    else:
        step_fn = engine.compile_train_step(task.objective, tx, schedule)
    box = {"state": state, "previous": None}

    def step(i):
        if task.batches_in_step:
            box["state"], metrics = step_fn(box["state"], data_key, dropout_key)
        else:
            batch = engine.put_batch(task.train_batch(data_key, i, 0, B))
            box["state"], metrics = step_fn(box["state"], batch,
                                            jax.random.fold_in(jax.random.PRNGKey(1), i))
        if box["previous"] is not None:
            jax.block_until_ready(box["previous"])  # two steps in flight at most, as fit
        box["previous"] = metrics
        return metrics

    def peak_memory():
        stats = engine.devices[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")

    # FLOPs: the same step on the global batch, in one program.
    single = jax.jit(make_train_step(task.objective, tx, schedule))
    key = jax.random.PRNGKey(0)
    batch = jax.eval_shape(lambda: task.train_batch(key, 0, 0, B)) if task.batches_in_step \
        else task.train_batch(data_key, 0, 0, B)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    cost = single.lower(abstract, batch, key).compile().cost_analysis()
    flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    note = f"{engine.kind} over {engine.n_devices} {engine.devices[0].platform} device(s)"
    return Runner("genjax", step, jax.block_until_ready, peak_memory, note), flops


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


def torch_runners(w: Workload, variants, threads: Optional[int]) -> list[Runner]:
    """The PyTorch variants asked for, each on its own model and optimizer."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runners = []
    for name in variants:
        if not name.startswith("torch"):
            continue
        fast, compiled = name != "torch-reference", name == "torch-compiled"
        torch.manual_seed(0)
        runners.append(_torch_runner(w, name, fast, compiled, device))
    return runners


def _torch_runner(w: Workload, name: str, fast: bool, compiled: bool, device: str) -> Runner:
    import torch
    from torch.nn import functional as F

    from experiments.torch_twins import gpt as tgpt
    from experiments.torch_twins import images as timg
    from experiments.torch_twins.common import clip, make_optimizer

    train, cfg = w.train, w.model_cfg
    sync = (lambda x: torch.cuda.synchronize()) if device == "cuda" else (lambda x: None)
    memory = (lambda: torch.cuda.max_memory_allocated()) if device == "cuda" else (lambda: None)
    layout = torch.channels_last if fast else torch.contiguous_format

    def prepare(module):
        module = module.to(device)
        if w.model != "gpt":
            module = module.to(memory_format=layout)
        return module

    if w.model == "gpt":
        data = torch.from_numpy(w.data.astype(np.int64)).to(device)
        T = cfg.block_size
        model = prepare((tgpt.FastGPT if fast else tgpt.LectureGPT)(cfg))
        forward = torch.compile(model) if compiled else model
        opt = make_optimizer(model, train)

        def step(i):
            ix = torch.from_numpy(w.batches[i])                          # the lecture's get_batch
            x = torch.stack([data[j:j + T] for j in ix])
            y = torch.stack([data[j + 1:j + T + 1] for j in ix])
            _, loss = forward(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip(model, train)
            opt.step()
            return loss

        return Runner(name, step, sync, memory)

    images = torch.from_numpy(w.data.transpose(0, 3, 1, 2).copy()).to(device)
    images = images.contiguous(memory_format=layout)

    def batch(i):
        return images[torch.from_numpy(w.batches[i])]

    if w.model in ("autoencoder", "vae"):
        model = prepare((timg.AutoEncoder if w.model == "autoencoder" else timg.VAE)(cfg))
        loss_of = torch.compile(model.loss) if compiled else model.loss
        opt = make_optimizer(model, train)

        def step(i):
            loss = loss_of(batch(i))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip(model, train)
            opt.step()
            return loss

        return Runner(name, step, sync, memory)

    G, D = prepare(timg.Generator(cfg)), prepare(timg.Discriminator(cfg))
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
            fake = g(torch.randn(B, L, device=device)).detach()
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

    return Runner(name, step, sync, memory)


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


def run_turns(runners: list[Runner], args: Args) -> dict:
    """Warm up each runner (timing its first step), then ``args.repeats`` rounds of turns of
    ``args.steps`` steps; returns per runner ``first_s`` and the per-step times of the
    rounds."""
    times = {r.name: [] for r in runners}
    first, counters = {}, {r.name: 0 for r in runners}

    def run(r: Runner, n: int) -> float:
        t = time.perf_counter()
        out = None
        for _ in range(n):
            out = r.step(counters[r.name])
            counters[r.name] += 1
        r.wait(out)
        return time.perf_counter() - t

    for r in runners:
        first[r.name] = run(r, 1)
        if args.warmup > 1:
            run(r, args.warmup - 1)
    for k in range(args.repeats):
        shift = k % len(runners)
        for r in runners[shift:] + runners[:shift]:
            times[r.name].append(run(r, args.steps) / args.steps)
    return {"first_s": first, "times": times}


def measure(args: Args) -> dict:
    """Run the benchmark; returns the JSON-ready results (see the module docstring)."""
    import jax

    preset, model_cfg, train = load_preset(args.model, args.preset)
    w = make_workload(args.model, model_cfg, train, args.seed,
                      args.warmup + args.repeats * args.steps)
    runners, flops = [], None
    if "genjax" in args.variants:
        runner, flops = genjax_runner(w)
        runners.append(runner)
    if any(v.startswith("torch") for v in args.variants):
        runners += torch_runners(w, [v for v in VARIANTS if v in args.variants],
                                 args.torch_threads)
    timed = run_turns(runners, args)
    device = jax.devices()[0]
    peak, peak_source = peak_flops(device.device_kind, device.platform, jax.device_count())
    rows = []
    for r in runners:
        ts = timed["times"][r.name]
        step_s = statistics.median(ts)
        rows.append({
            "variant": r.name, "note": r.note, "step_ms": step_s * 1e3,
            "step_ms_min": min(ts) * 1e3, "step_ms_max": max(ts) * 1e3,
            f"{w.item_name}_per_s": w.items_per_step / step_s,
            "compile_s": max(timed["first_s"][r.name] - step_s, 0.0),
            "peak_memory_bytes": r.peak_memory(),
            "mfu": flops / step_s / peak if flops else None,
        })
    base = next((row["step_ms"] for row in rows if row["variant"] == "genjax"), None)
    for row in rows:
        row["vs_genjax"] = row["step_ms"] / base if base else None
    versions = {"python": platform.python_version(), "jax": jax.__version__}
    for lib in ("flax", "optax", "torch"):
        try:
            versions[lib] = __import__(lib).__version__
        except ImportError:
            pass
    threads = {"xla_devices": jax.device_count()}
    if "torch" in versions:
        import torch

        threads["torch"] = torch.get_num_threads()
    return {"model": args.model, "preset": preset, "batch_size": train.batch_size,
            "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
            "device": f"{device.platform} ({device.device_kind})", "machine": platform.machine(),
            "versions": versions, "threads": threads, "model_gflop_per_step":
            flops / 1e9 if flops else None, "peak_gflops": peak / 1e9,
            "peak_source": peak_source, "rows": rows}


def markdown(result: dict) -> str:
    """The results as a Markdown table with a heading line."""
    rate = next(k for k in result["rows"][0] if k.endswith("_per_s"))
    lines = [f"{result['model']} `{result['preset']}` preset, batch {result['batch_size']}, "
             f"{result['device']}; {result['steps']} steps x {result['repeats']} rounds; "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
             + f"; threads {result['threads']}"
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
    return "\n".join(lines)


def main(argv=None):
    args = tyro.cli(Args, args=argv, prog="python -m experiments.benchmark_pytorch")
    # PyTorch's OpenMP threads spin for a while after each parallel region; in one process
    # with JAX's threads that spinning takes the cores from the next variant. Passive
    # waiting (set before torch starts; an explicit setting is kept) leaves them free.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Before JAX starts: the experiment's own CPU split (one XLA device per core that
    # divides the batch).
    from genjax.train.parallel import split_host_into_devices

    split_host_into_devices(load_preset_batch(args))
    result = measure(args)
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def load_preset_batch(args: Args) -> int:
    """The preset's batch size, read without starting JAX."""
    import importlib

    presets = importlib.import_module(f"experiments.{EXPERIMENT[args.model]}").PRESETS
    preset = presets.get(args.preset or "cpu") or presets["cpu"]  # (a bad name: said later)
    return preset[1].batch_size


if __name__ == "__main__":
    main()
