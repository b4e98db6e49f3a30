"""Several JAX processes on this machine (gloo collectives), joined by --distributed with
explicit coordinates: the code a multi-host job runs."""

import json
import os
import socket
import subprocess
import sys

import pytest

from experiments import gpt_shakespeare as exp

TINY = ["--max-iters", "20", "--eval-interval", "10", "--eval-iters", "2", "--batch-size", "8",
        "--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
        "--warmup-iters", "1", "--max-new-tokens", "20", "--compile-cache", "none"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("engine", ["pmap", "sharding"])
def test_two_processes_equal_one(tmp_path, text_file, engine):
    env = {**os.environ, "XLA_FLAGS": "", "TQDM_DISABLE": "1"}
    base = [sys.executable, "-m", "experiments.gpt_shakespeare", "--text-file", str(text_file),
            *TINY, "--parallel", engine]
    port = _free_port()
    procs = [subprocess.Popen(base + ["--run-dir", str(tmp_path / "two"), "--host-devices", "2",
                                      "--distributed", "--coordinator-address",
                                      f"127.0.0.1:{port}", "--num-processes", "2",
                                      "--process-id", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env)
             for i in range(2)]
    one = subprocess.run(base + ["--run-dir", str(tmp_path / "one"), "--host-devices", "4"],
                         capture_output=True, text=True, env=env, timeout=300)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert one.returncode == 0, one.stdout + one.stderr
    assert all(p.returncode == 0 for p in procs), outs
    assert f"engine={engine} devices=4 (cpu) processes=2 global_batch=8" in outs[0]
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
