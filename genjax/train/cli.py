"""Command lines of the experiments: ``tyro`` subcommands and preset overrides."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import os
import pathlib
import re
import sys
import time
import typing
from typing import Annotated, Callable, Literal, Mapping, Optional, Sequence, TypeVar, Union

import tyro

from genjax.train.config import config_records

T = TypeVar("T")


ALIASES = {"--lr": "--learning-rate", "--iters": "--max-iters", "--steps": "--max-iters",
           "--bs": "--batch-size", "--out-dir": "--run-dir", "--output-dir": "--run-dir",
           "--n-heads": "--n-head", "--n-layers": "--n-layer"}
"""Flags of other tools (nanoGPT's, the field's abbreviations) and the flag to suggest for
each, rather than the nearest spelling (``--lr`` is nearest to ``--min-lr``)."""

VALUE_ALIASES = {("--preset", "gpu"): "lecture", ("--preset", "tpu"): "lecture"}
"""Values meant for another experiment's choices, and the choice to suggest when it is one
of this flag's (the GPT's GPU preset is ``lecture``)."""


def parse_command(commands: Mapping[str, type], default: str,
                  argv: Optional[Sequence[str]] = None, prog: Optional[str] = None,
                  presets: Optional[Mapping[str, tuple]] = None):
    """Parse ``argv`` into one of ``commands`` (name -> dataclass type) with ``tyro``.

    A command line that does not start with a command name runs ``default``:
    ``python -m experiments.x --max-iters 10`` means ``... train --max-iters 10``, and
    ``--help`` alone shows the default command's flags (after one line naming the others).
    ``presets`` (name -> configs) are listed in the default command's help with the values
    its flags take when left out.

    Raises:
      SystemExit: an unknown flag, in one line naming the closest known one (exit
        status 2); tyro's own errors and ``--help`` as tyro raises them.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or "python -m " + pathlib.Path(sys.argv[0]).stem
    if argv and argv[0] in ("-h", "--help"):
        others = ", ".join(f"{prog} {name} --help" for name in commands if name != default)
        print(f"{prog} [{default}] runs the {default} command (its flags below); also: {others}")
        argv = [default] + argv
    if not argv or argv[0] not in commands:
        argv = [default] + argv
    _refuse_unknown_flags(commands[argv[0]], argv[1:], f"{prog} {argv[0]}")
    union = Union[tuple(Annotated[cls, tyro.conf.subcommand(  # type: ignore[misc]
        name, description=_description(cls, presets if name == default else None))]
        for name, cls in commands.items())]
    return tyro.cli(union, args=argv, prog=prog)


def parse_args(cls: type, argv: Optional[Sequence[str]] = None, prog: Optional[str] = None,
               presets: Optional[Mapping[str, tuple]] = None):
    """Parse ``argv`` into the dataclass ``cls`` with ``tyro``, as :func:`parse_command`
    does for one command: unknown flags refused in one line, ``presets`` listed in the help.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or "python -m " + pathlib.Path(sys.argv[0]).stem
    _refuse_unknown_flags(cls, argv, prog)
    return tyro.cli(cls, args=argv, prog=prog, description=_description(cls, presets))


def _refuse_unknown_flags(cls: type, argv: Sequence[str], command: str) -> None:
    """One line for a flag that ``cls`` does not have (tyro's own hint names the program
    wrongly when it holds spaces). Flags are matched as tyro matches them (``_`` or ``-``,
    ``--no-`` for booleans, ``--flag=value``); the token after a flag that takes a value
    is that value, whatever it looks like."""
    known = {"--help": False, "-h": False}  # flag -> whether it takes a value
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # (an annotation that cannot be resolved here: tyro checks values)
        hints = {}
    kinds = {}  # flag -> its value's type, where one line can check it
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        boolean = field.type in (bool, "bool")
        known[flag] = not boolean
        if boolean:
            known["--no-" + flag[2:]] = False
        kinds[flag] = hints.get(field.name)
    pending = None  # the flag whose value comes next
    for token in argv:
        if pending is not None:
            _check_value(pending, token, kinds.get(pending))
            pending = None
            continue
        if not token.startswith("--"):
            continue
        flag, equals, value = token.partition("=")
        flag = "--" + flag[2:].replace("_", "-")
        if flag not in known:
            close = [ALIASES[flag]] if ALIASES.get(flag) in known else \
                difflib.get_close_matches(flag, sorted(known), n=1, cutoff=0.6)
            print(f"error: unknown flag {flag}" + (f"; did you mean {close[0]}?" if close else "")
                  + f" All flags: {command} --help", file=sys.stderr)
            raise SystemExit(2)
        if known[flag] and equals:
            _check_value(flag, value, kinds.get(flag))
        elif known[flag]:
            pending = flag


def _check_value(flag: str, value: str, kind) -> None:
    """One line (exit status 2) for a value that ``kind`` (a flag's type: ``int``,
    ``float``, a ``Literal`` of choices, each maybe ``Optional``) cannot take; other types
    are left to tyro."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) is Union and type(None) in args:  # Optional[...]
        if value == "None":
            return
        rest = [a for a in args if a is not type(None)]
        kind = rest[0] if len(rest) == 1 else None
    if typing.get_origin(kind) is Literal:
        choices = [str(c) for c in typing.get_args(kind)]
        if value not in choices:
            alias = VALUE_ALIASES.get((flag, value.lower()))
            close = [alias] if alias in choices else \
                [c for c in choices if c.lower() == value.lower()] or \
                difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            print(f"error: {flag} {value}: choose one of {', '.join(choices)}{hint}",
                  file=sys.stderr)
            raise SystemExit(2)
    elif kind in (int, float):
        try:
            kind(value)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            print(f"error: {flag} {value}: not {what}", file=sys.stderr)
            raise SystemExit(2) from None


