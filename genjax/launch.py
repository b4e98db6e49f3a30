"""Run one command as N JAX processes on this machine: the local case of a multi-host job.

    python -m genjax.launch --processes N [--port P] -- COMMAND [ARGS ...]

Starts COMMAND N times, each with ``--distributed --coordinator-address 127.0.0.1:P
--num-processes N --process-id I`` appended (every genjax experiment takes these flags; see
:func:`genjax.train.cli.start_run`), prints each process's output lines prefixed with
``[I]``, and stops every process with one line when one fails (its exit status is the
launcher's) or on Ctrl-C (SIGINT to each, then SIGKILL to any still running after a grace
period): no process outlives the launcher.
"""

from __future__ import annotations

import dataclasses
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
    """Run COMMAND as N JAX processes joined by jax.distributed (gloo on a CPU)."""

    command: Annotated[tuple[str, ...], tyro.conf.Positional,
                       tyro.conf.arg(metavar="COMMAND")]
    """The command to run (after --), e.g. python -m experiments.gpt_shakespeare ..."""
    processes: int = 2
    """How many processes."""
    port: Annotated[Optional[int], tyro.conf.arg(metavar="P")] = None
    """The coordinator's port on 127.0.0.1 (default: a free one)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _relay(i: int, stream, lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            sys.stdout.write(f"[{i}] {line}")
            sys.stdout.flush()


def launch(command, processes: int, port: Optional[int] = None) -> int:
    """Run ``command`` (a list of strings) as ``processes`` processes; returns the exit
    status: 0 when all succeed, the first failing process's status, or 130 after Ctrl-C.

    Raises:
      ValueError: no command, or fewer than 1 process.
    """
    if not command:
        raise ValueError("give the command after --, e.g. python -m genjax.launch "
                         "--processes 2 -- python -m experiments.gpt_shakespeare --run-dir DIR")
    if processes < 1:
        raise ValueError(f"--processes must be >= 1, got {processes}")
    port = port or free_port()
    lock = threading.Lock()
    procs = []
    for i in range(processes):
        p = subprocess.Popen(
            list(command) + ["--distributed", "--coordinator-address", f"127.0.0.1:{port}",
                             "--num-processes", str(processes), "--process-id", str(i)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        threading.Thread(target=_relay, args=(i, p.stdout, lock), daemon=True).start()
        procs.append(p)
    status = 0
    try:
        while None in [p.poll() for p in procs]:  # (every process polled each round)
            failed = [(i, p.returncode) for i, p in enumerate(procs)
                      if p.returncode not in (None, 0)]
            if failed:
                i, status = failed[0]
                print(f"genjax.launch: process {i} exited with status {status}; stopping the "
                      "others", file=sys.stderr, flush=True)
                break
            time.sleep(0.2)
        else:
            failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
            status = failed[0][1] if failed else 0
    except KeyboardInterrupt:
        print("genjax.launch: Ctrl-C, stopping every process", file=sys.stderr, flush=True)
        status = 130
    _stop(procs)
    return status


def _stop(procs) -> None:
    """SIGINT to each running process, SIGKILL to any still running after GRACE_S."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv=None) -> int:
    """Entry point; exits with :func:`launch`'s status."""
    args = tyro.cli(Args, args=argv, prog="python -m genjax.launch")
    try:
        status = launch(args.command, args.processes, args.port)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    raise SystemExit(status)


if __name__ == "__main__":
    main()
