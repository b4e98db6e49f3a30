"""Step time and throughput of the GPT ``cpu`` preset for each data-parallel engine.

    python -m experiments.benchmark_scaling [--devices 1 2 4 8] [--steps 50] [--preset cpu]

On a machine without accelerators each device count runs in its own process with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (so N "devices" share the CPU
cores: the figures show each engine's overhead, not a speed-up). With GPUs or TPUs, the
real devices are used (counts above the available number are skipped). The train step is
the real one of ``genjax.train.fit`` (batches drawn inside the step) on random tokens
(vocabulary 65), timed after two compiling/warm-up steps; each row is the median of
``--repeats`` timings of ``--steps`` steps. Below the table, :func:`roofline` puts the
step's FLOPs against the machine's float32 matrix-product rate.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Literal, Optional

from genjax.train.cli import parse_args


@dataclasses.dataclass(frozen=True)
class Args:
    """Benchmark the data-parallel engines."""

    devices: tuple[int, ...] = (1, 2, 4, 8)
    """Device counts to measure."""
    engines: tuple[Literal["pmap", "sharding", "fsdp", "none"], ...] = (
        "none", "pmap", "sharding", "fsdp")
    """Engines to measure (none runs on one device only)."""
    steps: int = 50
    """Timed steps per repeat."""
    repeats: int = 3
    preset: Literal["cpu", "lecture"] = "cpu"
    batch_size: Optional[int] = None
    """Global batch size (default: the preset's, rounded up to a multiple of the largest
    device count so that every row runs the same batch: 16 for cpu)."""
    worker: Optional[int] = None
    """Internal: measure in this process with this many devices and print JSON."""


def default_batch(preset_batch: int, devices) -> int:
    m = max(devices)
    return -(-preset_batch // m) * m


def measure(args: Args, n_devices: int) -> list[dict]:
    """Time every engine on ``n_devices`` devices in this process."""
    import jax
    import jax.numpy as jnp

    from genjax.train.host import tune_host_allocator

    if jax.default_backend() == "cpu":  # as the experiments' start-up
        tune_host_allocator()

    from experiments.gpt_shakespeare import PRESETS
    from genjax.data.text import CharTokenizer, TextData
    from genjax.tasks.gpt import make_task
    from genjax.train.optim import make_optimizer
    from genjax.train.parallel import make_engine, state_bytes_per_device
    from genjax.train.steps import init_train_state

    model_cfg, train_cfg = PRESETS[args.preset]
    batch = args.batch_size or default_batch(train_cfg.batch_size, args.devices)
    if train_cfg.lr_schedule == "cosine":
        train_cfg = dataclasses.replace(train_cfg, lr_decay_iters=train_cfg.max_iters)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (200_000,), 0, 65, dtype=jnp.int32)
    data = TextData(CharTokenizer("".join(chr(32 + i) for i in range(65))), tokens, tokens)
    task = make_task(dataclasses.replace(model_cfg, vocab_size=65), data, batch, 1)
    tx, schedule = make_optimizer(train_cfg)
    rows = []
    for kind in args.engines:
        if kind == "none" and n_devices != 1:
            continue
        try:
            engine = make_engine(kind, n_devices, batch)
        except ValueError as e:
            rows.append({"engine": kind, "devices": n_devices, "error": str(e)})
            continue
        # The step genjax.train.fit runs: the GPT's batches are drawn inside it.
        step_fn = engine.compile_train_step(
            task.loss_fn, tx, schedule,
            batch_fn=lambda data_key, step: task.train_batch(data_key, step, 0, batch))
        state = init_train_state(task.init_params, tx, jax.random.PRNGKey(0), engine.state_sharding)
        data_key = engine.put_replicated(jax.random.PRNGKey(2))
        dropout_key = engine.put_replicated(jax.random.PRNGKey(1))
        for i in range(2):  # compile and warm up
            state, metrics = step_fn(state, data_key, dropout_key)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for i in range(args.steps):
                previous = metrics
                state, metrics = step_fn(state, data_key, dropout_key)
                jax.block_until_ready(previous)  # two steps in flight, as genjax.train.fit
            jax.block_until_ready(metrics)
            times.append((time.perf_counter() - t) / args.steps)
        step_s = statistics.median(times)
        rows.append({"engine": kind, "devices": n_devices, "platform": engine.devices[0].platform,
                     "batch": batch, "per_device_batch": batch // n_devices,
                     "step_ms": step_s * 1e3,
                     "state_mib_per_device": state_bytes_per_device(state) / 2 ** 20,
                     "tokens_per_s": batch * model_cfg.block_size / step_s})
    return rows


def roofline(preset: str, batch: int) -> dict:
    """The step's work against this machine's speed: ``gflop`` per train step (XLA's cost
    analysis of the GPT loss's gradient over the global batch, float32), ``matmul_gflops``
    (the best of 20 float32 1024x1024 ``jnp.dot`` on the default device, in GFLOP/s) and
    ``floor_ms``, the time the step's FLOPs would take at that rate: a step can only be
    faster than it by running its products faster than a large square one."""
    import jax
    import jax.numpy as jnp

    from experiments.gpt_shakespeare import PRESETS
    from genjax.data.text import CharTokenizer, TextData
    from genjax.tasks.gpt import make_task

    model_cfg, _ = PRESETS[preset]
    tokens = jnp.zeros((10_000,), jnp.int32)
    data = TextData(CharTokenizer("".join(chr(32 + i) for i in range(65))), tokens, tokens)
    task = make_task(dataclasses.replace(model_cfg, vocab_size=65), data, batch, 1)
    key = jax.random.PRNGKey(0)
    params = jax.eval_shape(task.init_params, key)
    x = jax.eval_shape(lambda: task.train_batch(key, 0, 0, batch))
    grad = jax.grad(lambda p, b: task.loss_fn(p, b, key, True)[0])
    cost = jax.jit(grad).lower(params, x).compile().cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    a = jnp.ones((1024, 1024), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(20):
        t = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    rate = 2 * 1024 ** 3 / best
    return {"gflop": flops / 1e9, "matmul_gflops": rate / 1e9, "floor_ms": flops / rate * 1e3}


def main(argv=None):
    args = parse_args(Args, argv, "python -m experiments.benchmark_scaling")
    if args.worker is not None:
        print("RESULT " + json.dumps(measure(args, args.worker)))
        return
    import jax  # only to see which devices there are

    platform, available = jax.default_backend(), jax.device_count()
    rows = []
    for n in args.devices:
        if platform == "cpu":
            env = dict(os.environ)
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                                + f" --xla_force_host_platform_device_count={n}").strip()
            cmd = [sys.executable, "-m", "experiments.benchmark_scaling", "--worker", str(n),
                   "--steps", str(args.steps), "--repeats", str(args.repeats),
                   "--preset", args.preset, "--engines", *args.engines]
            if args.batch_size:
                cmd += ["--batch-size", str(args.batch_size)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode or not line:
                raise SystemExit(f"worker for {n} devices failed:\n{out.stderr[-3000:]}")
            rows += json.loads(line[-1][7:])
        elif n <= available:
            rows += measure(args, n)
        else:
            print(f"skipping {n} devices: only {available} {platform} device(s)")
    base = {r["engine"]: r["step_ms"] for r in rows if r["devices"] == 1 and "step_ms" in r}
    one = base.get("none") or next(iter(base.values()), None)
    print(f"\nGPT preset {args.preset}, platform {platform}, {args.steps} steps x {args.repeats}")
    print("| engine | devices | global batch | per device | step (ms) | tokens/s | vs 1-device jit "
          "| state per device (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['engine']} | {r['devices']} | - | - | error: {r['error']} | | | |")
            continue
        ratio = f"{r['step_ms'] / one:.2f}x" if one else "-"
        print(f"| {r['engine']} | {r['devices']} | {r['batch']} | {r['per_device_batch']} | "
              f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {ratio} | "
              f"{r['state_mib_per_device']:.1f} |")
    batches = sorted({r["batch"] for r in rows if "batch" in r})
    for batch in batches:
        r = roofline(args.preset, batch)
        print(f"\nbatch {batch}: {r['gflop']:.2f} GFLOP per step (XLA's cost analysis); float32 "
              f"matrix products on this {platform} run at up to {r['matmul_gflops']:.0f} GFLOP/s "
              f"(1024x1024 jnp.dot), so the step's FLOPs alone take {r['floor_ms']:.1f} ms at "
              "that rate")
    return rows


if __name__ == "__main__":
    main()