def _description(cls: type, presets: Optional[Mapping[str, tuple]]) -> str:
    """``cls``'s docstring, and with ``presets`` each preset's values of ``cls``'s flags."""
    text = inspect.cleandoc(cls.__doc__ or "")
    if not presets:
        return text
    flags = {f.name for f in dataclasses.fields(cls)}
    lines = []
    for name, configs in presets.items():
        values = {f.name: getattr(c, f.name) for c in configs for f in dataclasses.fields(c)
                  if f.name in flags and getattr(c, f.name) is not None}
        lines.append(f"{name}: " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                             for k, v in values.items()))
    return text + "\n\nPresets (the values of the flags left out):\n\n" + "\n\n".join(lines)


# How XLA's runtime errors say that a peer process is gone (gloo's TCP pairs, the
# coordination service): other runtime errors (out of memory, ...) are this process's own.
_LOST_PEER = ("gloo", "connection reset", "connection closed", "connection refused",
              "broken pipe", "unavailable", "deadline_exceeded", "heartbeat")


def _failed_collective(e: BaseException) -> bool:
    """Whether ``e`` is XLA's runtime error for a lost peer inside a job of several JAX
    processes."""
    jax = sys.modules.get("jax")
    return (jax is not None and isinstance(e, jax.errors.JaxRuntimeError)
            and jax.process_count() > 1 and any(m in str(e).lower() for m in _LOST_PEER))


_job_timeout_s: list = [None]  # --distributed-timeout of this process's job, once joined


def _gone_processes() -> list[int]:
    """The processes of this job that JAX's coordination service no longer hears from
    (it knows once they have been silent for the heartbeat timeout, ``--distributed-timeout``);
    [] when that cannot be learnt within that time and 10 s, or the coordinator itself is
    gone."""
    import threading

    import jax

    found: list = []

    def ask():
        try:  # (the client of jax.distributed, not a public API: any failure says nothing)
            from jax._src import distributed

            live = distributed.global_state.client.get_live_nodes(list(range(jax.process_count())))
            found.extend(i for i in range(jax.process_count()) if i not in live)
        except Exception:
            pass

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join((_job_timeout_s[0] or DISTRIBUTED_TIMEOUT_S) + 10)
    return sorted(found) if not asking.is_alive() else []


