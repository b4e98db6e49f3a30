"""Joining a multi-process job (``--distributed``) with errors a person can act on.

``jax.distributed.initialize`` with explicit coordinates aborts the process from C++
(``SIGABRT`` and a stack trace) when the coordinator cannot be reached or processes are
missing. :func:`join` first holds a small rendezvous of its own on the coordinator's port,
with the same timeout: process 0 listens there, every other process connects and says its
``--process-id`` and ``--num-processes``, and process 0 answers once all have come. A
coordinator that cannot be reached, a process that never comes (a ``--num-processes`` too
large), processes that disagree on ``--num-processes``, and two with one
``--process-id`` each end in one :class:`JoinError` line on every process concerned. Then
the port is released and ``jax.distributed.initialize`` joins the job as usual.

A process that dies later is JAX's to detect: the coordination service stops the others
once it has sent no heartbeat for ``timeout`` seconds, naming it ("The following tasks are
unhealthy (stopped sending heartbeats): 1").
"""

from __future__ import annotations

import json
import math
import socket
import time

POLL_S = 0.2  # between attempts to reach the coordinator
ACK_S = 10.0  # how long process 0's answer and each process's confirmation may travel


class JoinError(RuntimeError):
    """The processes of a job could not all join it; the message says which and why."""


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[IPv6]:PORT`` too) as ``(host, port)``.

    Raises:
      ValueError: no port, or a port outside 1-65535, naming the address.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator-address {address!r} must be HOST:PORT, e.g. "
                         "10.0.0.1:1234 (a port from 1 to 65535)")
    return host.strip("[]"), int(port)


def join(coordinator_address: str, num_processes: int, process_id: int,
         timeout: float) -> None:
    """Rendezvous of all ``num_processes`` processes (see the module's docstring), then
    ``jax.distributed.initialize`` with the same coordinates; ``timeout`` (seconds) bounds
    the rendezvous, JAX's own joining, and how long a silent process is waited for
    later (JAX's heartbeat timeout).

    Raises:
      JoinError: the coordinator cannot be reached, or a process is missing, duplicated
        or disagrees on the process count, within ``timeout``; or JAX's own joining
        failed (its first line quoted).
      ValueError: a malformed ``coordinator_address``.
    """
    import jax

    host, port = split_address(coordinator_address)
    if num_processes > 1:
        if process_id == 0:
            _gather(port, num_processes, timeout)
        else:
            _report(host, port, num_processes, process_id, timeout)
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=math.ceil(timeout),
                                   heartbeat_timeout_seconds=math.ceil(timeout))
    except Exception as e:  # (XLA's runtime errors)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JoinError(f"jax.distributed.initialize failed: {first[:300]}") from e


def _send(conn: socket.socket, message: dict) -> None:
    conn.sendall((json.dumps(message) + "\n").encode())


def _receive(conn: socket.socket, deadline: float) -> dict:
    """One JSON line from ``conn`` before ``deadline``; {} when the peer closed or sent
    something else."""
    data = b""
    while not data.endswith(b"\n"):
        conn.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = conn.recv(4096)
        if not chunk:
            return {}
        data += chunk
    try:
        message = json.loads(data)
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


def _gather(port: int, num_processes: int, timeout: float) -> None:
    """Process 0: wait for processes 1..N-1, check what each says, answer all."""
    deadline = time.monotonic() + timeout
    try:
        server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True) \
            if socket.has_dualstack_ipv6() else socket.create_server(("", port))
    except OSError as e:
        raise JoinError(f"process 0 cannot listen on port {port} of --coordinator-address "
                        f"({e.strerror or e}): another program, or another process that "
                        "says --process-id 0, holds it; choose a free port, and one process "
                        "0") from None
    joined: set[int] = set()
    conns: list[socket.socket] = []
    problem = None
    with server:
        while len(joined) < num_processes - 1 and problem is None:
            server.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                conn, _ = server.accept()
            except (socket.timeout, OSError):
                break  # the deadline passed
            conns.append(conn)
            try:
                said = _receive(conn, deadline)
            except (socket.timeout, OSError):
                said = {}
            i, n = said.get("process_id"), said.get("num_processes")
            if not said:
                problem = (f"a program that is not a process of this job connected to port "
                           f"{port} and said nothing genjax reads: choose another port")
            elif n != num_processes:
                problem = (f"process {i} says --num-processes {n}, process 0 says "
                           f"{num_processes}: give every process the same count")
            elif not isinstance(i, int) or not 0 < i < num_processes or i in joined:
                problem = (f"two processes say --process-id {i}: give each process its own "
                           f"index from 0 to {num_processes - 1}")
            joined.add(i)
        missing = sorted(set(range(1, num_processes)) - joined)
        if problem is None and missing:
            problem = (f"process(es) {', '.join(map(str, missing))} of --num-processes "
                       f"{num_processes} did not join within {timeout:g} s (joined: "
                       f"{', '.join(map(str, sorted({0, *joined})))}): check --num-processes "
                       "and that every process was started with the same "
                       "--coordinator-address")
        for conn in conns:
            try:
                _send(conn, {"ok": problem is None, "error": problem})
            except OSError:
                pass
        if problem is None:  # each confirms, then closes first (the port is free again)
            for conn in conns:
                try:
                    confirmed = _receive(conn, time.monotonic() + ACK_S).get("ack")
                    _receive(conn, time.monotonic() + ACK_S)  # until it has closed
                except (socket.timeout, OSError):
                    confirmed = False
                if not confirmed:
                    problem = "a process left before the job started (it gave up waiting)"
        for conn in conns:
            conn.close()
    if problem is not None:
        raise JoinError(problem)


def _report(host: str, port: int, num_processes: int, process_id: int,
            timeout: float) -> None:
    """Process I > 0: reach process 0, say who it is, wait for its answer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = socket.create_connection(
                (host, port), timeout=max(min(1.0, deadline - time.monotonic()), 0.01))
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise JoinError(f"could not reach the coordinator {host}:{port} within "
                                f"{timeout:g} s: start process 0 there, or check "
                                "--coordinator-address") from None
            time.sleep(POLL_S)
    with conn:
        try:
            _send(conn, {"process_id": process_id, "num_processes": num_processes})
            # process 0 answers by its own deadline: at most `timeout` after this connection
            answer = _receive(conn, time.monotonic() + timeout + ACK_S)
            if answer.get("ok"):
                _send(conn, {"ack": True})
        except OSError:
            answer = {}
    if not answer:
        raise JoinError(f"the coordinator {host}:{port} did not answer within {timeout:g} s "
                        "(is it a genjax process 0 of this job?)")
    if not answer.get("ok"):
        raise JoinError(f"process 0 refused the job: {answer.get('error')}")
