import dataclasses
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from experiments import gpt_shakespeare as exp
from genjax.train.checkpoint import load_latest, saved_steps

TINY_FLAGS = ["--max-iters", "6", "--eval-interval", "3", "--eval-iters", "2",
              "--batch-size", "8", "--block-size", "16", "--n-layer", "1", "--n-head", "2",
              "--n-embd", "16", "--warmup-iters", "1", "--max-new-tokens", "40"]


def test_train_then_sample_end_to_end(tmp_path, text_file, capsys, caplog):
    run = tmp_path / "run"
    result = exp.main(["--preset", "cpu", "--text-file", str(text_file), "--run-dir", str(run),
                       *TINY_FLAGS])
    assert int(result.state.step) == 6
    out = capsys.readouterr().out
    assert "engine=pmap devices=8" in out and "per_device_batch=1" in out
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "cpu" and config["model"]["n_embd"] == 16
    assert config["model"]["dtype"] == "float32"  # the cpu preset's, on a CPU
    assert config["max_new_tokens"] == 40
    assert config["train"]["lr_decay_iters"] == 6  # the cosine decays over the run
    assert "".join(sorted(config["vocab"])) == config["vocab"]
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 3, 6]
    assert {"train_loss", "val_loss", "elapsed_s", "tokens_per_s"} <= set(records[-1])
    samples = (run / "samples.txt").read_text()
    assert samples.startswith("=== step 6") and len(samples.splitlines()) >= 2
    assert (run / "loss.png").stat().st_size > 5000  # redrawn at each evaluation

    text = exp.main(["sample", "--run-dir", str(run), "--prompt", "All:",
                     "--max-new-tokens", "25", "--temperature", "0"])
    assert text.startswith("All:") and len(text) == 4 + 25
    assert text == exp.main(["sample", "--run-dir", str(run), "--prompt", "All:",
                             "--max-new-tokens", "25", "--temperature", "0"])
    out = capsys.readouterr().out
    assert f"--- {run}, step 6 ---" in out and "unreadable" not in out
    notices = [r.getMessage() for r in caplog.records if "read only" in r.getMessage()
               or "read_only" in r.getMessage()]
    assert not notices  # Orbax's notices that a read-only manager is read-only
    # The latest checkpoint, restored onto the one device asked for (it was saved from a
    # mesh of 8), on the first try.
    step, state, meta = load_latest(run, device=jax.devices()[1], log=pytest.fail)
    assert step == 6 and meta["model"]["n_embd"] == 16
    assert set(state["train"]) == {"step", "params", "opt_state"}  # no model state: as before
    leaves = jax.tree.leaves(state)
    assert leaves and all(leaf.sharding.device_set == {jax.devices()[1]} for leaf in leaves)

    # Resume to 9 steps: continues from the checkpoint at 6, with the run's saved config
    # (the tiny model, batch 8, eval every 3 steps over 2 batches, the text file), not the
    # preset's, for every flag left out.
    with pytest.raises(SystemExit, match="--preset lecture: the run .* was started with "
                                         "preset cpu"):
        exp.main(["--run-dir", str(run), "--resume", "--preset", "lecture"])
    with pytest.raises(SystemExit, match="--seed 5: a resumed run continues with the random "
                                         "keys saved in its checkpoint \\(seed 1337\\)"):
        exp.main(["--run-dir", str(run), "--resume", "--seed", "5"])
    capsys.readouterr()
    exp.main(["--run-dir", str(run), "--resume", "--max-iters", "9", "--max-new-tokens", "5",
              "--dtype", "bfloat16"])  # the float32 checkpoint continues in mixed precision
    out = capsys.readouterr().out
    assert "computing in bfloat16" in out
    # the cosine now decays over 9 steps, not 6: said in one line
    assert "--resume changes the learning-rate schedule: at step 6 the rate goes from " in out
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 3, 6, 9]
    resumed = json.loads((run / "config.resume-6.json").read_text())
    assert resumed["train"] == {**config["train"], "max_iters": 9, "lr_decay_iters": 9}
    assert resumed["model"] == {**config["model"], "dtype": "bfloat16"}
    assert resumed["data"] == config["data"]
    assert resumed["data"]["text_file"] == str(text_file)
    samples = (run / "samples.txt").read_text()
    assert samples.count("=== step") == 2 and "=== step 9" in samples
    # Nothing left to train: a sample is printed, but samples.txt gets no second entry.
    exp.main(["--run-dir", str(run), "--resume", "--max-iters", "9", "--max-new-tokens", "5"])
    assert (run / "samples.txt").read_text() == samples
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] \
        == [0, 3, 6, 9]


