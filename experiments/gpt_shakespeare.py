"""Character-level GPT on Tiny Shakespeare ("Let's build GPT", A. Karpathy, 2023).

    python -m experiments.gpt_shakespeare [train] [--preset cpu|lecture] [--max-iters N] ...
    python -m experiments.gpt_shakespeare --stage {bigram,head,multihead,ffwd,residual,layernorm,full}
    python -m experiments.gpt_shakespeare sample --run-dir DIR [--prompt TEXT] ...

config -> data -> state -> train/eval steps -> loop, the last four in ``genjax.train``.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Annotated, Literal, Optional

import jax
import jax.numpy as jnp
import tyro

from genjax.data.text import DATA_DIR_ENV, CharTokenizer, load_text_data
from genjax.models.gpt import GPT, STAGES, GPTConfig, count_params
from genjax.tasks.gpt import config_from_checkpoint, make_task
from genjax.train.checkpoint import load_latest
from genjax.train.cli import (RunArgs, check_experiment, enable_compile_cache, own_default,
                              parse_command, planned_batch_size, preset_default, resolve_configs,
                              resumed_path, run_command, saved_config, say, start_run)
from genjax.train.config import TrainConfig
from genjax.train.loop import fit, is_main_process

# --- config: the presets -----------------------------------------------------------------

PRESETS: dict[str, tuple[GPTConfig, TrainConfig]] = {
    # The lecture's gpt.py exactly: torch.optim.AdamW(lr=3e-4) with PyTorch's defaults.
    "lecture": (
        GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
        TrainConfig(max_iters=5000, eval_interval=500, eval_iters=200, batch_size=64,
                    learning_rate=3e-4, lr_schedule="constant", weight_decay=0.01,
                    weight_decay_on="all", beta1=0.9, beta2=0.999, eps=1e-8, grad_clip=None,
                    seed=1337),
    ),
    # nanoGPT's config/train_shakespeare_char.py with its CPU overrides.
    "cpu": (
        GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0),
        TrainConfig(max_iters=2000, eval_interval=250, eval_iters=20, batch_size=12,
                    learning_rate=1e-3, lr_schedule="cosine", warmup_iters=100,
                    lr_decay_iters=2000, min_lr=1e-4, weight_decay=0.1,
                    weight_decay_on="matrices", beta1=0.9, beta2=0.99, eps=1e-8,
                    grad_clip=1.0, seed=1337),
    ),
}


# The lecture's stages before the full model (GPTConfig.stage), with its hyperparameters for
# them: bigram.py for the bigram model (batch 32, block 8, learning rate 1e-2, 3000 steps,
# an evaluation of 200 batches every 300), then the video's growing model (n_embd 32, 4 heads,
# 3 blocks, learning rate 1e-3, 5000 steps, evaluated every 500), always torch's AdamW
# defaults and no dropout. The full model is the lecture preset above.
_LECTURE_ADAMW = dict(lr_schedule="constant", weight_decay=0.01, weight_decay_on="all",
                      beta1=0.9, beta2=0.999, eps=1e-8, grad_clip=None, seed=1337)
STAGE_PRESETS: dict[str, tuple[GPTConfig, TrainConfig]] = {
    "bigram": (GPTConfig(stage="bigram", block_size=8, n_layer=1, n_head=1, n_embd=32,
                         dropout=0.0),
               TrainConfig(max_iters=3000, eval_interval=300, eval_iters=200, batch_size=32,
                           learning_rate=1e-2, **_LECTURE_ADAMW)),
    **{stage: (GPTConfig(stage=stage, block_size=8, n_layer=3, n_head=4, n_embd=32,
                         dropout=0.0),
               TrainConfig(max_iters=5000, eval_interval=500, eval_iters=200, batch_size=32,
                           learning_rate=1e-3, **_LECTURE_ADAMW))
       for stage in ("head", "multihead", "ffwd", "residual", "layernorm")},
}
PRESETS.update(STAGE_PRESETS)  # (a resumed run names its stage's preset)


def default_preset() -> str:
    """``cpu`` when JAX sees no accelerator, otherwise ``lecture``."""
    return "cpu" if jax.default_backend() == "cpu" else "lecture"


@dataclasses.dataclass(frozen=True)
class Train(RunArgs):
    """Train a GPT, checkpointing to --run-dir, then print a sample (the default command;
    its flags: train --help)."""

    preset: Annotated[Optional[Literal["cpu", "lecture"]], own_default("{cpu,lecture}")] = None
    """Hyperparameters to start from (default: cpu without an accelerator, else lecture;
    on --resume, the run's)."""
    block_size: Annotated[Optional[int], preset_default("INT")] = None
    """Context length in characters."""
    n_layer: Annotated[Optional[int], preset_default("INT")] = None
    """Transformer blocks."""
    n_head: Annotated[Optional[int], preset_default("INT")] = None
    """Attention heads per block (n_embd must be divisible by it)."""
    n_embd: Annotated[Optional[int], preset_default("INT")] = None
    """Embedding width C."""
    dropout: Annotated[Optional[float], preset_default("FLOAT")] = None
    """Dropout rate while training (0 turns it off)."""
    dtype: Annotated[Optional[Literal["float32", "bfloat16"]],
                     own_default("{float32,bfloat16}")] = None
    """Compute dtype: bfloat16 is mixed precision (float32 parameters, optimizer state,
    LayerNorm statistics, softmax and loss). Default: bfloat16 for the lecture preset on a
    GPU or TPU, else float32; on --resume, the run's."""
    text_file: Annotated[Optional[str], own_default("PATH")] = None
    """Train on this UTF-8 text file instead of Tiny Shakespeare (first 90% train, last
    10% validation); --data-dir: a folder with input.txt or tinyshakespeare/input.txt, given
    to TFDS as its manual_dir."""
    max_new_tokens: Annotated[Optional[int], own_default("INT")] = None
    """Length of the sample printed at the end (default: 500; on --resume, the run's)."""
    stage: Annotated[Optional[Literal[STAGES]], own_default("{" + ",".join(STAGES) + "}")] = None
    """A stage of the lecture: its model, with the lecture's hyperparameters for it
    (bigram: a table of next-character logits; head: one self-attention head; multihead:
    four; ffwd: a feed-forward layer after them; residual: three residual blocks; layernorm:
    with LayerNorm; full: the final model, --preset's). Default: full; on --resume, the
    run's."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """Sample text from the latest checkpoint of a run."""

    run_dir: Annotated[str, tyro.conf.arg(metavar="DIR")]
    """The training run's directory."""
    prompt: Annotated[str, own_default("TEXT")] = ""
    """Text to continue (default: start from a newline, as the lecture)."""
    max_new_tokens: int = 500
    """Characters to generate after the prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy."""
    top_k: Annotated[Optional[int], own_default("K")] = None
    """Sample among the k most likely characters only (default: among all)."""
    seed: int = 1337
    """Seed of the sampling key: the same seed and checkpoint give the same text."""
    compile_cache: Annotated[Optional[str], own_default("DIR")] = None
    """Folder of JAX's persistent compilation cache (as for train)."""


def with_stage(args: Train) -> Train:
    """``args`` with ``--stage`` turned into its preset (the stages before ``full`` are
    presets named after them).

    Raises:
      ValueError: ``--preset`` with a stage other than ``full`` (the stage brings its own
        hyperparameters), or ``--stage`` on ``--resume`` naming another stage than the run's.
    """
    if args.stage is None or args.stage == "full" and not args.resume:
        return args
    if args.resume:
        saved = saved_config(args)
        if saved is None:  # (no record: the checkpoint's own model config decides)
            return args
        ran = (saved.get("model") or {}).get("stage", "full")
        if args.stage != ran:
            raise ValueError(f"--stage {args.stage}: the run in {args.run_dir} trains stage "
                             f"{ran}; drop --stage, or start a new --run-dir")
        return args
    if args.preset is not None:
        raise ValueError(f"--preset {args.preset} sets the full model's hyperparameters, and "
                         f"--stage {args.stage} comes with the lecture's own: drop --preset "
                         "(flags such as --max-iters still override single values)")
    return dataclasses.replace(args, preset=args.stage)


def setup(args: Train) -> pathlib.Path:
    """Before JAX starts: distributed set-up and one XLA CPU device per core, for the run's
    batch (:func:`genjax.train.cli.planned_batch_size`; preset ``cpu`` if unset: with an
    accelerator the host devices are not used)."""
    return start_run(args, planned_batch_size(args, PRESETS, "cpu"), "gpt_shakespeare")


SAMPLE_TOKENS = 500  # the sample printed at the end of a run, in characters


def resolve(args: Train) -> tuple[str, GPTConfig, TrainConfig, dict, int]:
    """The preset named by ``args`` (or the default one), or with ``--resume`` the run's
    saved config, with the flags' overrides; the data flags (``data_dir``, ``text_file``:
    the resumed run's when not given; ``data_dir`` else ``$GENJAX_DATA_DIR``, recorded as
    the path used); and the length of the final sample (``--max-new-tokens``, else the
    resumed run's, else 500).

    The cosine schedule decays over the whole run (``lr_decay_iters = max_iters``), as
    nanoGPT's CPU recipe. The lecture preset computes in bfloat16 on a GPU or TPU unless
    ``--dtype`` says otherwise. Raises ``ValueError`` on invalid values (a negative
    ``--max-new-tokens`` included), before any data is loaded or compiled.
    """
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    preset, model, train, saved = resolve_configs(args, PRESETS, default_preset)
    if args.dtype is None and saved is None and preset == "lecture" \
            and jax.default_backend() != "cpu":
        model = dataclasses.replace(model, dtype="bfloat16")  # mixed precision on accelerators
    saved_data = (saved or {}).get("data") or {}
    text_file = resumed_path(args.text_file, saved_data.get("text_file"))
    data = {"data_dir": resumed_path(args.data_dir, saved_data.get("data_dir"),
                                     None if text_file else DATA_DIR_ENV),
            "text_file": text_file}
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = (saved or {}).get("max_new_tokens", SAMPLE_TOKENS)
    return preset, model, train, data, max_new_tokens


# --- train ---------------------------------------------------------------------------------


def train(args: Train):
    """Run the training command; returns the :class:`genjax.train.loop.FitResult`."""
    args = with_stage(args)
    run_dir = setup(args)
    preset, model_cfg, train_cfg, data_flags, max_new_tokens = resolve(args)

    # data
    data = load_text_data(model_cfg.block_size, **data_flags)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=data.tokenizer.vocab_size)
    setting = (f"preset {preset}" if model_cfg.stage == "full"
               else f"lecture stage {model_cfg.stage} (its own settings)")
    say(f"{setting}; {len(data.train):,} training / {len(data.val):,} validation "
        f"characters, vocabulary {data.tokenizer.vocab_size}; run dir {run_dir}")

    # state, steps, loop
    task = make_task(model_cfg, data, train_cfg.batch_size, train_cfg.eval_iters)
    n_params = count_params(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))
    say(f"GPT{'' if model_cfg.stage == 'full' else f' (lecture stage {model_cfg.stage})'} "
        f"with {n_params / 1e6:.6f} M parameters, computing in {model_cfg.dtype}")
    record = {"experiment": "gpt_shakespeare", "preset": preset,
              "model": dataclasses.asdict(model_cfg),
              "train": dataclasses.asdict(train_cfg),
              "data": data_flags, "max_new_tokens": max_new_tokens,
              "n_params": n_params, "vocab": data.tokenizer.chars}
    result = fit(task, train_cfg, run_dir, resume=args.resume, config_record=record, plot=True,
                 tensorboard=args.tensorboard)

    # sample
    params = result.engine.to_single_device(result.state.params)
    step = int(result.state.step)
    key = jax.random.fold_in(result.engine.to_single_device(result.keys["init"]), step)
    # in float32 whatever the run's dtype, as the sample command: the same key, the same text
    text = sample_text(dataclasses.replace(model_cfg, dtype="float32"), data.tokenizer, params,
                       "", max_new_tokens, key)
    if is_main_process():
        if step > result.start_step:  # a resume with nothing to train adds no entry
            with open(run_dir / "samples.txt", "a") as f:
                f.write(f"=== step {step}, temperature 1.0 ===\n{text}\n\n")
        print(text)
    return result


