import dataclasses
import datetime
import importlib.util
import json
import math

import jax
import numpy as np
import pytest

from genjax.train.checkpoint import CheckpointError, saved_steps
from genjax.train.loop import fit
from helpers import tiny_gpt_task, tiny_train_config, with_


def leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_tiny_model_overfits_a_short_text(tmp_path):
    text = "To be, or not to be, that is the question.\n" * 8
    task, _, _ = tiny_gpt_task(text, block_size=16, n_layer=2, n_head=2, n_embd=32)
    cfg = tiny_train_config(max_iters=300, eval_interval=300, learning_rate=1e-2,
                            weight_decay=0.0)
    result = fit(task, cfg, tmp_path / "run", progress=False)
    first, last = result.history[0], result.history[-1]
    assert abs(first["train_loss"] - math.log(task.meta["model"]["vocab_size"])) < 0.1
    assert last["step"] == 300
    assert last["train_loss"] < 0.2, last  # the short text is memorised


def test_bfloat16_run_keeps_float32_state_and_follows_the_float32_run(tmp_path, play_text):
    cfg = tiny_train_config(max_iters=200, eval_interval=200, eval_iters=4, weight_decay=0.0,
                            learning_rate=1e-3)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        task, _, _ = tiny_gpt_task(play_text, n_embd=32, dtype=dtype)
        runs[dtype] = fit(task, cfg, tmp_path / dtype, progress=False)
    state = runs["bfloat16"].state
    for tree in (state.params, state.opt_state):
        assert {leaf.dtype for leaf in jax.tree.leaves(tree)
                if np.issubdtype(leaf.dtype, np.floating)} == {np.dtype(np.float32)}
    f32, bf16 = runs["float32"].history[-1], runs["bfloat16"].history[-1]
    assert f32["step"] == bf16["step"] == 200
    assert math.isfinite(bf16["train_loss"]) and math.isfinite(bf16["val_loss"])
    assert bf16["train_loss"] < runs["bfloat16"].history[0]["train_loss"] - 0.5  # it learns
    assert abs(bf16["train_loss"] - f32["train_loss"]) < 0.05, (f32, bf16)
    assert abs(bf16["val_loss"] - f32["val_loss"]) < 0.05, (f32, bf16)
    # a float32 checkpoint resumes in bfloat16: the compute dtype is not the checkpoint's
    task, _, _ = tiny_gpt_task(play_text, n_embd=32, dtype="bfloat16")
    resumed = fit(task, with_(cfg, max_iters=204), tmp_path / "float32", resume=True,
                  progress=False)
    assert int(resumed.state.step) == 204


def test_run_dir_records(tmp_path, play_text, monkeypatch):
    import genjax.train.loop as loop

    tuned = []  # fit tunes the host's malloc on CPU devices (genjax.train.host)
    monkeypatch.setattr(loop, "tune_host_allocator", lambda: tuned.append(1) or True)
    task, _, _ = tiny_gpt_task(play_text)
    run = tmp_path / "run"
    fit(task, tiny_train_config(), run, config_record={"hello": 1}, progress=False)
    assert tuned == [1]
    record = json.loads((run / "config.json").read_text())
    started = datetime.datetime.fromisoformat(record.pop("started"))  # when this start began
    assert record == {"hello": 1}
    assert abs((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()) < 600
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 4, 8]
    for key in ("train_loss", "val_loss", "elapsed_s", "lr"):
        assert all(key in r for r in records)
    assert all("tokens_per_s" in r and r["tokens_per_s"] > 0 for r in records[1:])
    assert saved_steps(run) == [4, 8]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_resumed_run_equals_uninterrupted_run(tmp_path, play_text, dropout):
    task, _, _ = tiny_gpt_task(play_text, dropout=dropout)
    full = fit(task, tiny_train_config(max_iters=8), tmp_path / "full", progress=False)
    fit(task, tiny_train_config(max_iters=4), tmp_path / "split", progress=False)
    resumed = fit(task, tiny_train_config(max_iters=8), tmp_path / "split", resume=True,
                  progress=False)
    assert int(resumed.state.step) == 8
    assert resumed.history[-1]["step"] == full.history[-1]["step"] == 8
    for key in ("train_loss", "val_loss", "batch_loss"):
        assert resumed.history[-1][key] == full.history[-1][key]
    leaves_equal(full.state.params, resumed.state.params)
    leaves_equal(full.state.opt_state, resumed.state.opt_state)