class _ReaderGoneGuard:
    """Standard output whose reader may leave (``| head``): the first write or flush that
    meets a broken pipe points the file descriptor at ``/dev/null`` (what follows, and what
    was still buffered, is discarded, as Unix tools do) and asks a training run to stop
    (:func:`genjax.train.loop.request_stop`), instead of an ``error: [Errno 32] Broken pipe``
    that ends the run wherever it is."""

    def __init__(self, stream):
        self._stream = stream
        self.gone = False

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._reader_gone()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._reader_gone()

    def _reader_gone(self):
        from genjax.train.loop import request_stop

        if not self.gone:
            self.gone = True
            out = self._stream.fileno()
            # stderr in the same pipe (2>&1 | head) has lost its reader too
            shared = _same_file(out, 2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            for fd in (out, 2) if shared else (out,):
                os.dup2(devnull, fd)
            os.close(devnull)
            request_stop("standard output was closed")
        try:  # what was buffered goes to /dev/null now
            self._stream.flush()
        except OSError:
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _same_file(fd_a: int, fd_b: int) -> bool:
    try:
        return os.path.sameopenfile(fd_a, fd_b)
    except OSError:
        return False


def run_command(fn, args):
    """``fn(args)``; bad input (``ValueError``, ``OSError``, missing data, unusable
    checkpoints, a diverged run) ends the program with one ``error: ...`` line and exit
    status 1, and Ctrl-C with one ``interrupted ...`` line and exit status 130 (143 for a
    SIGTERM that stopped a training run; no traceback). In a job of several processes, a
    collective that failed because another process is gone is one ``error: ...`` line
    naming it (once JAX's coordination service has missed its heartbeats, at most
    ``--distributed-timeout`` seconds) and exit status 1.

    Standard output, when it is a file or pipe, becomes line-buffered (and stays so), so
    a log file or ``| tee`` shows each line as it is written. If its reader goes away
    (``| head``), what is printed after is discarded (stderr's too when it shares the pipe)
    and a training run of one process stops as on Ctrl-C, saying so on stderr (exit status
    130): see :func:`genjax.train.loop.fit`."""
    from genjax.data.tfds import DataUnavailableError
    from genjax.train.checkpoint import CheckpointError
    from genjax.train.loop import DivergedError, RunInterrupted, request_stop

    stdout = sys.stdout
    if hasattr(stdout, "reconfigure") and hasattr(stdout, "fileno"):
        try:
            stdout.fileno()
            stdout.reconfigure(line_buffering=True)
            sys.stdout = _ReaderGoneGuard(stdout)
        except (OSError, ValueError):  # not a file (pytest's capsys): left as it is
            pass
    try:
        return _run(fn, args, (DataUnavailableError, CheckpointError, DivergedError),
                    RunInterrupted)
    finally:
        sys.stdout = stdout
        request_stop(None)


def as_flags(message: str, args) -> str:
    """``message`` with the config field names that are also flags of ``args`` (a
    dataclass of parsed flags) written as the flags: ``max_iters must be ...`` becomes
    ``--max-iters must be ...``, ``n_head=3`` becomes ``--n-head 3``. A name without an
    underscore (``dropout``, ``seed``: also plain words) only before ``=`` or `` must``."""
    if not dataclasses.is_dataclass(args):
        return message
    for name in sorted((f.name for f in dataclasses.fields(args)), key=len, reverse=True):
        flag = "--" + name.replace("_", "-")
        pattern = re.escape(name) + (r"(?![\w/.'\"\\])" if "_" in name
                                     else r"(?==| must\b)")
        # (not inside a path, a file name or a quoted key: /data_dir/, 'latent_dim')
        message = re.sub(r"(?<![\w\-/.'\"\\])" + pattern + r"(=(?=\S))?",
                         lambda m: flag + (" " if m.group(1) else ""), message)
    return message


def _run(fn, args, errors: tuple, interrupted):
    try:
        return fn(args)
    except (ValueError, *errors) as e:
        raise SystemExit(f"error: {as_flags(str(e), args)}") from e
    except OSError as e:  # (it names files: left as it is)
        raise SystemExit(f"error: {e}") from e
    except interrupted as e:  # fit has said where the run stands, in one line
        raise SystemExit(e.status) from None
    except KeyboardInterrupt:  # before or after training
        print("interrupted (not while training: no checkpoint was being written)",
              file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        if _failed_collective(e):
            # Another process of the job is gone: say so in one line, and leave without
            # JAX's exit-time barrier, which cannot succeed and aborts with a stack trace.
            import jax

            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            gone = _gone_processes()
            who = (f"process(es) {', '.join(map(str, gone))} stopped" if gone else
                   "another process has stopped or cannot be reached")
            sys.stdout.flush()
            print(f"error: process {jax.process_index()} of {jax.process_count()}: a "
                  f"collective across the job's processes failed ({first}): {who}; continue "
                  "from the latest checkpoint with --resume", file=sys.stderr, flush=True)
            os._exit(1)
        raise


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
    parallel: Annotated[Optional[Literal["pmap", "sharding", "fsdp", "none"]],
                        preset_default("{pmap,sharding,fsdp,none}")] = None
    """Data-parallel engine: pmap, sharding, fsdp (parameters and optimizer state sharded
    over the devices) or none (one device)."""
    devices: Annotated[Optional[int], own_default("INT")] = None
    """Devices to use (default: all local devices; on --resume, the run's setting)."""
    host_devices: Annotated[Optional[int], own_default("INT")] = None
    """CPU only: split the host into this many XLA devices (default: --devices when given,
    else the largest count <= the cores that divides the batch); ignored when XLA_FLAGS
    already sets it."""
    distributed: bool = False
    """Multi-host: call jax.distributed.initialize() first (run the same command on every
    host with the same --run-dir; each host loads only its share of every batch). Alone it
    takes the cluster's own detection (Cloud TPU, SLURM, Open MPI); elsewhere give
    --coordinator-address, --num-processes and --process-id."""
    coordinator_address: Annotated[Optional[str], own_default("HOST:PORT")] = None
    """With --distributed: process 0's address, which every process reaches."""
    num_processes: Annotated[Optional[int], own_default("N")] = None
    """With --distributed: how many processes join the job."""
    process_id: Annotated[Optional[int], own_default("I")] = None
    """With --distributed: this process's index, 0 to N-1."""
    distributed_timeout: Annotated[Optional[float], own_default("SECONDS")] = None
    """With --distributed: how long every process may take to join, and how long a
    process may go silent (dead, or its host unreachable) before the others stop (default
    120)."""
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
    tensorboard: bool = False
    """Also write each evaluation's figures as TensorBoard event files in
    RUN_DIR/tensorboard (needs the tensorboard extra: pip install 'genjax[tensorboard]')."""


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
    records = config_records(args.run_dir)
    if not records:
        return None
    newest = records[-1]
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


def resumed_path(given: Optional[str], saved: Optional[str],
                 env: Optional[str] = None) -> Optional[str]:
    """A path flag's value: as given, else the resumed run's saved one, else the
    environment variable ``env`` when set (None: unset), made absolute and normalised so
    that ``config.json`` records where the data came from and a resume from another working
    directory finds it too."""
    path = given if given is not None else saved
    if path is None and env is not None:
        path = os.environ.get(env) or None
    return None if path is None else str(pathlib.Path(path).expanduser().resolve())


def default_preset_for(cpu: str, accelerator: str) -> Callable[[], str]:
    """``() -> cpu`` when JAX sees no accelerator, else ``accelerator`` (it starts JAX)."""
    import jax

    return lambda: cpu if jax.default_backend() == "cpu" else accelerator


DISTRIBUTED_TIMEOUT_S = 120  # processes that have not all joined by then: one error line

ACCELERATOR_PRESETS = ("lecture", "gpu")  # every experiment's presets meant for GPUs / TPUs


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
                             f"experiment ({e}): it is a run of another experiment or of "
                             "another genjax version; resume it with the one that wrote it, "
                             "or start a new --run-dir") from e
        if args.seed is not None and args.seed != train.seed:
            raise ValueError(f"--seed {args.seed}: a resumed run continues with the random "
                             f"keys saved in its checkpoint (seed {train.seed}); drop --seed")
    if preset in ACCELERATOR_PRESETS:
        import jax

        if jax.default_backend() == "cpu":
            say(f"warning: preset {preset} is meant for a GPU or TPU; on this CPU it may take "
                "hours or days (the time it needs is said after its first steps); --preset "
                "cpu is the CPU's")
    new_train = schedule_over_run(override(train, args), args, base=train)
    if saved is not None:
        _say_schedule_change(args, train, new_train)
    return preset, override(model, args), new_train, saved


def _say_schedule_change(args: RunArgs, saved, new) -> None:
    """On a resume that changes the learning-rate schedule (a cosine decaying over a new
    ``--max-iters``, a new peak or floor), one line with the rate at the checkpoint's step
    before and after."""
    from genjax.train.checkpoint import saved_steps
    from genjax.train.optim import make_schedule

    steps = saved_steps(args.run_dir)
    if not steps:
        return
    saved = schedule_over_run(saved)
    before, after = float(make_schedule(saved)(steps[-1])), float(make_schedule(new)(steps[-1]))
    if saved.max_iters != new.max_iters and saved.lr_schedule == "cosine" or before != after:
        say(f"--resume changes the learning-rate schedule: at step {steps[-1]} the rate goes "
            f"from {before:.3g} to {after:.3g} (a cosine over --max-iters {saved.max_iters} "
            f"before, over {new.max_iters} now)" if new.lr_schedule == "cosine" else
            f"--resume changes the learning rate at step {steps[-1]} from {before:.3g} to "
            f"{after:.3g}")


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


def schedule_over_run(train, args: Optional[RunArgs] = None, base=None):
    """A cosine schedule decays over the whole run: ``lr_decay_iters = max_iters`` (as
    nanoGPT's recipes); its warm-up must end before. A run shorter than the preset's
    warm-up (``base``: the preset's or the resumed run's config, before the flags) keeps
    the warm-up's share of the run instead, saying so in one line; the value used is what
    ``config.json`` records.

    Raises:
      ValueError: a ``--warmup-iters`` given that is not below ``max_iters``, naming both; or
        ``args`` setting ``--warmup-iters`` / ``--min-lr`` for a constant learning rate
        (they would be recorded in config.json without taking effect).
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
        if args is not None and getattr(args, "warmup_iters", None) is not None:
            raise ValueError(f"--warmup-iters {train.warmup_iters} must be below --max-iters "
                             f"{train.max_iters}: pass a smaller --warmup-iters")
        base = base or train
        share = base.warmup_iters / max(base.max_iters, 1) if base.max_iters > base.warmup_iters \
            else 0.05
        warmup = min(int(share * train.max_iters), train.max_iters - 1)
        whose = "the run's" if getattr(args, "resume", False) else "the preset's"
        say(f"--max-iters {train.max_iters} is within {whose} {train.warmup_iters}-step "
            + (f"warm-up: warming up for {warmup} steps instead (the same share of the run)"
               if warmup else "warm-up: no warm-up instead (its share of the run is under a "
               "step)"))
        train = dataclasses.replace(train, warmup_iters=warmup)
    return dataclasses.replace(train, lr_decay_iters=train.max_iters)


COMPILE_CACHE_ENV = "GENJAX_COMPILE_CACHE"


MIN_CACHED_COMPILE_S = 0.25


def enable_compile_cache(directory: Optional[str] = None) -> Optional[pathlib.Path]:
    """Turn on JAX's persistent compilation cache; returns its folder (None: off).

    Compiled programs that took over a quarter of a second to build (train, eval and
    sampling steps, parameter init) are stored there and loaded by later runs with the same programs,
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
    # Also programs that build in a quarter of a second or more (JAX's default: one
    # second), such as the sampling loop of the cpu preset's GPT (0.9 s).
    if jax.config.jax_persistent_cache_min_compile_time_secs > MIN_CACHED_COMPILE_S:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_CACHED_COMPILE_S)
    return pathlib.Path(directory)