def sample_text(config: GPTConfig, tokenizer: CharTokenizer, params, prompt: str,
                max_new_tokens: int, key, temperature: float = 1.0,
                top_k: Optional[int] = None) -> str:
    """``prompt`` and its continuation as text; an empty prompt starts from a newline."""
    ids = jnp.asarray(tokenizer.encode(prompt))
    start_id = tokenizer.id_of("\n", default=0)
    out = GPT(config).generate(params, ids, max_new_tokens, key, temperature=temperature,
                               top_k=top_k, start_id=start_id)
    return tokenizer.decode(out)


# --- sample --------------------------------------------------------------------------------


def sample(args: Sample) -> str:
    """Run the sample command: continue ``args.prompt`` from the run's latest checkpoint."""
    check_experiment(args.run_dir, "gpt_shakespeare")
    enable_compile_cache(args.compile_cache)
    step, state, meta = load_latest(args.run_dir)
    config = config_from_checkpoint(meta, state["train"]["params"])
    tokenizer = CharTokenizer(meta["vocab"])
    text = sample_text(config, tokenizer, state["train"]["params"], args.prompt,
                       args.max_new_tokens, jax.random.PRNGKey(args.seed),
                       args.temperature, args.top_k)
    print(f"--- {args.run_dir}, step {step} ---")
    print(text)
    return text


def main(argv=None):
    """Entry point; bad input ends the program with one ``error: ...`` line (exit status 1)."""
    args = parse_command({"train": Train, "sample": Sample}, default="train", argv=argv,
                         prog="python -m experiments.gpt_shakespeare",
                         presets={name: PRESETS[name] for name in ("lecture", "cpu")})
    return run_command(train if isinstance(args, Train) else sample, args)


if __name__ == "__main__":
    main()