def test_planned_batch_size_of_a_resumed_run(tmp_path):
    from genjax.train.cli import planned_batch_size

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"preset": "cpu", "model": {},
                                                 "train": {"batch_size": 24}}))
    new = exp.Train(run_dir=str(run))
    assert planned_batch_size(new, exp.PRESETS, "cpu") == 12  # the preset's
    assert planned_batch_size(exp.Train(preset="lecture"), exp.PRESETS, "cpu") == 64
    resumed = exp.Train(run_dir=str(run), resume=True)
    assert planned_batch_size(resumed, exp.PRESETS, "cpu") == 24  # the saved run's
    given = exp.Train(run_dir=str(run), resume=True, batch_size=8)
    assert planned_batch_size(given, exp.PRESETS, "cpu") == 8


def test_a_resume_splits_the_host_as_the_run_did(tmp_path, monkeypatch):
    # A run started with --devices 4 on a 2-core host was split into 4 host devices; its
    # resume, without the flag, must be too (else: "--devices 4 exceeds the 2 available").
    import genjax.train.parallel as parallel
    from genjax.train.cli import start_run

    splits = []
    monkeypatch.setattr(parallel, "split_host_into_devices",
                        lambda batch, n=None: splits.append((batch, n)) or 0)
    run = tmp_path / "run"
    (run / "checkpoints" / "10").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(
        {"experiment": "gpt_shakespeare", "preset": "cpu", "model": {},
         "train": {"batch_size": 12, "devices": 4}}))
    start_run(exp.Train(run_dir=str(run), resume=True), 12, "gpt_shakespeare", check=False)
    start_run(exp.Train(run_dir=str(run), resume=True, devices=2), 12, "gpt_shakespeare",
              check=False)
    start_run(exp.Train(run_dir=str(run), resume=True, host_devices=3), 12, "gpt_shakespeare",
              check=False)
    start_run(exp.Train(run_dir=str(tmp_path / "new")), 12, "gpt_shakespeare", check=False)
    assert splits == [(12, 4), (12, 2), (12, 3), (12, None)]


def test_the_record_of_the_latest_start_is_the_one_resumed(tmp_path, capsys):
    import os

    from genjax.train.cli import resolve_configs, saved_config

    run = tmp_path / "run"
    run.mkdir()
    resumed = exp.Train(run_dir=str(run), resume=True)
    # No record at all: the preset, and a warning that says so.
    preset, model, train, saved = resolve_configs(resumed, exp.PRESETS, lambda: "cpu")
    assert saved is None and train.batch_size == 12
    assert "no config.json" in capsys.readouterr().out

    def record(name, batch, mtime):
        path = run / name
        path.write_text(json.dumps({"preset": "cpu", "model": {}, "train": {"batch_size": batch}}))
        os.utime(path, ns=(mtime, mtime))

    record("config.json", 4, 10**18)
    record("config.resume-250.json", 8, 10**18 + 2)
    record("config.resume-1000.json", 16, 10**18 + 1)
    assert saved_config(resumed)["train"]["batch_size"] == 8  # the newest start
    for name in ("config.json", "config.resume-250.json", "config.resume-1000.json"):
        os.utime(run / name, ns=(10**18, 10**18))  # a copy that reset the times
    assert saved_config(resumed)["train"]["batch_size"] == 16  # then the latest step
    assert resolve_configs(resumed, exp.PRESETS, lambda: "cpu")[2].batch_size == 16
    # Records say when their start began: that decides, whatever the files' times (a
    # `cp -r` gives them new ones in the order it copies).
    for name, started in (("config.json", "2026-01-01T10:00:00+00:00"),
                          ("config.resume-1000.json", "2026-01-01T11:00:00+00:00"),
                          ("config.resume-250.json", "2026-01-01T12:00:00+00:00")):
        path = run / name
        path.write_text(json.dumps({**json.loads(path.read_text()), "started": started}))
    os.utime(run / "config.json", ns=(10**18 + 5, 10**18 + 5))  # copied last
    assert saved_config(resumed)["train"]["batch_size"] == 8  # the newest start: 250
    # A record of an older genjax (no `started`) predates every record that has one.
    path = run / "config.resume-250.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items()
                                if k != "started"}))
    os.utime(path, ns=(10**18 + 9, 10**18 + 9))
    assert saved_config(resumed)["train"]["batch_size"] == 16  # 1000's start, the newest
    (run / "config.resume-2000.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.resume-2000.json is not a run's config record"):
        saved_config(resumed)


