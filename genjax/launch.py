"""Run one command as N JAX processes on this machine: the local case of a multi-host job.

    python -m genjax.launch --processes N [--port P] [--grace S] -- COMMAND [ARGS ...]

Starts COMMAND N times, each with ``--distributed --coordinator-address 127.0.0.1:P
--num-processes N --process-id I`` appended (every genjax experiment takes these flags; see
:func:`genjax.train.cli.start_run`), prints each process's output lines prefixed with
``[I]`` (less Gloo's lines saying that every peer has joined), and stops every process with
one line when one fails (its exit status is the launcher's; the others' output from then on,
the errors that follow from the first, is not shown) or on Ctrl-C or SIGTERM (SIGINT to
each, then SIGKILL to any still running after a grace period): no process outlives the
launcher.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Annotated, Optional

import tyro

GRACE_S = 20.0  # after SIGINT, how long the processes get to save and stop


@dataclasses.dataclass(frozen=True)
class Args:
    """Run COMMAND as N JAX processes joined by jax.distributed (gloo on a CPU).

    The options come first, then -- and the command:
    python -m genjax.launch --processes 2 -- COMMAND"""

    command: Annotated[tuple[str, ...], tyro.conf.Positional,
                       tyro.conf.arg(metavar="COMMAND", help_behavior_hint="")]
    """The command to run (after --), e.g. python -m experiments.gpt_shakespeare ..."""
    processes: int = 2
    """How many processes."""
    port: Annotated[Optional[int], tyro.conf.arg(metavar="P", help_behavior_hint="")] = None
    """The coordinator's port on 127.0.0.1 (default: a free one)."""
    grace: float = GRACE_S
    """Seconds the processes get to save and stop after SIGINT, before SIGKILL."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Gloo prints one such message per process and communicator when all its peers have
# joined; it says nothing to the user. Several communicators print at once, so their pieces
# can share lines: a line made only of these pieces (and numbers) is dropped, unless it is
# one whole message whose count is short of the expected one.
_GLOO_JOINED = re.compile(r"\[Gloo\] Rank \d+ is connected to (\d+) peer ranks\. "
                          r"Expected number of connected peer ranks is : (\d+)\s*")
_GLOO_PIECES = re.compile(r"\[Gloo\] Rank | is connected to | peer ranks\. Expected number "
                          r"of connected peer ranks is : |\d+|\s+")


def _gloo_joined_only(line: str) -> bool:
    whole = _GLOO_JOINED.fullmatch(line)
    if whole:
        return whole[1] == whole[2]
    return (("[Gloo] Rank " in line or "peer ranks. Expected number" in line)
            and not _GLOO_PIECES.sub("", line))


def _relay(i: int, stream, lock: threading.Lock, muted: set) -> None:
    for line in stream:  # (read to the end: a process never blocks on a full pipe)
        if _gloo_joined_only(line):
            continue
        with lock:
            if i not in muted and not _READER_GONE.is_set():
                try:
                    sys.stdout.write(f"[{i}] {line}")
                    sys.stdout.flush()
                except BrokenPipeError:  # (| head): the job stops as on Ctrl-C
                    _reader_gone()


_READER_GONE = threading.Event()
_JOB_RUNNING = threading.Event()  # (a reader gone once the job has ended stops nothing)


def _reader_gone() -> None:
    """Standard output's reader is gone: it, and stderr if it shares the pipe, now go to
    /dev/null, and the launcher stops the job as on Ctrl-C (SIGINT to itself)."""
    if _READER_GONE.is_set():
        return
    _READER_GONE.set()
    try:
        shared = os.path.sameopenfile(1, 2)
    except OSError:
        shared = False
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2) if shared else (1,):
        os.dup2(devnull, fd)
    os.close(devnull)
    if _JOB_RUNNING.is_set():
        os.kill(os.getpid(), signal.SIGINT)


def launch(command, processes: int, port: Optional[int] = None, grace: float = GRACE_S) -> int:
    """Run ``command`` (a list of strings) as ``processes`` processes; returns the exit
    status: 0 when all succeed, the first failing process's status (128 + N for one
    killed by signal N, as a shell reports it), 127 when the command cannot be started, or
    130 after Ctrl-C or SIGTERM.

    Raises:
      ValueError: no command, fewer than 1 process, or a negative ``grace``.
    """
    if not command:
        raise ValueError("give the command after --, e.g. python -m genjax.launch "
                         "--processes 2 -- python -m experiments.gpt_shakespeare --run-dir DIR")
    if processes < 1:
        raise ValueError(f"--processes must be >= 1, got {processes}")
    if not grace >= 0:
        raise ValueError(f"--grace must be a number of seconds >= 0, got {grace}")
    port = port or free_port()
    lock = threading.Lock()
    muted: set = set()  # processes whose output is no longer shown
    procs, relays = [], []
    status = 0
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # (a scheduler's stop too)
    # SIGINT is the job's stop signal: handled here even when the launcher was started with
    # it ignored (a shell's `... &` without job control), and so at its default, not
    # ignored, in the processes it starts (exec resets a handled signal, not an ignored one).
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int in (signal.SIG_IGN, signal.SIG_DFL, None):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _JOB_RUNNING.set()
    try:
        for i in range(processes):
            p = subprocess.Popen(
                list(command) + ["--distributed", "--coordinator-address", f"127.0.0.1:{port}",
                                 "--num-processes", str(processes), "--process-id", str(i)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
            relays.append(threading.Thread(target=_relay, args=(i, p.stdout, lock, muted),
                                           daemon=True))
            relays[-1].start()
            procs.append(p)
        while None in [p.poll() for p in procs]:  # (every process polled each round)
            failed = [(i, p.returncode) for i, p in enumerate(procs)
                      if p.returncode not in (None, 0)]
            if failed:
                failed.sort(key=lambda f: f[1] >= 0)  # a death by signal first
                i, status = failed[0]
                relays[i].join(timeout=5)  # its last lines first
                with lock:  # the others' errors from here on follow from this one
                    muted.update(set(range(processes)) - {i})
                print(f"genjax.launch: process {i} {_ended(status)}; stopping the others "
                      "(their output from here on is not shown)", file=sys.stderr, flush=True)
                break
            time.sleep(0.2)
        else:
            failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
            if failed:  # all ended at once: a death first, if any, then the rest
                failed.sort(key=lambda f: f[1] >= 0)
                for relay in relays:
                    relay.join(timeout=5)
                print("genjax.launch: " + "; ".join(f"process {i} {_ended(status)}"
                                                    for i, status in failed),
                      file=sys.stderr, flush=True)
            status = failed[0][1] if failed else 0
        status = status if status >= 0 else 128 - status  # as a shell reports a signal
    except OSError as e:  # the command cannot be started
        print(f"genjax.launch: cannot start {command[0]!r} ({e.strerror or e}); stopping "
              f"the {len(procs)} started", file=sys.stderr, flush=True)
        status = 127
    except KeyboardInterrupt:
        why = ("standard output was closed" if _READER_GONE.is_set()
               else "interrupted (Ctrl-C or SIGTERM)")
        print(f"genjax.launch: {why}, stopping every process", file=sys.stderr, flush=True)
        status = 130
    try:  # (SIGTERM still handled: a second one cannot leave processes behind)
        _stop(procs, grace)
    finally:
        for p in procs:  # whatever interrupted the stop: nothing outlives the launcher
            if p.poll() is None:
                p.kill()
                p.wait()
        signal.signal(signal.SIGTERM, previous)
        if previous_int in (signal.SIG_IGN, signal.SIG_DFL):
            signal.signal(signal.SIGINT, previous_int)
        _JOB_RUNNING.clear()
    for relay in relays:  # the last lines of every process
        relay.join(timeout=5)
    return status


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _ended(status: int) -> str:
    """How a process ended, from its ``returncode`` (negative: the signal)."""
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


def _stop(procs, grace: float) -> None:
    """SIGINT to each running process, SIGKILL to any still running after ``grace`` s. A
    further Ctrl-C or SIGTERM meanwhile kills them at once."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    try:
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def main(argv=None) -> int:
    """Entry point; exits with :func:`launch`'s status."""
    args = tyro.cli(Args, args=argv, prog="python -m genjax.launch")
    try:
        status = launch(args.command, args.processes, args.port, args.grace)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    raise SystemExit(status)


if __name__ == "__main__":
    main()
