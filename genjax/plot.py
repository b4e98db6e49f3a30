"""Overlay the loss curves of several runs.

    python -m genjax.plot RUN_DIR [RUN_DIR ...] [--out PATH]

Reads each run's ``metrics.jsonl`` (any experiment) and draws every loss figure against the
step, one colour per run, the learning rate dotted on a second axis
(:func:`genjax.viz.save_loss_curves`). Each run also keeps its own ``loss.png``, redrawn at
every evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Annotated

import tyro


@dataclasses.dataclass(frozen=True)
class Args:
    """Overlay the loss curves of runs."""

    run_dirs: Annotated[tuple[str, ...], tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
    """Run directories (each holds metrics.jsonl)."""
    out: Annotated[str, tyro.conf.arg(metavar="PATH")] = "loss-comparison.png"
    """The PNG file to write."""


def read_records(run_dir) -> list[dict]:
    """The records of ``RUN_DIR/metrics.jsonl``.

    Raises:
      FileNotFoundError: no ``metrics.jsonl`` there. ValueError: a line that is not JSON,
        naming the file and line.
    """
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a run directory?)")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path}, line {i}: not JSON ({e})") from None
    return records


def main(argv=None) -> pathlib.Path:
    """Write the overlay; bad input ends with one ``error: ...`` line (exit status 1)."""
    from genjax.viz import save_loss_curves

    args = tyro.cli(Args, args=argv, prog="python -m genjax.plot")
    if not args.run_dirs:
        raise SystemExit("error: give at least one RUN_DIR (a run directory holding "
                         "metrics.jsonl): python -m genjax.plot RUN_DIR [RUN_DIR ...]")
    try:
        runs = {}
        for d in args.run_dirs:
            label = pathlib.Path(d).resolve().name
            runs[label if label not in runs else str(d)] = read_records(d)
        path = save_loss_curves(args.out, runs, title=f"{len(runs)} run(s)")
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {path}", file=sys.stderr)
    return path


if __name__ == "__main__":
    main()
