"""Command lines of the experiments: ``tyro`` subcommands and preset overrides."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Annotated, Callable, Literal, Mapping, Optional, Sequence, TypeVar, Union

import tyro

T = TypeVar("T")


def parse_command(commands: Mapping[str, type], default: str,
                  argv: Optional[Sequence[str]] = None, prog: Optional[str] = None):
    """Parse ``argv`` into one of ``commands`` (name -> dataclass type) with ``tyro``.

    A command line that does not start with a command name (nor ``-h``/``--help``) runs
    ``default``: ``python -m experiments.x --max-iters 10`` means ``... train --max-iters 10``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in commands and argv[0] not in ("-h", "--help")):
        argv = [default] + argv
    union = Union[tuple(Annotated[cls, tyro.conf.subcommand(name)]  # type: ignore[misc]
                        for name, cls in commands.items())]
    return tyro.cli(union, args=argv, prog=prog)


def run_command(fn, args):
    """``fn(args)``; bad input (``ValueError``, ``OSError``, missing data, unusable
    checkpoints) ends the program with one ``error: ...`` line and exit status 1, and
    Ctrl-C with one ``interrupted`` line and exit status 130 (no traceback)."""
    from genjax.data.tfds import DataUnavailableError
    from genjax.train.checkpoint import CheckpointError

    try:
        return fn(args)
    except (ValueError, OSError, DataUnavailableError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from e
    except KeyboardInterrupt:  # fit has said where the run stands
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def override(config: T, overrides) -> T:
    """``config`` with every field that ``overrides`` (a dataclass) sets to non-None and
    ``config`` also has."""
    names = {f.name for f in dataclasses.fields(config)}
    changes = {f.name: getattr(overrides, f.name) for f in dataclasses.fields(overrides)
               if f.name in names and getattr(overrides, f.name) is not None}
    return dataclasses.replace(config, **changes)


def preset_default(metavar: str):
    """``tyro`` marker of a flag whose unset value (None) means the preset's, or with
    ``--resume`` the run's: its help says so instead of "(default: None)"."""
    return tyro.conf.arg(metavar=metavar,
                         help_behavior_hint="(default: the preset's; on --resume, the run's)")


def own_default(metavar: str):
    """``tyro`` marker of an optional flag whose help text says what unset means."""
    return tyro.conf.arg(metavar=metavar, help_behavior_hint="")


@dataclasses.dataclass(frozen=True)
class RunArgs:
    """Flags every training experiment has (None: the preset's value, or on --resume the
    run's)."""

    max_iters: Annotated[Optional[int], preset_default("INT")] = None
    """Total training steps (a resumed run continues up to it)."""
    eval_interval: Annotated[Optional[int], preset_default("INT")] = None
    """Evaluate and checkpoint every this many steps."""
    eval_iters: Annotated[Optional[int], preset_default("INT")] = None
    """Batches per split averaged by an evaluation."""
    batch_size: Annotated[Optional[int], preset_default("INT")] = None
    """Global batch size (all devices together)."""
    learning_rate: Annotated[Optional[float], preset_default("FLOAT")] = None
    """Peak learning rate."""
    min_lr: Annotated[Optional[float], preset_default("FLOAT")] = None
    """Final learning rate of the cosine schedule."""
    warmup_iters: Annotated[Optional[int], preset_default("INT")] = None
    """Warm-up steps of the cosine schedule."""
    seed: Annotated[Optional[int], own_default("INT")] = None
    """Seed of every random draw of the run (default: the preset's; a resumed run keeps
    the keys saved in its checkpoint)."""
    parallel: Annotated[Optional[Literal["pmap", "sharding", "none"]],
                        preset_default("{pmap,sharding,none}")] = None
    """Data-parallel engine: pmap, sharding or none (one device)."""
    devices: Annotated[Optional[int], own_default("INT")] = None
    """Devices to use (default: all local devices; on --resume, the run's setting)."""
    host_devices: Annotated[Optional[int], own_default("INT")] = None
    """CPU only: split the host into this many XLA devices (default: --devices when given,
    else the largest count <= the cores that divides the batch); ignored when XLA_FLAGS
    already sets it."""
    distributed: bool = False
    """Multi-host: call jax.distributed.initialize() first (run the same command on every
    host with the same --run-dir; each host loads only its share of every batch)."""
    data_dir: Annotated[Optional[str], own_default("DIR")] = None
    """Offline data folder (default: $GENJAX_DATA_DIR; on --resume, the run's)."""
    run_dir: Annotated[Optional[str], own_default("DIR")] = None
    """Run directory (default: runs/<experiment>/<date-time>)."""
    resume: bool = False
    """Continue the latest checkpoint of --run-dir."""
    compile_cache: Annotated[Optional[str], own_default("DIR")] = None
    """Folder of JAX's persistent compilation cache, so that later runs of the same
    programs skip compiling them (default: $GENJAX_COMPILE_CACHE, else
    ~/.cache/genjax/xla); 'none' turns it off."""


def _record_order(path: pathlib.Path) -> tuple:
    """Newest start last: by modification time, then by the step in the name
    (``config.json`` is step 0), so a copy that reset the times still orders right."""
    step = path.stem.rpartition("-")[2]
    return path.stat().st_mtime_ns, int(step) if step.isdigit() else 0


def saved_config(args: RunArgs) -> Optional[dict]:
    """With ``--resume``: the config record of the run's latest start, which supplies every
    flag the command leaves out; None for a new run (or a run directory without one).

    The record is ``config.json`` or the newest ``config.resume-<step>.json`` of
    ``--run-dir`` (written by :func:`genjax.train.loop.fit`), read as JSON without
    starting JAX, so that the saved batch size can decide the host's device split.

    Raises:
      ValueError: the record is not a JSON object with ``model`` and ``train`` objects
        (naming the file).
    """
    if not args.resume or args.run_dir is None:
        return None
    run_dir = pathlib.Path(args.run_dir)
    records = list(run_dir.glob("config.resume-*.json")) + list(run_dir.glob("config.json"))
    if not records:
        return None
    newest = max(records, key=_record_order)
    try:
        record = json.loads(newest.read_text())
    except ValueError as e:
        raise ValueError(f"--resume: {newest} is not readable JSON ({e}); repair it, or "
                         "move it away to resume from the preset's values") from e
    if not (isinstance(record, dict) and isinstance(record.get("model"), dict)
            and isinstance(record.get("train"), dict)):
        raise ValueError(f"--resume: {newest} is not a run's config record (a JSON object "
                         "with 'model' and 'train' objects); repair it, or move it away to "
                         "resume from the preset's values")
    return record


def planned_batch_size(args: RunArgs, presets: Mapping[str, tuple], fallback: str) -> int:
    """The run's global batch size, known before JAX starts (it decides how the CPU host
    is split into devices): ``--batch-size``, else the resumed run's saved one, else the
    batch of ``--preset`` (of preset ``fallback`` when unset)."""
    if args.batch_size is not None:
        return args.batch_size
    saved = saved_config(args)
    if saved is not None and "batch_size" in saved["train"]:
        return saved["train"]["batch_size"]
    return presets[getattr(args, "preset", None) or fallback][1].batch_size


def resumed_path(given: Optional[str], saved: Optional[str]) -> Optional[str]:
    """A path flag's value: as given, else the resumed run's saved one (None: unset),
    made absolute so that a resume from another working directory finds it too."""
    path = given if given is not None else saved
    return None if path is None else str(pathlib.Path(path).expanduser().absolute())


def default_preset_for(cpu: str, accelerator: str) -> Callable[[], str]:
    """``() -> cpu`` when JAX sees no accelerator, else ``accelerator`` (it starts JAX)."""
    import jax

    return lambda: cpu if jax.default_backend() == "cpu" else accelerator


def resolve_configs(args: RunArgs, presets: Mapping[str, tuple], default_preset: Callable[[], str]):
    """The run's ``(preset, model config, TrainConfig, saved record or None)``; ``presets``
    maps names to ``(model config, TrainConfig)`` pairs.

    A new run starts from ``--preset`` (else ``default_preset()``); ``--resume`` starts from
    the run's saved record (:func:`saved_config`), so a flag left out keeps the run's value
    rather than going back to the preset's (a field the record lacks, from an older
    genjax, takes the preset's). Flags given override either, then
    :func:`schedule_over_run` applies. A resume without a record says that it falls back
    to the preset.

    Raises:
      ValueError: ``--preset`` naming another preset than the resumed run's; ``--seed``
        other than the resumed run's (its keys come from the checkpoint); a saved record
        these configs cannot be built from; or a value :func:`schedule_over_run` or the
        configs refuse.
    """
    saved = saved_config(args)
    chosen = getattr(args, "preset", None)
    if saved is None:
        preset = chosen or default_preset()
        if args.resume:
            say(f"warning: no config.json in {args.run_dir}: the flags left out take preset "
                f"{preset}'s values, not the run's")
        model, train = presets[preset]
    else:
        preset = saved.get("preset")
        if preset not in presets:
            raise ValueError(f"--resume: the saved config of {args.run_dir} names preset "
                             f"{preset!r}, not one of {sorted(presets)}; start a new --run-dir")
        if chosen is not None and chosen != preset:
            raise ValueError(f"--preset {chosen}: the run in {args.run_dir} was started with "
                             f"preset {preset}, and --resume continues from its saved config; "
                             "drop --preset (flags given still override single values)")
        try:
            like_model, like_train = presets[preset]
            model = dataclass_from_record(like_model, saved["model"])
            train = dataclass_from_record(like_train, saved["train"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"--resume: the saved config of {args.run_dir} does not fit this "
                             f"version of the experiment ({e}); resume with a matching "
                             "genjax, or start a new --run-dir") from e
        if args.seed is not None and args.seed != train.seed:
            raise ValueError(f"--seed {args.seed}: a resumed run continues with the random "
                             f"keys saved in its checkpoint (seed {train.seed}); drop --seed")
    return preset, override(model, args), schedule_over_run(override(train, args), args), saved


def dataclass_from_record(like: T, record: Mapping) -> T:
    """``like``'s dataclass type built from a JSON ``record`` of it (tuples come back from
    JSON as lists); fields the record lacks keep ``like``'s values.

    Raises:
      TypeError: the record has fields ``like`` does not.
    """
    fields = {f.name for f in dataclasses.fields(like)}
    unknown = sorted(set(record) - fields)
    if unknown:
        raise TypeError(f"unknown fields {unknown}")
    return dataclasses.replace(like, **{k: tuple(v) if isinstance(v, list) else v
                                        for k, v in record.items()})


def schedule_over_run(train, args: Optional[RunArgs] = None):
    """A cosine schedule decays over the whole run: ``lr_decay_iters = max_iters`` (as
    nanoGPT's recipes); its warm-up must end before.

    Raises:
      ValueError: ``warmup_iters >= max_iters``, naming both; or ``args`` setting
        ``--warmup-iters`` / ``--min-lr`` for a constant learning rate (they would be
        recorded in config.json without taking effect).
    """
    if train.lr_schedule != "cosine":
        given = [f"--{name.replace('_', '-')}" for name in ("warmup_iters", "min_lr")
                 if args is not None and getattr(args, name) is not None]
        if given:
            raise ValueError(f"{' and '.join(given)}: this preset's learning rate is "
                             f"{train.lr_schedule}, and only the cosine schedule has a warm-up "
                             "and a min_lr; drop the flag")
        return train
    if train.warmup_iters >= train.max_iters:
        raise ValueError(f"warmup_iters={train.warmup_iters} must be below max_iters="
                         f"{train.max_iters}: pass a smaller --warmup-iters")
    return dataclasses.replace(train, lr_decay_iters=train.max_iters)


COMPILE_CACHE_ENV = "GENJAX_COMPILE_CACHE"


def enable_compile_cache(directory: Optional[str] = None) -> Optional[pathlib.Path]:
    """Turn on JAX's persistent compilation cache; returns its folder (None: off).

    Compiled programs that took over a second to build (train, eval and sampling steps,
    parameter init) are stored there and loaded by later runs with the same programs,
    JAX/XLA versions and flags. Measured on the 2-core CPU: a 2-step run of the GPT ``cpu``
    preset (start, data, compilation, 3 evaluations, sample) takes 34 s with an empty
    cache and 21 s with a filled one.

    Args:
      directory: the folder; ``'none'`` (or ``''``) turns the cache off. None: a folder
        already configured for JAX (``JAX_COMPILATION_CACHE_DIR``, or set by the caller)
        is kept, else ``$GENJAX_COMPILE_CACHE``, else ``~/.cache/genjax/xla``.
    """
    import jax

    if directory is None:
        if jax.config.jax_compilation_cache_dir:
            return pathlib.Path(jax.config.jax_compilation_cache_dir)
        directory = os.environ.get(COMPILE_CACHE_ENV)
        if directory is None:
            directory = str(pathlib.Path("~/.cache/genjax/xla").expanduser())
    if directory.strip().lower() in ("", "none"):
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    return pathlib.Path(directory)


def start_run(args: RunArgs, batch_size: int, experiment: str,
              check: bool = True) -> pathlib.Path:
    """What every experiment does before JAX touches a device: ``jax.distributed``
    initialisation (``--distributed``), the CPU host split into devices
    (:func:`genjax.train.parallel.split_host_into_devices`: ``--host-devices``, else
    ``--devices``, else one per core), the persistent compilation cache
    (:func:`enable_compile_cache`), and with ``check`` the run directory's check
    (:func:`genjax.train.loop.check_run_dir`, before any data is loaded; :func:`fit` checks
    again); returns the run directory.

    Raises:
      ValueError: ``--distributed`` or ``--resume`` without ``--run-dir``.
      FileExistsError, FileNotFoundError: a new run over another run's files, or a resume
        without a checkpoint (nothing is touched).
    """
    import jax

    from genjax.train.loop import check_run_dir
    from genjax.train.parallel import split_host_into_devices

    if args.resume and args.run_dir is None:
        raise ValueError("--resume needs --run-dir DIR, the directory of the run to continue")
    if args.distributed:
        if args.run_dir is None:
            raise ValueError("--distributed needs an explicit --run-dir shared by every host")
        jax.distributed.initialize()
    host_devices = args.host_devices if args.host_devices is not None else args.devices
    split_host_into_devices(batch_size, host_devices)
    enable_compile_cache(args.compile_cache)
    run_dir = pathlib.Path(args.run_dir or f"runs/{experiment}/{time.strftime('%Y%m%d-%H%M%S')}")
    if check:
        check_run_dir(run_dir, args.resume)
    return run_dir


def refuse_unused(args, reasons: Mapping[str, str]) -> None:
    """Refuse flags that an experiment has but does not use (they would be recorded in
    ``config.json`` without effect); ``reasons`` maps a field name to why.

    Raises:
      ValueError: naming the flag and the reason.
    """
    for name, why in reasons.items():
        if getattr(args, name, None) is not None:
            raise ValueError(f"--{name.replace('_', '-')}: {why}; drop the flag")


EVERY_HELDOUT_IMAGE = {"eval_iters": "this experiment evaluates every held-out image (in "
                                     "batches of --batch-size), not a number of batches"}
"""The reason of :func:`refuse_unused` for ``--eval-iters`` in the image experiments."""


def say(text: str) -> None:
    """Print on the main process only."""
    import jax

    if jax.process_index() == 0:
        print(text, flush=True)