def test_cli_errors_are_clear(tmp_path, text_file):
    # (config fields written as the flags they are)
    with pytest.raises(SystemExit, match="--n-embd 30 is not divisible by --n-head 4"):
        exp.main(["--text-file", str(text_file), "--run-dir", str(tmp_path / "r"),
                  "--n-embd", "30", "--n-head", "4"])
    with pytest.raises(SystemExit, match="global batch size 10 is not divisible by the 8"):
        exp.main(["--text-file", str(text_file), "--run-dir", str(tmp_path / "r"),
                  *TINY_FLAGS, "--batch-size", "10"])
    with pytest.raises(SystemExit, match="--max-new-tokens must be >= 0, got -1"):
        exp.main(["--text-file", str(text_file), "--run-dir", str(tmp_path / "r"),
                  *TINY_FLAGS, "--max-new-tokens", "-1"])  # refused before training
    with pytest.raises(SystemExit, match="--host-devices must be a positive integer, got 0"):
        exp.main(["--text-file", str(text_file), "--run-dir", str(tmp_path / "r"),
                  *TINY_FLAGS, "--host-devices", "0"])
    with pytest.raises(SystemExit, match="--warmup-iters: this preset's learning rate is "
                                         "constant"):
        exp.main(["--preset", "lecture", "--text-file", str(text_file), "--run-dir",
                  str(tmp_path / "r"), *TINY_FLAGS])
    with pytest.raises(SystemExit, match="no checkpoint"):
        exp.main(["sample", "--run-dir", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit, match="--resume needs --run-dir DIR"):
        exp.main(["--resume", *TINY_FLAGS])
    with pytest.raises(SystemExit, match="--devices 2: the global batch 7 is not divisible by 2 "
                                         "devices"):  # before the data set loads
        exp.main(["--data-dir", str(tmp_path / "no-such-folder"), "--run-dir",
                  str(tmp_path / "r"), "--batch-size", "7", "--devices", "2"])
    assert not (tmp_path / "r").exists()
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match="afile is a file, not a directory; choose another "
                                         "--run-dir"):
        exp.main(["--run-dir", str(tmp_path / "afile" / "run"), *TINY_FLAGS])


def test_accelerator_presets_on_a_cpu_warn(capsys):
    exp.resolve(exp.Train(preset="lecture"))
    out = capsys.readouterr().out
    assert "warning: preset lecture is meant for a GPU or TPU" in out
    exp.resolve(exp.Train(preset="cpu"))
    assert "warning" not in capsys.readouterr().out


