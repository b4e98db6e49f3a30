"""Ctrl-C in a program started with ``python -m``, before its command handles it.

Two things go wrong with Python's own handling while JAX is imported and the command is
being set up:

- the ``KeyboardInterrupt`` may land where Python cannot raise it (a garbage-collector
  callback, which JAX registers; a ``__del__`` method; a weakref callback), so Python prints
  it as "Exception ignored" and drops it: the Ctrl-C is lost and the program runs on;
- otherwise it ends the program with a traceback of whatever was being imported.

:func:`install` fixes both for the process: a ``KeyboardInterrupt`` that Python could not
raise is delivered again (SIGINT to the process, 50 ms later, from a daemon thread), and
an unhandled one is one ``interrupted`` line on stderr, Python still ending with the
SIGINT exit status (130 in a shell); so is an error that a Ctrl-C caused (a C extension
whose initialisation it interrupted), exit status 130. Training handles SIGINT itself
while it runs (:func:`genjax.train.loop.fit`).
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import time

RETRY_S = 0.05  # how long after a dropped Ctrl-C it is delivered again
AFTER_CTRL_C_S = 5.0  # an unhandled error this soon after a Ctrl-C is the interruption's

_state = {"pending": False, "last_sigint": None}


def _sigint(signum, frame):
    """Python's own SIGINT handling (raise ``KeyboardInterrupt``), noting when."""
    _state["last_sigint"] = time.monotonic()
    raise KeyboardInterrupt


def _deliver_again(signum: int) -> None:
    time.sleep(RETRY_S)
    _state["pending"] = False
    os.kill(os.getpid(), signum)


def _unraisable(unraisable, _default=sys.unraisablehook):
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        if not _state["pending"]:  # (once for one Ctrl-C, however often it was dropped)
            _state["pending"] = True
            _thread.start_new_thread(_deliver_again, (signal.SIGINT,))  # (a daemon thread)
    else:
        _default(unraisable)


def _excepthook(kind, value, traceback, _default=sys.excepthook):
    last = _state["last_sigint"]
    if issubclass(kind, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
    elif last is not None and time.monotonic() - last < AFTER_CTRL_C_S:
        # A C extension interrupted while it initialised fails with its own error
        # (tensorstore: "ImportError: initialization failed"): still the Ctrl-C.
        print("interrupted", file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)
    else:
        _default(kind, value, traceback)


def install() -> None:
    """Install the SIGINT handler, ``sys.unraisablehook`` and ``sys.excepthook`` above
    (the handler only from the main thread, and only over Python's own)."""
    import threading

    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        signal.signal(signal.SIGINT, _sigint)
    sys.unraisablehook = _unraisable
    sys.excepthook = _excepthook
