"""Several JAX processes on this machine (gloo collectives), joined by --distributed with
explicit coordinates: the code a multi-host job runs."""

import json
import os
import shutil
import signal
import pathlib
import re
import subprocess
import sys
import threading
import time

import pytest

from experiments import gpt_shakespeare as exp
from genjax.train.checkpoint import saved_steps

TINY = ["--max-iters", "20", "--eval-interval", "10", "--eval-iters", "2", "--batch-size", "8",
        "--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
        "--warmup-iters", "1", "--learning-rate", "1e-3", "--min-lr", "1e-3",
        "--max-new-tokens", "20"]
# (n_embd 32: fsdp shards the arrays of >= 1024 elements; a constant rate after the
# one warm-up step, so that a run to 20 steps continued to 30 is one run to 30)
# Each process splits its CPU with --host-devices (not the session's 8 devices), compiles
# at the session's optimisation level and shares the session's compilation cache (conftest).
ENV = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0", "TQDM_DISABLE": "1"}


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _gpt(*flags):
    return [sys.executable, "-m", "experiments.gpt_shakespeare", *flags]


def _launch(n, command):
    return subprocess.Popen([sys.executable, "-m", "genjax.launch", "--processes", str(n), "--"]
                            + command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)


@pytest.fixture
def reaped():
    """``reaped(launcher)`` -> launcher, stopped at the test's end if still running (a
    failed test leaves no job behind to slow the rest of the suite): SIGTERM, on which the
    launcher stops its processes (SIGINT, then SIGKILL after its grace period)."""
    started = []

    def reap(proc):
        started.append(proc)
        return proc

    yield reap
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def _run(command):
    out = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _same(a, b, keys=("train_loss", "val_loss")):
    """Records of one step agree to 1e-5 (relative, for the VAE's nats per image)."""
    assert a["step"] == b["step"]
    for key in keys:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), (key, a, b)


@pytest.mark.parametrize("engine", ["sharding", "fsdp"])
def test_two_processes_equal_one(tmp_path, text_file, engine):
    """2 processes x 2 devices train as 1 process x 4 devices; checkpoints move between
    process counts, and a resumed run equals the uninterrupted one. (pmap's 2-process
    runs: test_vae_two_processes_equal_one and test_a_dead_process_stops_the_job.)"""
    base = _gpt("--text-file", str(text_file), *TINY, "--parallel", engine)
    two, one = tmp_path / "two", tmp_path / "one"
    launcher = _launch(2, base + ["--run-dir", str(two), "--host-devices", "2"])
    _run(base + ["--run-dir", str(one), "--host-devices", "4", "--max-iters", "30"])
    out = launcher.communicate(timeout=300)[0]
    assert launcher.returncode == 0, out
    assert f"[0] gpt: engine={engine} devices=4 (cpu) processes=2 global_batch=8" in out
    assert "[Gloo]" not in out, out  # (its "connected to N peer ranks" lines are dropped)
    assert (two / "checkpoints" / "20").is_dir()  # one checkpoint for the job
    uninterrupted = _records(one)
    assert [r["step"] for r in _records(two)] == [0, 10, 20]
    for a, b in zip(_records(two), uninterrupted):  # 2 x 2 devices = 1 x 4 devices
        _same(a, b)
    if engine == "fsdp":  # the 2-process job continues in 1 process, on 1 device
        _run(_gpt("--run-dir", str(two), "--resume", "--max-iters", "30", "--host-devices", "1",
                  "--parallel", "none"))
        resumed = two
    else:  # the other way round: the 1-process run, from step 20, continues in 2 processes
        resumed = tmp_path / "back"
        shutil.copytree(one, resumed)
        shutil.rmtree(resumed / "checkpoints" / "30")
        launcher = _launch(2, _gpt("--run-dir", str(resumed), "--resume", "--max-iters", "30",
                                   "--host-devices", "2"))
        out = launcher.communicate(timeout=300)[0]
        assert launcher.returncode == 0, out
        assert "processes=2" in out
    records = _records(resumed)
    assert [r["step"] for r in records] == [0, 10, 20, 30]
    _same(records[-1], uninterrupted[-1])