def test_presets_match_the_issue():
    model, train = exp.PRESETS["lecture"]
    assert (model.block_size, model.n_layer, model.n_head, model.n_embd, model.dropout) == \
        (256, 6, 6, 384, 0.2)
    assert (train.batch_size, train.max_iters, train.eval_interval, train.eval_iters,
            train.learning_rate, train.lr_schedule, train.seed) == \
        (64, 5000, 500, 200, 3e-4, "constant", 1337)
    model, train = exp.PRESETS["cpu"]
    assert (model.block_size, model.n_layer, model.n_head, model.n_embd, model.dropout) == \
        (64, 4, 4, 128, 0.0)
    assert (train.batch_size, train.max_iters, train.eval_interval, train.eval_iters,
            train.learning_rate, train.min_lr, train.warmup_iters, train.beta2,
            train.weight_decay, train.weight_decay_on, train.grad_clip) == \
        (12, 2000, 250, 20, 1e-3, 1e-4, 100, 0.99, 0.1, "matrices", 1.0)
    assert exp.default_preset() == "cpu"  # tests run on CPU


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "experiments.gpt_shakespeare", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    # the top-level help is the default command's, with a line naming the other
    assert "python -m experiments.gpt_shakespeare sample --help" in out.stdout
    assert "(required)" not in out.stdout and "--max-iters" in out.stdout
    flat = " ".join(line.strip("│ ") for line in out.stdout.splitlines())
    assert "cpu: --block-size 64, --n-layer 4" in flat  # the presets' values
    assert "lecture: --block-size 256" in flat
    out = subprocess.run([sys.executable, "-m", "experiments.gpt_shakespeare", "train", "--help"],
                         capture_output=True, text=True, timeout=120)
    for flag in ("--preset", "--max-iters", "--eval-interval", "--eval-iters", "--batch-size",
                 "--block-size", "--n-layer", "--n-head", "--n-embd", "--dropout",
                 "--learning-rate", "--seed", "--data-dir", "--text-file", "--run-dir",
                 "--resume", "--parallel", "--devices"):
        assert flag in out.stdout, flag
    # Unset flags take the preset's value (or the resumed run's): the help says so.
    assert "(default: None)" not in out.stdout
    assert "(default: the preset's; on --resume, the run's)" in " ".join(
        line.strip("│ ") for line in out.stdout.splitlines())


def test_unknown_flags_and_demo_help(capsys):
    with pytest.raises(SystemExit) as info:
        exp.main(["--lerning-rate", "1"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: unknown flag --lerning-rate; did you mean --learning-rate? All flags: "
        "python -m experiments.gpt_shakespeare train --help")
    with pytest.raises(SystemExit):  # the field's abbreviation, not the nearest spelling
        exp.main(["--lr", "1e-3"])
    assert "unknown flag --lr; did you mean --learning-rate?" in capsys.readouterr().err
    from experiments import transposed_convolution, vae_mnist

    with pytest.raises(SystemExit):
        vae_mnist.main(["--latnt-dim", "2"])
    assert "did you mean --latent-dim? All flags: python -m experiments.vae_mnist --help" \
        in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # help, not the demo
        transposed_convolution.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "worked through with printed matrices" in out and "input (2x2)" not in out
    from genjax.train.cli import _refuse_unknown_flags  # as tyro reads them:

    _refuse_unknown_flags(exp.Train, ["--max_iters", "3", "--no_resume", "--data-dir=x"], "p")
    _refuse_unknown_flags(exp.Sample, ["--prompt", "--- ACT I ---", "--run-dir", "d"], "p")
    with pytest.raises(SystemExit, match="--learning-rate must be a finite number, got nan"):
        exp.main(["--learning-rate", "nan", "--run-dir", "/nonexistent/never"])
    # A value its flag cannot take: one line, before anything starts (not tyro's box).
    for argv, line in ((["--preset", "gpu"], "--preset gpu: choose one of cpu, lecture; did "
                        "you mean lecture?"),
                       (["--preset=CPU"], "--preset CPU: choose one of cpu, lecture; did you "
                        "mean cpu?"),
                       (["--max-iters", "abc"], "--max-iters abc: not an integer"),
                       (["--parallel", "fsd"], "--parallel fsd: choose one of pmap, sharding, "
                        "fsdp, none; did you mean fsdp?"),
                       (["sample", "--run-dir", "d", "--temperature", "hot"],
                        "--temperature hot: not a number")):
        with pytest.raises(SystemExit) as info:
            exp.main(argv)
        assert info.value.code == 2 and capsys.readouterr().err.strip() == "error: " + line
    _refuse_unknown_flags(exp.Train, ["--max-iters", "None", "--learning-rate", "3e-4"], "p")


def test_compile_cache_flag(tmp_path, monkeypatch):
    import jax

    from genjax.train.cli import enable_compile_cache

    configured = jax.config.jax_compilation_cache_dir  # the tests' own cache (conftest)
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    try:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # JAX's default
        assert enable_compile_cache(None) == pathlib.Path(configured)  # kept, not replaced
        assert enable_compile_cache("none") is None
        assert jax.config.jax_compilation_cache_dir is None
        monkeypatch.setenv("GENJAX_COMPILE_CACHE", str(tmp_path / "env"))
        assert enable_compile_cache(None) == tmp_path / "env"
        assert enable_compile_cache(str(tmp_path / "flag")) == tmp_path / "flag"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "flag")
        # the sampling loop (0.9 s to build) is cached too
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.25
    finally:
        jax.config.update("jax_compilation_cache_dir", configured)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)


