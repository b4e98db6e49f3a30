"""Ctrl-C in a program started with ``python -m``, before its command handles it.

Two things go wrong with Python's own handling while JAX is imported and the command is
being set up:

- the ``KeyboardInterrupt`` may land inside a garbage-collector callback (JAX registers
  one) or a ``__del__`` method, where Python prints it as "Exception ignored" and drops it:
  the Ctrl-C is lost and the program runs on;
- otherwise it ends the program with a traceback of whatever was being imported.

:func:`install` fixes both for the process: the SIGINT handler raises
``KeyboardInterrupt`` as Python's does, except inside such a callback, where it sends the
signal again 50 ms later; and an unhandled ``KeyboardInterrupt`` is one ``interrupted``
line on stderr, Python still ending with the SIGINT exit status (130 in a shell).
Training replaces the handler while it runs (:func:`genjax.train.loop.fit`) and puts this
one back after.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading

RETRY_S = 0.05  # how long after a Ctrl-C that met a callback it is delivered again


def _in_unraisable_context(frame) -> bool:
    """Whether ``frame`` runs inside a gc callback or a ``__del__`` method, where an
    exception is printed and dropped."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _sigint(signum, frame):
    if _in_unraisable_context(frame):
        threading.Timer(RETRY_S, os.kill, (os.getpid(), signum)).start()
        return
    raise KeyboardInterrupt


def _excepthook(kind, value, traceback, _default=sys.excepthook):
    if issubclass(kind, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
    else:
        _default(kind, value, traceback)


def install() -> None:
    """Install the SIGINT handler and ``sys.excepthook`` above (main thread only; a
    SIGINT that Python's default handler no longer owns is left alone)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _sigint)
    sys.excepthook = _excepthook
