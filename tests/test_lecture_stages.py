"""The lecture's stages (``--stage``) and its averaging trick."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import gpt_shakespeare as exp
from experiments import self_attention_trick
from genjax.models.gpt import (GPT, STAGES, GPTConfig, average_past_loop, average_past_matmul,
                               average_past_softmax, count_params)

# Parameter counts of the lecture's models on Tiny Shakespeare's 65 characters, with the
# lecture's sizes for each stage (n_embd 32, block 8, 4 heads, 3 blocks; the full model's).
LECTURE_COUNTS = {
    "bigram": 65 * 65,                                  # the (V, V) table
    "head": 65 * 32 + 8 * 32 + 3 * 32 * 32 + 32 * 65 + 65,  # embeddings, q/k/v, lm_head
    "multihead": 7_553,                                  # 4 heads of 8: the same q/k/v sizes
    "ffwd": 7_553 + 32 * 32 + 32,                        # + one C -> C layer
    "residual": 2_080 + 256 + 3 * (3 * 32 * 32 + 32 * 32 + 32 + 32 * 128 + 128 + 128 * 32 + 32)
                + 2_145,                                 # 3 blocks: heads, proj, 4C MLP
    "layernorm": 41_921 + 3 * 2 * 64 + 64,               # + 2 LayerNorms a block, ln_f
    "full": 10_788_929,
}


def stage_config(stage: str) -> GPTConfig:
    preset = "lecture" if stage == "full" else stage
    return dataclasses.replace(exp.PRESETS[preset][0], vocab_size=65)


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_has_the_lectures_size_and_shapes(stage):
    config = stage_config(stage)
    assert config.stage == stage
    shapes = jax.eval_shape(GPT(config).init_params, jax.random.PRNGKey(0))
    assert count_params(shapes) == LECTURE_COUNTS[stage]
    if stage == "full":
        return  # (its shapes and causality: test_gpt_model.py)
    params = GPT(config).init_params(jax.random.PRNGKey(0))
    T = config.block_size
    idx = jax.random.randint(jax.random.PRNGKey(1), (3, T), 0, 65)
    apply = jax.jit(GPT(config).apply)
    logits = apply({"params": params}, idx)
    assert logits.shape == (3, T, 65) and logits.dtype == jnp.float32
    for t in range(T - 1):
        # causal: changing the tokens after position t changes no logits up to t
        changed = idx.at[:, t + 1:].set((idx[:, t + 1:] + 7) % 65)
        other = apply({"params": params}, changed)
        np.testing.assert_allclose(other[:, :t + 1], logits[:, :t + 1], atol=1e-6)
        # the past: the tokens before t + 1 move its logits in the attention stages only
        changed = idx.at[:, :t + 1].set((idx[:, :t + 1] + 7) % 65)
        other = apply({"params": params}, changed)
        moved = not np.allclose(other[:, t + 1], logits[:, t + 1], atol=1e-6)
        assert moved == (stage != "bigram"), (stage, t)
    # the stages before the full model keep PyTorch's default init, as the lecture's did
    emb = params["bigram"] if stage == "bigram" else params
    assert abs(float(emb["token_embedding_table"]["embedding"].std()) - 1.0) < 0.1


def test_three_ways_of_averaging_the_past_agree():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 2))
    loop = average_past_loop(x)
    np.testing.assert_allclose(loop[:, 3], x[:, :4].mean(axis=1), atol=1e-6)
    for other in (average_past_matmul(x), average_past_softmax(x)):
        np.testing.assert_allclose(other, loop, atol=1e-6)
    out = self_attention_trick.main([])
    np.testing.assert_allclose(out["c"], np.asarray(out["a"]) @ np.asarray(out["b"]), atol=1e-6)
    np.testing.assert_allclose(out["xbow3"], out["xbow"], atol=1e-6)
    np.testing.assert_allclose(out["wei"].sum(axis=1), 1.0, atol=1e-6)
    assert float(out["wei"][0, 1]) == 0.0 and float(out["wei"][7, 0]) == pytest.approx(1 / 8)


@pytest.mark.parametrize("stage", ["bigram", "ffwd"])
def test_a_stage_trains_resumes_and_samples(stage, tmp_path, text_file):
    run = tmp_path / "run"
    flags = ["--text-file", str(text_file), "--run-dir", str(run), "--max-iters", "4",
             "--eval-interval", "2", "--eval-iters", "2", "--max-new-tokens", "10",
             "--compile-cache", "none"]
    result = exp.main(["--stage", stage, *flags])
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == stage and config["model"]["stage"] == stage
    assert config["train"]["batch_size"] == 32 and config["model"]["block_size"] == 8
    assert config["train"]["learning_rate"] == (1e-2 if stage == "bigram" else 1e-3)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    assert int(result.state.step) == 4
    text = exp.main(["sample", "--run-dir", str(run), "--max-new-tokens", "12",
                     "--compile-cache", "none"])
    assert len(text) == 13  # the starting newline and 12 characters
    exp.main(["--run-dir", str(run), "--resume", "--max-iters", "6", "--compile-cache", "none"])
    assert json.loads((run / "config.resume-4.json").read_text())["model"]["stage"] == stage
    with pytest.raises(SystemExit, match=f"--stage head: the run in .* trains stage {stage}"):
        exp.main(["--run-dir", str(run), "--resume", "--stage", "head", "--max-iters", "8"])


def test_stage_flags_are_checked(tmp_path, text_file, capsys):
    flags = ["--text-file", str(text_file), "--run-dir", str(tmp_path / "r")]
    with pytest.raises(SystemExit, match="--preset cpu sets the full model's hyperparameters, "
                                         "and --stage head comes with the lecture's own"):
        exp.main(["--stage", "head", "--preset", "cpu", *flags])
    with pytest.raises(SystemExit) as refused:
        exp.main(["--stage", "transformer", *flags])
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --stage transformer: choose one of bigram, head, multihead, ffwd, residual, "
        "layernorm, full")
    with pytest.raises(ValueError, match="stage must be one of bigram, head, multihead"):
        GPTConfig(stage="transformer")
    assert not (tmp_path / "r").exists()