def test_resume_past_a_checkpoint_with_lost_files_is_quiet(tmp_path, text_file):
    # When the newest checkpoint's array files are gone, Orbax's failed restore leaves reads
    # in flight whose errors ("Event loop is closed", TensorStore read errors) used to
    # reach stderr as tracebacks, from a few to hundreds, after the one clear warning.
    run = tmp_path / "run"
    exp.main(["--preset", "cpu", "--text-file", str(text_file), "--run-dir", str(run),
              *TINY_FLAGS])
    state = run / "checkpoints" / "6" / "state"
    lost = list(state.glob("d/*")) + list(state.glob("ocdbt.process_*/d/*"))  # array data
    assert lost
    for path in lost:
        path.unlink()
    cmd = [sys.executable, "-m", "experiments.gpt_shakespeare", "--run-dir", str(run),
           "--resume", "--max-iters", "9", "--max-new-tokens", "5",
           "--compile-cache", jax.config.jax_compilation_cache_dir]
    # This run trains as users do: without the suite's XLA backend optimisation level 0.
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_backend_optimization_level=0", "")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "XLA_FLAGS": flags})
    assert out.returncode == 0, out.stderr[-3000:]
    warning = [l for l in out.stdout.splitlines() if "checkpoint at step 6 is unreadable" in l]
    # One line, naming TensorStore's error rather than Orbax's generic wrapper of it.
    assert len(warning) == 1 and "/checkpoints/6/state" in warning[0], out.stdout
    assert "Encountered error while reading" not in warning[0], warning
    assert "resumed" in out.stdout and "from step 3" in out.stdout
    assert "Traceback" not in out.stderr and "never retrieved" not in out.stderr, out.stderr


def _start_training(run, text_file, *extra, env=None):
    """The GPT experiment in its own process on a tiny config, output merged and unbuffered."""
    cmd = [sys.executable, "-u", "-m", "experiments.gpt_shakespeare", "--text-file",
           str(text_file), "--run-dir", str(run), "--max-iters", "100000", "--eval-interval",
           "40", "--eval-iters", "2", "--batch-size", "8", "--block-size", "16", "--n-layer",
           "1", "--n-head", "2", "--n-embd", "16", "--warmup-iters", "1", "--host-devices", "1",
           *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "XLA_FLAGS": "", "TQDM_DISABLE": "1",
                                 **(env or {})})