def start_run(args: RunArgs, batch_size: int, experiment: str,
              check: bool = True) -> pathlib.Path:
    """What every experiment does before it loads data or compiles: ``jax.distributed``
    initialisation (``--distributed``), the CPU host split into devices
    (:func:`genjax.train.parallel.split_host_into_devices`: ``--host-devices``, else
    ``--devices`` or the resumed run's, else one per core), then JAX's backends start and,
    on a CPU backend, the host's allocator is tuned
    (:func:`genjax.train.host.tune_host_allocator`), the persistent compilation
    cache (:func:`enable_compile_cache`), and with ``check`` the run directory's check
    (:func:`genjax.train.loop.check_run_dir`, before any data is loaded; :func:`fit` checks
    again); returns the run directory, absolute and normalised (messages name it so).

    Raises:
      ValueError: ``--distributed`` or ``--resume`` without ``--run-dir``; a resume of
        another experiment's run; ``--devices`` not dividing the batch; the explicit
        distributed flags incomplete, out of range or without ``--distributed``;
        ``--distributed`` after JAX started its backends, or a job not joined within
        ``--distributed-timeout`` (default ``DISTRIBUTED_TIMEOUT_S``).
      FileExistsError, FileNotFoundError: a new run over another run's files, or a resume
        without a checkpoint (nothing is touched).
    """
    import jax

    from genjax.train.distributed import JoinError, join, split_address
    from genjax.train.host import tune_host_allocator
    from genjax.train.loop import check_run_dir
    from genjax.train.parallel import split_host_into_devices

    if args.resume and args.run_dir is None:
        raise ValueError("--resume needs --run-dir DIR, the directory of the run to continue")
    given = pathlib.Path(args.run_dir).expanduser().resolve() if args.run_dir else None
    check_experiment(given if args.resume else None, experiment)
    if args.devices is not None and args.devices >= 1 and batch_size % args.devices:
        raise ValueError(f"--devices {args.devices}: the global batch {batch_size} is not "
                         f"divisible by {args.devices} devices; choose a batch that is a "
                         f"multiple of {args.devices}, or another --devices")
    explicit = {"coordinator_address": args.coordinator_address,
                "num_processes": args.num_processes, "process_id": args.process_id}
    joining = {k: v for k, v in explicit.items() if v is not None}
    timeout = DISTRIBUTED_TIMEOUT_S
    if args.distributed_timeout is not None:
        if not args.distributed:
            raise ValueError("--distributed-timeout: only with --distributed")
        if not (math.isfinite(args.distributed_timeout) and args.distributed_timeout >= 1):
            raise ValueError(f"--distributed-timeout must be a number of seconds >= 1, got "
                             f"{args.distributed_timeout!r}")
        timeout = args.distributed_timeout
    _job_timeout_s[0] = timeout
    if joining and not args.distributed:
        raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in joining)}: only with "
                         "--distributed")
    if args.distributed:
        if args.run_dir is None:
            raise ValueError("--distributed needs an explicit --run-dir shared by every host")
        if joining and len(joining) != 3:
            raise ValueError("--distributed without the cluster's detection needs all of "
                             "--coordinator-address, --num-processes and --process-id")
        if joining and not (args.num_processes >= 1 and 0 <= args.process_id < args.num_processes):
            raise ValueError(f"--process-id {args.process_id} must lie in [0, --num-processes "
                             f"{args.num_processes})")
        if joining:
            split_address(args.coordinator_address)  # a HOST:PORT, checked before anything
        if (jax._src.xla_bridge._backends or {}):
            raise ValueError("--distributed must come before JAX starts its backends")
        if joining:  # a rendezvous first, so that each failure is one line
            try:
                join(args.coordinator_address, args.num_processes, args.process_id, timeout)
            except JoinError as e:
                raise ValueError(f"--distributed (process {args.process_id} of "
                                 f"{args.num_processes}): {e}") from None
        else:  # the cluster's own detection
            try:
                jax.distributed.initialize(initialization_timeout=math.ceil(timeout),
                                           heartbeat_timeout_seconds=math.ceil(timeout))
            except Exception as e:  # (XLA's runtime errors: no cluster detected, a timeout)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(f"--distributed: could not join the job within {timeout:g} s "
                                 f"({first[:300]}); outside a detected cluster give "
                                 "--coordinator-address, --num-processes and --process-id") \
                    from e
    devices = args.devices
    if devices is None and args.resume:  # a resume splits the host as the run did
        saved = (saved_config(args) or {}).get("train", {}).get("devices")
        devices = saved if isinstance(saved, int) and saved >= 1 else None
    host_devices = args.host_devices if args.host_devices is not None else devices
    split = split_host_into_devices(batch_size, host_devices)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if (host_devices is None and 0 < split < (cores or 1) and getattr(args, "parallel", None)
            != "none" and jax.default_backend() == "cpu" and jax.process_count() == 1):
        say(f"the global batch {batch_size} is not divisible by this host's {cores} cores: "
            f"{split} host device(s) instead of one per core, which is faster; a --batch-size "
            f"divisible by {cores} gets one per core")
    if jax.default_backend() == "cpu":
        tune_host_allocator()  # XLA:CPU's per-step buffers on warm pages
    enable_compile_cache(args.compile_cache)
    run_dir = given or pathlib.Path(
        f"runs/{experiment}/{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if check:
        check_run_dir(run_dir, args.resume)
    return run_dir


def run_experiment(run_dir) -> Optional[str]:
    """The experiment that wrote the run in ``run_dir``, as its config record names it
    (``config.json``, else the newest ``config.resume-<step>.json``), or None (no record,
    or one of an older genjax that did not say)."""
    for path in reversed(config_records(run_dir)):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("experiment"), str):
            return record["experiment"]
    return None


def check_experiment(run_dir, experiment: str) -> None:
    """Refuse a run directory written by another experiment (``--resume``, ``sample``).

    Raises:
      ValueError: naming the experiment that wrote it and the command that reads it.
    """
    if run_dir is None:
        return
    wrote = run_experiment(run_dir)
    if wrote is not None and wrote != experiment:
        raise ValueError(f"--run-dir {run_dir} holds a run of experiments.{wrote}, not of "
                         f"experiments.{experiment}: use python -m experiments.{wrote} for it, "
                         "or choose another --run-dir")


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