def test_new_run_over_checkpoints_is_refused_and_touches_nothing(tmp_path, play_text):
    task, _, _ = tiny_gpt_task(play_text)
    run = tmp_path / "run"
    fit(task, tiny_train_config(max_iters=4), run, progress=False)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    with pytest.raises(FileExistsError, match="already holds checkpoints .* pass --resume"):
        fit(task, tiny_train_config(max_iters=4), run, progress=False)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_new_run_over_records_of_a_run_without_checkpoint_is_refused(tmp_path, play_text):
    # A run stopped before its first checkpoint leaves config.json and metrics.jsonl; a new
    # run there would overwrite the one and append to the other.
    task, _, _ = tiny_gpt_task(play_text)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0, "val_loss": 4.2}\n')
    (run / "config.json").write_text('{"hello": 1}\n')
    before = {p: p.read_bytes() for p in run.rglob("*")}
    with pytest.raises(FileExistsError, match="holds config.json and metrics.jsonl of a run "
                                              "that saved no checkpoint"):
        fit(task, tiny_train_config(max_iters=4), run, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint .* a run stopped before its "
                                                "first checkpoint: choose another --run-dir"):
        fit(task, tiny_train_config(max_iters=4), run, resume=True, progress=False)
    assert {p: p.read_bytes() for p in run.rglob("*")} == before


def test_a_run_stopped_before_its_first_checkpoint_removes_only_what_it_wrote(
        tmp_path, play_text, capsys):
    from genjax.train import loop

    task, _, _ = tiny_gpt_task(play_text)
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)  # the directory's own, before the run
    (run / "notes.txt").write_text("mine\n")

    def log(line):  # the first evaluation's line: stop (as a closed output asks)
        if line.startswith("step 0:"):
            loop.request_stop("standard output was closed")

    try:
        with pytest.raises(loop.RunInterrupted):
            fit(task, tiny_train_config(max_iters=4, eval_interval=2), run, log=log,
                progress=False, plot=True, config_record={"hello": 1})
    finally:
        loop.request_stop(None)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt", "tensorboard"]
    assert (f"stopped (standard output was closed) after step 0; no checkpoint was saved, so "
            f"there is nothing to resume: removed what this run wrote in {run} (config.json, "
            f"metrics.jsonl, loss.png, checkpoints)") in capsys.readouterr().err
    fit(task, tiny_train_config(max_iters=4, eval_interval=2), run, progress=False)  # again


def test_resume_without_checkpoint_is_refused(tmp_path, play_text):
    task, _, _ = tiny_gpt_task(play_text)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fit(task, tiny_train_config(), tmp_path / "empty", resume=True, progress=False)
    assert not (tmp_path / "empty").exists()


def test_resume_with_another_model_config_names_the_difference(tmp_path, play_text):
    task, _, _ = tiny_gpt_task(play_text, n_embd=16)
    run = tmp_path / "run"
    fit(task, tiny_train_config(max_iters=4), run, progress=False)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    other, _, _ = tiny_gpt_task(play_text, n_embd=32)
    with pytest.raises(CheckpointError, match="n_embd: checkpoint 16 vs requested 32"):
        fit(other, tiny_train_config(max_iters=8), run, resume=True, progress=False)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_resume_on_another_vocabulary_is_refused(tmp_path, play_text):
    # The same number of characters, but one of them another: the ids would mean other
    # characters after the resume.
    assert "@" not in play_text
    task, _, data = tiny_gpt_task(play_text)
    run = tmp_path / "run"
    fit(task, tiny_train_config(max_iters=4), run, progress=False)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    other, _, other_data = tiny_gpt_task(play_text.replace("a", "@"))
    assert other_data.tokenizer.vocab_size == data.tokenizer.vocab_size
    with pytest.raises(CheckpointError, match="checkpoint's vocab differs"):
        fit(other, tiny_train_config(max_iters=8), run, resume=True, progress=False)
    # A text with one more character changes vocab_size too: the data is named, not the
    # model flags that the user did not change.
    longer, _, longer_data = tiny_gpt_task(play_text + "@")
    assert longer_data.tokenizer.vocab_size == data.tokenizer.vocab_size + 1
    with pytest.raises(CheckpointError, match="checkpoint's vocab differs .* resume on the "
                                              "same data"):
        fit(longer, tiny_train_config(max_iters=8), run, resume=True, progress=False)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_interrupted_run_says_how_to_continue(tmp_path, play_text):
    task, _, _ = tiny_gpt_task(play_text)

    def interrupt(params, key, step):  # Ctrl-C during the evaluation at step 8
        if step == 8:
            raise KeyboardInterrupt
        return {}

    run = tmp_path / "run"
    messages = []
    record = {"train": {"max_iters": 12}}
    with pytest.raises(KeyboardInterrupt):
        fit(dataclasses.replace(task, report=interrupt), tiny_train_config(max_iters=12), run,
            progress=False, log=messages.append, config_record=record)
    assert messages[-1] == (f"interrupted after step 8; the latest checkpoint is step 4: "
                            f"continue with --resume --run-dir {run}")
    assert saved_steps(run) == [4]
    # --resume with the same config continues without a second record of it
    with pytest.raises(KeyboardInterrupt):
        fit(dataclasses.replace(task, report=interrupt), tiny_train_config(max_iters=12), run,
            resume=True, progress=False, config_record=record)
    assert sorted(p.name for p in run.glob("config*")) == ["config.json"]

    from genjax.train.cli import run_command

    def stop(args):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:  # one line on stderr, no traceback
        run_command(stop, None)
    assert exit_info.value.code == 130