def test_sigint_stops_a_run_at_any_moment(tmp_path, text_file):
    # Moments: while the train step compiles (just after the engine line, before step 0's
    # evaluation ends), right after the first evaluation, and after a checkpoint.
    # And SIGTERM (kill, timeout, a scheduler's stop) after a checkpoint, as Ctrl-C.
    triggers = {"compiling": "gpt: ", "first_eval": "step 0:", "later": "step 40:",
                "sigterm": "step 40:"}
    procs = {name: _start_training(tmp_path / name, text_file) for name in triggers}
    for name, proc in procs.items():
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(triggers[name]):
                proc.send_signal(signal.SIGTERM if name == "sigterm" else signal.SIGINT)
                break
        out = "".join(seen) + proc.communicate(timeout=60)[0]
        assert proc.returncode == (143 if name == "sigterm" else 130), (name, out)
        assert "Traceback" not in out and "Exception ignored" not in out, (name, out)
        lines = [l for l in out.splitlines() if "interrupted" in l]
        assert len(lines) == 1, (name, out)  # (stdout and stderr are one pipe here)
        assert lines[0].startswith("interrupted (SIGTERM) after step" if name == "sigterm"
                                   else "interrupted after step"), (name, out)
        if name == "compiling":  # stopped at step 0: nothing to resume, so nothing left
            assert lines[0].startswith("interrupted after step 0; no checkpoint was saved, so "
                                       "there is nothing to resume: removed what this run "
                                       "wrote"), out
            assert not (tmp_path / name).exists()
        if name in ("later", "sigterm"):  # (it may have gone on while others were read)
            found = re.search(r"the latest checkpoint is step (\d+): continue with --resume",
                              lines[0])
            assert found and int(found[1]) >= 40 and int(found[1]) % 40 == 0, out


def test_ctrl_c_while_starting_is_one_line_and_never_lost():
    # `python -m ...` installs genjax._interrupt when genjax is imported (here by hand: the
    # first argv entry is "-m" while Python locates the module). A Ctrl-C that no command
    # handles is one line and the SIGINT status, not a traceback.
    # (SIGINT as Python finds it from an interactive shell, even where pytest was started
    # with it ignored, as a non-interactive shell's `... &` does)
    start = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
             "import sys; sys.argv[:1] = ['-m']; import genjax, os, signal, time\n")
    out = subprocess.run([sys.executable, "-c", start + "os.kill(os.getpid(), signal.SIGINT)\n"
                          "time.sleep(30)"], capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGINT and out.stderr == "interrupted\n", out
    # One landing where Python cannot raise it (a garbage-collector callback, as JAX
    # registers, or a __del__) would be printed as "Exception ignored" and dropped, and
    # the run would go on: it is delivered again.
    for where in ("gc.callbacks.append(lambda phase, info: signal.raise_signal(2))\n"
                  "gc.collect()\n",
                  "class A:\n    def __del__(self): signal.raise_signal(signal.SIGINT)\n"
                  "A()\n"):
        code = start + "import gc\n" + where + "time.sleep(30)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == -signal.SIGINT and out.stderr == "interrupted\n", out
    # An error that the Ctrl-C caused (a C extension whose start-up it interrupted fails
    # with "ImportError: initialization failed"): the same line, exit status 130.
    code = start + ("try:\n    signal.raise_signal(signal.SIGINT)\nexcept KeyboardInterrupt:\n"
                    "    pass\nraise ImportError('initialization failed')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 130 and out.stderr == "interrupted\n", out


def test_a_closed_output_stops_a_run_as_ctrl_c(tmp_path, text_file):
    # `| head`: the reader of standard output leaves. Lines reach it as they are written
    # (line-buffered even without -u), and the run then stops at its next step, saying on
    # stderr where it stands, instead of failing with "[Errno 32] Broken pipe".
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.gpt_shakespeare", "--text-file", str(text_file),
           "--run-dir", str(run), "--max-iters", "100000", "--eval-interval", "40",
           "--eval-iters", "2", "--batch-size", "8", "--block-size", "16", "--n-layer", "1",
           "--n-head", "2", "--n-embd", "16", "--warmup-iters", "1", "--host-devices", "1"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, "XLA_FLAGS": "", "TQDM_DISABLE": "1"})
    timer = threading.Timer(120, proc.kill)  # block-buffered, "step 40:" would not come
    timer.start()
    try:
        for line in proc.stdout:
            if line.startswith("step 40:"):
                break
        proc.stdout.close()  # the reader goes
        err = proc.communicate(timeout=60)[1]
    finally:
        timer.cancel()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Broken pipe" not in err and "Exception" not in err, err
    (line,) = err.strip().splitlines()
    found = re.fullmatch(r"stopped \(standard output was closed\) after step \d+; the latest "
                         r"checkpoint is step (\d+): continue with --resume --run-dir .*", line)
    assert found and int(found[1]) % 40 == 0 and saved_steps(run)[-1] == int(found[1]), err