def test_fsdp_shards_the_state(tmp_path, text_file):
    """fsdp holds about a quarter of the state per device on 4 devices, and its state is
    the same arrays as a replicated run's."""
    from genjax.train.parallel import FSDP_MIN_SIZE, make_engine, state_bytes_per_device

    import jax
    import numpy as np

    from genjax.models.gpt import GPT, GPTConfig
    from genjax.train.optim import make_optimizer
    from genjax.train.config import TrainConfig
    from genjax.train.steps import init_train_state

    model = GPT(GPTConfig(vocab_size=65, block_size=32, n_embd=64, n_head=4, n_layer=2))
    init = lambda key: model.init(key, np.zeros((1, 32), np.int32))["params"]
    tx, _ = make_optimizer(TrainConfig())
    states = {}
    for kind in ("sharding", "fsdp"):
        engine = make_engine(kind, 4, 8)
        states[kind] = init_train_state(init, tx, jax.random.PRNGKey(0), engine.state_sharding)
    full, sharded = (state_bytes_per_device(states[k]) for k in ("sharding", "fsdp"))
    small = sum(x.nbytes for x in jax.tree.leaves(states["sharding"]) if x.size < FSDP_MIN_SIZE)
    assert sharded == pytest.approx((full - small) / 4 + small, rel=0.02)  # about 1/4
    assert sharded < 0.3 * full
    for a, b in zip(jax.tree.leaves(states["sharding"]), jax.tree.leaves(states["fsdp"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        if b.size >= FSDP_MIN_SIZE and any(d % 4 == 0 for d in b.shape):
            assert not b.sharding.is_fully_replicated, b.shape


def test_distributed_flags_are_checked(tmp_path, text_file):
    flags = ["--text-file", str(text_file), "--run-dir", str(tmp_path / "r"), *TINY,
             "--compile-cache", "none"]
    with pytest.raises(SystemExit, match="--num-processes, --process-id: only with "
                                         "--distributed"):
        exp.main(flags + ["--num-processes", "2", "--process-id", "0"])
    with pytest.raises(SystemExit, match="needs all of --coordinator-address, --num-processes "
                                         "and --process-id"):
        exp.main(flags + ["--distributed", "--num-processes", "2"])
    with pytest.raises(SystemExit, match="--process-id 2 must lie in \\[0, --num-processes 2\\)"):
        exp.main(flags + ["--distributed", "--coordinator-address", "127.0.0.1:1",
                          "--num-processes", "2", "--process-id", "2"])
    with pytest.raises(SystemExit, match="--coordinator-address '127.0.0.1' must be HOST:PORT"):
        exp.main(flags + ["--distributed", "--coordinator-address", "127.0.0.1",
                          "--num-processes", "2", "--process-id", "0"])
    with pytest.raises(SystemExit, match="--distributed must come before JAX starts its "
                                         "backends"):  # (this test's process runs JAX)
        exp.main(flags + ["--distributed", "--coordinator-address", "127.0.0.1:1",
                          "--num-processes", "2", "--process-id", "1"])
    with pytest.raises(SystemExit, match="--distributed-timeout: only with --distributed"):
        exp.main(flags + ["--distributed-timeout", "10"])
    with pytest.raises(SystemExit, match="--distributed-timeout must be a number of seconds "
                                         ">= 1, got 0.5"):
        exp.main(flags + ["--distributed", "--distributed-timeout", "0.5"])
    assert not (tmp_path / "r").exists()


def test_the_launcher_stops_every_process_when_one_fails():
    script = ("import sys, time; i = int(sys.argv[sys.argv.index('--process-id') + 1]); "
              "print('up', i, flush=True); sys.exit(3) if i == 1 else time.sleep(120)")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "genjax.launch", "--processes", "2", "--",
                          sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 3 and time.monotonic() - started < 30  # not the 120 s sleep
    assert "[0] up 0" in out.stdout and "[1] up 1" in out.stdout
    assert "genjax.launch: process 1 exited with status 3; stopping the others" in out.stderr
    from genjax import launch

    with pytest.raises(SystemExit, match="give the command after --"):
        launch.main(["--processes", "2"])
    missing = subprocess.run([sys.executable, "-m", "genjax.launch", "--processes", "2", "--",
                              "/no/such/program"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 127
    assert missing.stderr.strip() == ("genjax.launch: cannot start '/no/such/program' (No such "
                                      "file or directory); stopping the 0 started")


def test_the_launchers_help_says_each_default_once(capsys):
    from genjax import launch

    with pytest.raises(SystemExit):
        launch.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: a free one)" in help_text and "(default: 2)" in help_text
    assert "(default: None)" not in help_text and "(default: )" not in help_text, help_text
    # tyro's usage line lists the positional COMMAND first; the text says the order that works
    assert "then -- and the command: python -m genjax.launch --processes 2 -- COMMAND" in help_text


def test_joining_fails_in_one_line():
    """An unreachable coordinator, a process that never comes and a count that processes
    disagree on: each process ends within the timeout with one error line."""
    from genjax.launch import free_port

    def flags(port, i, n, timeout=3):
        return _gpt("--run-dir", "unused", "--distributed", "--coordinator-address",
                    f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i),
                    "--distributed-timeout", str(timeout))

    def start(cmd):
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=ENV)

    started = time.monotonic()
    ports = [free_port() for _ in range(3)]
    alone = start(flags(ports[0], 1, 2))  # nobody listens on the port
    lonely = start(flags(ports[1], 0, 2))  # process 1 never comes
    # process 0 says 2 processes, process 1 says 3 (they have 20 s to meet, however slowly
    # this machine starts them; they fail as soon as they do)
    first = start(flags(ports[2], 0, 2, 20))
    time.sleep(0.5)
    other = start(flags(ports[2], 1, 3, 20))
    errors = {}
    for name, p in (("alone", alone), ("lonely", lonely), ("first", first), ("other", other)):
        errors[name] = p.communicate(timeout=60)[1].strip()
        assert p.returncode == 1, (name, errors[name])
    assert time.monotonic() - started < 40
    assert errors["alone"] == (
        f"error: --distributed (process 1 of 2): could not reach the coordinator "
        f"127.0.0.1:{ports[0]} within 3 s: start process 0 there, or check --coordinator-address")
    assert errors["lonely"] == (
        "error: --distributed (process 0 of 2): process(es) 1 of --num-processes 2 did not join "
        "within 3 s (joined: 0): check --num-processes and that every process was started with "
        "the same --coordinator-address")
    problem = "process 1 says --num-processes 3, process 0 says 2: give every process the same count"
    assert errors["first"] == f"error: --distributed (process 0 of 2): {problem}"
    assert errors["other"] == f"error: --distributed (process 1 of 3): process 0 refused the job: {problem}"
    assert not pathlib.Path("unused").exists()


def test_a_dead_process_stops_the_job(tmp_path, text_file):
    """Process 1 is killed mid-run (no launcher, as under SLURM): process 0 stops within
    the heartbeat timeout, naming it, and the checkpoint already written stays readable."""
    from genjax.launch import free_port
    from genjax.train.checkpoint import load_latest

    port, run = free_port(), tmp_path / "run"
    procs = [subprocess.Popen(
        _gpt("--text-file", str(text_file), *TINY, "--max-iters", "1000000", "--eval-interval",
             "500", "--host-devices",
             "2", "--run-dir", str(run), "--distributed", "--coordinator-address",
             f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
             "--distributed-timeout", "5"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV) for i in (0, 1)]
    watchdog = threading.Timer(240, lambda: [p.kill() for p in procs])  # no hang, ever
    watchdog.start()
    try:
        lines = []
        for line in procs[0].stdout:  # training has passed a checkpoint
            lines.append(line)
            if line.startswith("step 500:"):
                break
        assert lines and lines[-1].startswith("step 500:"), "".join(lines)
        waited = time.monotonic()  # until step 500's checkpoint is committed (~1 s)
        while not (run / "checkpoints" / "500").is_dir() and time.monotonic() - waited < 60:
            time.sleep(0.05)
        procs[1].kill()  # between two checkpoints (about 3 s apart)
        killed = time.monotonic()
        rest = procs[0].communicate(timeout=90)[0]
        assert time.monotonic() - killed < 45
        assert procs[0].returncode != 0, rest
        # Our line when its step's collective fails first; else JAX's coordination service
        # ends it (SIGABRT) once process 1 has missed its heartbeats for the timeout.
        ours = rest.rstrip().endswith("process(es) 1 stopped; continue from the latest "
                                      "checkpoint with --resume")
        jaxs = "The following tasks are unhealthy (stopped sending heartbeats):\n1\n" in rest
        assert ours or jaxs, rest[-3000:]
    finally:
        watchdog.cancel()
        for p in procs:
            p.kill()
            p.wait()
    step, state, _ = load_latest(run, log=lambda line: None)
    assert step == 500 and int(state["train"]["step"]) == step


def test_the_launcher_leaves_no_process_behind_on_sigterm(reaped):
    script = ("import os, signal, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
              "print('pid', os.getpid(), flush=True); time.sleep(120)")  # ignores SIGINT too
    launcher = reaped(subprocess.Popen([sys.executable, "-m", "genjax.launch", "--processes",
                                        "2", "--grace", "2", "--", sys.executable, "-c",
                                        script], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True))
    pids = [int(launcher.stdout.readline().split()[-1]) for _ in range(2)]
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=60)  # SIGINT, then SIGKILL after the grace period
    assert launcher.returncode == 130
    assert "genjax.launch: interrupted (Ctrl-C or SIGTERM), stopping every process" in err
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_ctrl_c_stops_every_process_of_a_job_at_the_same_step(tmp_path, text_file, reaped):
    # SIGINT reaches each process at its own moment: they agree every STOP_CHECK_EVERY
    # steps, so none is left waiting in a collective (and killed after the grace period).
    run = tmp_path / "run"
    flags = [*TINY, "--max-iters", "100000", "--eval-interval", "25", "--text-file",
             str(text_file), "--run-dir", str(run), "--host-devices", "1"]
    launcher = reaped(_launch(2, _gpt(*flags)))
    for line in launcher.stdout:
        if line.startswith("[0] step 25:"):  # (the first checkpoint is being saved)
            break
    launcher.send_signal(signal.SIGINT)
    out = launcher.communicate(timeout=60)[0]
    assert launcher.returncode == 130 and "killed" not in out, out
    (line,) = [l for l in out.splitlines() if "interrupted after step" in l]
    found = re.search(r"\[0\] interrupted after step (\d+); the latest checkpoint is step "
                      r"(\d+)", line)
    assert found and int(found[1]) % 10 == 0 and int(found[2]) % 25 == 0, out
    assert saved_steps(run)[-1] == int(found[2])


def test_the_launchers_closed_output_stops_the_job(reaped):
    # `python -m genjax.launch ... | head`: the job stops as on Ctrl-C; the processes'
    # output, read to its end, is thrown away, so none of them blocks on a full pipe.
    script = ("import itertools, os, time\n"
              "for i in itertools.count():\n"
              "    print('line', i, flush=True); time.sleep(0.01)")  # until SIGINT
    launcher = reaped(subprocess.Popen([sys.executable, "-m", "genjax.launch", "--processes",
                                        "2", "--grace", "20", "--", sys.executable, "-c",
                                        script], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True))
    assert launcher.stdout.readline().startswith("[")
    launcher.stdout.close()  # the reader goes
    err = launcher.communicate(timeout=60)[1]
    assert launcher.returncode == 130, err
    assert "genjax.launch: standard output was closed, stopping every process" in err
    assert "Traceback" not in err and "Broken pipe" not in err, err


def test_vae_two_processes_equal_one(tmp_path, digits_dir):
    """An image family, whose batches each process loads on the host (only its share):
    2 processes x 1 device equal 1 process x 2, and the job continues in 1 process as an
    uninterrupted run does."""
    def vae(*flags):
        return [sys.executable, "-m", "experiments.vae_mnist", *flags]

    base = vae("--data-dir", str(digits_dir), "--max-iters", "4", "--eval-interval", "2",
               "--batch-size", "16", "--latent-dim", "2", "--iwae-k", "5", "--warmup-iters", "1",
               "--learning-rate", "1e-3", "--min-lr", "1e-3")
    two, one = tmp_path / "two", tmp_path / "one"
    launcher = _launch(2, base + ["--run-dir", str(two), "--host-devices", "1"])
    _run(base + ["--run-dir", str(one), "--host-devices", "2", "--max-iters", "6"])
    out = launcher.communicate(timeout=300)[0]
    assert launcher.returncode == 0, out
    assert "devices=2 (cpu) processes=2 global_batch=16" in out
    _run(vae("--run-dir", str(two), "--resume", "--max-iters", "6", "--host-devices", "2"))
    resumed, uninterrupted = _records(two), _records(one)
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted] == [0, 2, 4, 6]
    for a, b in zip(resumed, uninterrupted):
        losses = [k for k in a if k in b and k.endswith(("_loss", "nats", "elbo", "nll"))]
        assert "test_neg_elbo" in losses or "neg_elbo" in losses, sorted(a)
        _same(a, b, losses)


def test_the_launcher_drops_gloos_joined_lines_even_in_pieces():
    from genjax.launch import _gloo_joined_only

    joined = ("[Gloo] Rank 1 is connected to 3 peer ranks. Expected number of connected peer "
              "ranks is : 3\n")
    assert _gloo_joined_only(joined)
    # several communicators printing at once share lines (seen in a launcher's output)
    assert _gloo_joined_only("[Gloo] Rank 1 is connected to [Gloo] Rank 1 is connected to 1 "
                             "peer ranks. Expected number of connected peer ranks is : 1\n")
    assert _gloo_joined_only("1 peer ranks. Expected number of connected peer ranks is : 1\n")
    assert _gloo_joined_only("[Gloo] Rank 0[Gloo] Rank 1 is connected to 3 peer ranks. Expected "
                             "number of connected peer ranks is : 3\n")
    # a peer missing is shown, and so is everything else
    assert not _gloo_joined_only(joined.replace("connected to 3", "connected to 2"))
    assert not _gloo_joined_only("step 10/20: loss 3.94\n")
    assert not _gloo_joined_only("[Gloo] Rank 0 is connected to 1 peer ranks. then: an error\n")
