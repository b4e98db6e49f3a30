"""Several JAX processes on this machine (gloo collectives), joined by --distributed with
explicit coordinates: the code a multi-host job runs."""

import json
import os
import subprocess
import sys
import time

import pytest

from experiments import gpt_shakespeare as exp

TINY = ["--max-iters", "20", "--eval-interval", "10", "--eval-iters", "2", "--batch-size", "8",
        "--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
        "--warmup-iters", "1", "--max-new-tokens", "20", "--compile-cache", "none"]


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("engine", ["pmap", "sharding"])
def test_two_processes_equal_one(tmp_path, text_file, engine):
    env = {**os.environ, "XLA_FLAGS": "", "TQDM_DISABLE": "1"}
    base = [sys.executable, "-m", "experiments.gpt_shakespeare", "--text-file", str(text_file),
            *TINY, "--parallel", engine]
    launcher = subprocess.Popen(  # the two processes, through genjax.launch
        [sys.executable, "-m", "genjax.launch", "--processes", "2", "--"] + base
        + ["--run-dir", str(tmp_path / "two"), "--host-devices", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    one = subprocess.run(base + ["--run-dir", str(tmp_path / "one"), "--host-devices", "4"],
                         capture_output=True, text=True, env=env, timeout=300)
    out = launcher.communicate(timeout=300)[0]
    assert one.returncode == 0, one.stdout + one.stderr
    assert launcher.returncode == 0, out
    assert f"[0] gpt: engine={engine} devices=4 (cpu) processes=2 global_batch=8" in out
    two, single = _records(tmp_path / "two"), _records(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in single] == [0, 10, 20]
    for a, b in zip(two, single):  # 2 processes x 2 devices = 1 process x 4 devices
        for key in ("train_loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a, b)
    assert (tmp_path / "two" / "checkpoints" / "20").is_dir()  # one checkpoint for the job
    if engine == "pmap":  # the 2-process job's checkpoint continues in 1 process
        resumed = subprocess.run([sys.executable, "-m", "experiments.gpt_shakespeare",
                                  "--run-dir", str(tmp_path / "two"), "--resume", "--max-iters",
                                  "30", "--host-devices", "4"],
                                 capture_output=True, text=True, env=env, timeout=300)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert [r["step"] for r in _records(tmp_path / "two")] == [0, 10, 20, 30]


def test_distributed_flags_are_checked(tmp_path, text_file):
    flags = ["--text-file", str(text_file), "--run-dir", str(tmp_path / "r"), *TINY]
    with pytest.raises(SystemExit, match="--num-processes, --process-id: only with "
                                         "--distributed"):
        exp.main(flags + ["--num-processes", "2", "--process-id", "0"])
    with pytest.raises(SystemExit, match="needs all of --coordinator-address, --num-processes "
                                         "and --process-id"):
        exp.main(flags + ["--distributed", "--num-processes", "2"])
    with pytest.raises(SystemExit, match="--process-id 2 must lie in \\[0, --num-processes 2\\)"):
        exp.main(flags + ["--distributed", "--coordinator-address", "127.0.0.1:1",
                          "--num-processes", "2", "--process-id", "2"])
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
    with pytest.raises(SystemExit, match="give the command after --"):
        from genjax import launch

        launch.main(["--processes", "2"])