def test_run_command_withdraws_its_stop_and_gives_stdout_back():
    from genjax.train import loop
    from genjax.train.cli import run_command

    stdout = sys.stdout
    assert run_command(lambda args: loop.request_stop("reason") or args, 7) == 7
    assert loop._STOP["reason"] is None and sys.stdout is stdout


def test_the_reader_gone_guard_discards_output_and_asks_for_a_stop():
    from genjax.train import loop
    from genjax.train.cli import _ReaderGoneGuard

    read, write = os.pipe()
    os.close(read)  # (| head, gone)
    guard = _ReaderGoneGuard(os.fdopen(write, "w"))
    try:
        guard.write("step 40: ...\n")
        guard.flush()  # would raise BrokenPipeError
        assert guard.gone and loop._STOP["reason"] == "standard output was closed"
        assert guard.write("more\n") == 5 and guard.flush() is None  # (to /dev/null now)
        devnull = os.open(os.devnull, os.O_WRONLY)
        assert os.path.sameopenfile(guard.fileno(), devnull)
        os.close(devnull)
    finally:
        loop.request_stop(None)
        guard.close()


def test_a_run_asked_to_stop_before_training_writes_nothing(tmp_path, text_file, capsys):
    from genjax.train import loop

    run = tmp_path / "run"
    loop.request_stop("standard output was closed")  # (as the reader leaving would)
    try:
        with pytest.raises(SystemExit) as exit_:
            exp.main(["--text-file", str(text_file), "--run-dir", str(run), *TINY_FLAGS])
    finally:
        loop.request_stop(None)
    assert exit_.value.code == 130 and not run.exists()
    assert (f"stopped before training: standard output was closed; nothing was written in "
            f"{run}") in capsys.readouterr().err


def test_a_diverging_run_stops_at_its_first_non_finite_loss(tmp_path, text_file):
    run = tmp_path / "run"
    proc = _start_training(run, text_file, "--learning-rate", "1e6", "--max-iters", "400",
                           "--eval-interval", "2")
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, out
    (line,) = [l for l in out.splitlines() if "diverged" in l]
    assert line.startswith("error: the run diverged: ") and "at step" in line, out
    assert "Nothing non-finite was saved" in line
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(all(v == v for v in r.values() if isinstance(v, float)) for r in records)
    if saved_steps(run):  # the checkpoint named holds finite parameters
        step, state, _ = load_latest(run)
        assert f"the last good checkpoint is step {step}" in line
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["train"]))


def test_short_runs_scale_the_presets_warmup(capsys):
    _, _, train, _, _ = exp.resolve(exp.Train(preset="cpu", max_iters=50))
    assert (train.warmup_iters, train.lr_decay_iters) == (2, 50)  # 100/2000 of the run
    assert "--max-iters 50 is within the preset's 100-step warm-up: warming up for 2 steps" \
        in capsys.readouterr().out
    _, _, train, _, _ = exp.resolve(exp.Train(preset="cpu", max_iters=10))
    assert train.warmup_iters == 0 and "warm-up: no warm-up instead" in capsys.readouterr().out
    _, _, train, _, _ = exp.resolve(exp.Train(preset="cpu", max_iters=500))
    assert train.warmup_iters == 100  # it fits: unchanged
    from genjax.train.cli import schedule_over_run  # a resume: the run's warm-up and share

    run = dataclasses.replace(exp.PRESETS["cpu"][1], max_iters=300, lr_decay_iters=300)
    shorter = schedule_over_run(dataclasses.replace(run, max_iters=50),
                                exp.Train(run_dir="r", resume=True, max_iters=50), base=run)
    assert shorter.warmup_iters == 16 and "--max-iters 50 is within the run's 100-step " \
        "warm-up: warming up for 16 steps" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--warmup-iters 60 must be below --max-iters 50"):
        exp.resolve(exp.Train(preset="cpu", max_iters=50, warmup_iters=60))