def test_resume_at_max_iters_says_there_is_nothing_to_train(tmp_path, play_text):
    task, _, _ = tiny_gpt_task(play_text)
    run = tmp_path / "run"
    fit(task, tiny_train_config(max_iters=4), run, progress=False)
    messages = []
    result = fit(task, tiny_train_config(max_iters=4), run, resume=True, progress=False,
                 log=messages.append, config_record={"max_iters": 4})
    assert int(result.state.step) == 4 and saved_steps(run) == [4]
    assert not list(run.glob("config.resume-*.json"))  # a resume that did nothing records nothing
    assert result.start_step == 4 and result.history == []
    assert any("at step 4, at or past --max-iters 4: nothing to train" in m
               for m in messages), messages


def test_unreadable_latest_checkpoint_falls_back_to_the_previous(tmp_path, play_text):
    task, _, _ = tiny_gpt_task(play_text)
    run = tmp_path / "run"
    fit(task, tiny_train_config(max_iters=8), run, progress=False)
    assert saved_steps(run) == [4, 8]
    state_dir = run / "checkpoints" / "8" / "state"
    for path in state_dir.rglob("*"):  # truncate the array data of step 8
        if path.is_file() and "manifest" not in path.name and path.stat().st_size > 100:
            path.write_bytes(path.read_bytes()[:10])
    messages = []
    result = fit(task, tiny_train_config(max_iters=8), run, resume=True, progress=False,
                 log=messages.append)
    assert any("checkpoint at step 8 is unreadable" in m for m in messages), messages
    assert any("resumed" in m and "from step 4" in m for m in messages), messages
    assert int(result.state.step) == 8
    aside = list((run / "checkpoints_unreadable").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("8-")  # kept, not deleted
    # The first run's record of step 8 is moved aside, not logged twice.
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 4, 8]
    superseded = list(run.glob("metrics.superseded-*.jsonl"))
    assert len(superseded) == 1
    assert [json.loads(l)["step"] for l in superseded[0].read_text().splitlines()] == [8]
    assert any("moved them to metrics.superseded-" in m for m in messages), messages


def test_no_recompilation_after_the_first_step_nor_for_another_schedule(tmp_path, play_text):
    compiles, misses = [], []
    active = [True]

    def on_duration(event, duration, **kw):
        if active[0] and event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    def on_event(event, **kw):
        if active[0] and event == "/jax/compilation_cache/cache_misses":
            misses.append(event)

    task, _, _ = tiny_gpt_task(play_text)
    cosine = dict(lr_schedule="cosine", eval_interval=4)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    try:
        fit(task, tiny_train_config(max_iters=4, warmup_iters=1, lr_decay_iters=4, **cosine),
            tmp_path / "a", progress=False)
        n_short = len(compiles)
        misses.clear()
        fit(task, tiny_train_config(max_iters=12, warmup_iters=3, lr_decay_iters=12,
                                    learning_rate=1e-3, min_lr=1e-4, **cosine),
            tmp_path / "b", progress=False)
        n_long = len(compiles) - n_short
    finally:
        active[0] = False
        jax.monitoring.unregister_event_duration_listener(on_duration)
        jax.monitoring.unregister_event_listener(on_event)
    # Each fit compiles its steps afresh; three times the steps add no compilation.
    assert 0 < n_long <= n_short
    # The schedule's numbers (steps, rates) are arguments of the compiled step, not
    # constants: the longer run's programs are the short run's, from the persistent cache.
    assert misses == []


def test_a_long_run_says_how_long_after_its_first_steps(tmp_path, play_text, monkeypatch):
    from genjax.train import loop

    task, _, _ = tiny_gpt_task(play_text)
    monkeypatch.setattr(loop, "LONG_RUN_S", 0.0)  # every run counts as long
    messages = []
    fit(task, tiny_train_config(max_iters=8), tmp_path / "run", progress=False,
        log=messages.append)
    (line,) = [m for m in messages if m.startswith("warning: about")]
    assert "s per step here: the 5 steps left take about" in line


def test_tensorboard_event_files(tmp_path, play_text, monkeypatch):
    task, _, _ = tiny_gpt_task(play_text)
    if importlib.util.find_spec("tensorboardX") is not None:
        fit(task, tiny_train_config(), tmp_path / "run", progress=False, tensorboard=True)
        (events,) = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
        assert events.stat().st_size > 100
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="--tensorboard needs tensorboardX: pip install"):
        fit(task, tiny_train_config(), tmp_path / "r2", progress=False, tensorboard=True)
    assert not (tmp_path / "r2").exists()
