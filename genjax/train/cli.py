"""Command lines of the experiments: ``tyro`` subcommands and preset overrides."""

from __future__ import annotations

import dataclasses
import sys
from typing import Annotated, Mapping, Optional, Sequence, TypeVar, Union

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


def override(config: T, overrides) -> T:
    """``config`` with every field that ``overrides`` (a dataclass) sets to non-None and
    ``config`` also has."""
    names = {f.name for f in dataclasses.fields(config)}
    changes = {f.name: getattr(overrides, f.name) for f in dataclasses.fields(overrides)
               if f.name in names and getattr(overrides, f.name) is not None}
    return dataclasses.replace(config, **changes)