def test_checkpoints_are_checked_before_sampling():
    import jax.numpy as jnp

    from genjax.tasks.gpt import config_from_checkpoint

    model = {"vocab_size": 3, "block_size": 4, "n_layer": 1, "n_head": 1, "n_embd": 4,
             "dropout": 0.0}
    params = {"token_embedding_table": {"embedding": jnp.zeros((3, 4))},
              "lm_head": {"kernel": jnp.zeros((4, 3))}}
    meta = {"family": "gpt", "model": model, "vocab": "abc"}
    assert config_from_checkpoint(meta, params).vocab_size == 3
    with pytest.raises(ValueError, match="the saved vocabulary 4, the model config's vocab_size "
                                         "3, the token embedding's rows 3"):
        config_from_checkpoint({**meta, "vocab": "abcd"}, params)
    with pytest.raises(ValueError, match="the saved vocabulary 3, the model config's vocab_size "
                                         "5, the token embedding's rows 3, lm_head's outputs 3"):
        config_from_checkpoint({**meta, "model": {**model, "vocab_size": 5}}, params)
    with pytest.raises(ValueError, match="holds a 'vae' model, not a GPT"):
        config_from_checkpoint({**meta, "family": "vae"}, params)
    from genjax.data.text import CharTokenizer

    with pytest.raises(ValueError, match="ids must be integers in \\[0, 3\\), got dtype float"):
        CharTokenizer("abc").decode([1.5])
    assert CharTokenizer("abc").decode([]) == ""


def test_a_log_file_gets_plain_lines(tmp_path, text_file):
    # stderr not a terminal (> log 2>&1): no carriage-return bar, a plain line every few
    # steps and one per evaluation, each on its own line; TQDM_DISABLE unset
    run = tmp_path / "run"
    proc = _start_training(run, text_file, "--max-iters", "60", "--eval-interval", "30",
                           env={"TQDM_DISABLE": ""})
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "\r" not in out
    lines = out.splitlines()
    assert [l.split(":")[0] for l in lines if l.startswith("step ")] == [
        "step 0", "step 10/60", "step 20/60", "step 30/60", "step 30", "step 40/60",
        "step 50/60", "step 60/60", "step 60"]
    assert all(len(l) < 200 for l in lines)
    assert (run / "loss.png").stat().st_size > 5000


def test_plot_overlays_runs(tmp_path, capsys):
    from genjax import plot

    for name, scale in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "train_loss": scale / (s + 1), "val_loss": scale / (s + 2),
                        "lr": 1e-3}) + "\n" for s in range(0, 50, 10)))
    out = plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c.png")])
    assert out.stat().st_size > 5000
    with pytest.raises(SystemExit, match="error: .*nowhere: no metrics.jsonl"):
        plot.main([str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="error: give at least one RUN_DIR"):
        plot.main(["--out", str(tmp_path / "d.png")])
    assert not (tmp_path / "d.png").exists()


def test_the_data_folder_from_the_environment_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("GENJAX_DATA_DIR", str(tmp_path / "a" / ".." / "data"))
    _, _, _, data, max_new_tokens = exp.resolve(exp.Train(preset="cpu"))
    assert data == {"data_dir": str((tmp_path / "data").resolve()), "text_file": None}
    assert max_new_tokens == 500
    _, _, _, data, _ = exp.resolve(exp.Train(preset="cpu", text_file="x.txt"))
    assert data["data_dir"] is None  # a text file is what the run trains on
