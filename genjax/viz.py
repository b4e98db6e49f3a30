"""Figures drawn with matplotlib (Agg backend, PNG files): the image experiments' grids,
scatter and ROC plots, and every run's loss curves."""

from __future__ import annotations

import pathlib

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_mosaic(images, ncols: int, gap: int = 2, fill: float = 1.0) -> np.ndarray:
    """Tile images (N, H, W, 1) or (N, H, W) float into one 2-D array, row-major, with
    ``min(ncols, N)`` columns and ``ceil(N / ncols)`` rows, ``gap`` pixels of ``fill``
    between the images and in the cells of a last row left short: shape
    (rows * (H + gap) - gap, cols * (W + gap) - gap). Values are clipped to [0, 1].

    Raises:
      ValueError: ``ncols`` < 1, ``gap`` < 0, or no images / images not (N, H, W[, 1]).
    """
    images = np.asarray(images, np.float32)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or len(images) == 0:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, 1) with N >= 1, "
                         f"got shape {images.shape}")
    if ncols < 1 or gap < 0:
        raise ValueError(f"ncols must be >= 1 and gap >= 0, got ncols={ncols}, gap={gap}")
    n, h, w = images.shape
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    cells = np.full((nrows * ncols, h + gap, w + gap), fill, np.float32)
    cells[:n, :h, :w] = np.clip(images, 0.0, 1.0)
    mosaic = cells.reshape(nrows, ncols, h + gap, w + gap).transpose(0, 2, 1, 3)
    mosaic = mosaic.reshape(nrows * (h + gap), ncols * (w + gap))
    return mosaic[:mosaic.shape[0] - gap, :mosaic.shape[1] - gap]


_CELL_IN = 0.8 / 30  # figure inches per mosaic pixel: a 28-pixel digit and its gap, 0.8 in


def _show(ax, mosaic) -> None:
    """One ``imshow`` of a mosaic (grey, 0 black, 1 white) on ``ax``: one Axes for the
    whole grid, not one per image (a 15 x 15 grid took 2.6 s to draw that way, 0.15 s so)."""
    ax.imshow(mosaic, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.axis("off")


def save_image_grid(path, images, ncols: int, title: str = "") -> pathlib.Path:
    """Save images (N, H, W, 1) float in [0, 1] as a grid of ``ncols`` columns
    (:func:`image_mosaic`), ``title`` above it; a PNG file at ``path``.

    Raises:
      ValueError: as :func:`image_mosaic` (before any figure is made).
    """
    mosaic = image_mosaic(images, ncols)
    plt = _plt()
    height, width = mosaic.shape[0] * _CELL_IN, mosaic.shape[1] * _CELL_IN
    fig, ax = plt.subplots(figsize=(width, height))
    _show(ax, mosaic)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1)
    if title:  # above the grid, a tenth of an inch clear of its first row
        fig.suptitle(title, fontsize=9, y=1.0 + 0.1 / height, va="bottom")
    fig.savefig(path, dpi=80, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
    return pathlib.Path(path)


def save_scatter(path, codes, labels, title: str = "") -> pathlib.Path:
    """Save a scatter plot of 2-D codes (N, 2) coloured by integer labels (N,)."""
    plt = _plt()
    codes, labels = np.asarray(codes), np.asarray(labels)
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(codes[:, 0], codes[:, 1], c=labels, cmap="tab10", s=6, vmin=-0.5, vmax=9.5)
    fig.colorbar(sc, ax=ax, ticks=range(10), label="digit")
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return pathlib.Path(path)


def save_roc(path, scores_negative, scores_positive, auc: float, title: str = "") -> pathlib.Path:
    """Save the ROC curve of scores ranking positives above negatives."""
    plt = _plt()
    neg, pos = np.asarray(scores_negative), np.asarray(scores_positive)
    thresholds = np.unique(np.concatenate([neg, pos]))[::-1]
    tpr = np.concatenate([[0.0], [(pos >= t).mean() for t in thresholds]])
    fpr = np.concatenate([[0.0], [(neg >= t).mean() for t in thresholds]])
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return pathlib.Path(path)


def save_side_by_side(path, left, right, ncols: int, left_title: str, right_title: str,
                      title: str = "") -> pathlib.Path:
    """Save two grids of images (N, H, W, 1) float in [0, 1] side by side, ``ncols`` columns
    each (real images beside generated ones), each under its own title, at one scale and
    top-aligned.

    Raises:
      ValueError: as :func:`image_mosaic` (before any figure is made).
    """
    mosaics = [image_mosaic(images, ncols) for images in (left, right)]
    shape = tuple(max(m.shape[i] for m in mosaics) for i in (0, 1))
    padded = []
    for m in mosaics:  # the smaller grid on white, top left: both at one scale
        canvas = np.ones(shape, np.float32)
        canvas[:m.shape[0], :m.shape[1]] = m
        padded.append(canvas)
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(2 * shape[1] * _CELL_IN + 0.3,
                                            shape[0] * _CELL_IN + 0.6), layout="constrained")
    fig.get_layout_engine().set(wspace=0.06)  # the two grids well apart
    for ax, mosaic, name in zip(axes, padded, (left_title, right_title)):
        _show(ax, mosaic)
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return pathlib.Path(path)


def loss_series(records) -> dict:
    """``{name: (steps, values)}`` of every finite loss figure (keys ending in ``loss``)
    and of ``lr`` in a run's ``metrics.jsonl`` records."""
    series: dict = {}
    for r in records:
        for k, v in r.items():
            if (k.endswith("loss") or k == "lr") and isinstance(v, (int, float)) \
                    and np.isfinite(v) and "step" in r:
                series.setdefault(k, ([], []))
                series[k][0].append(r["step"])
                series[k][1].append(v)
    return series


def save_loss_curves(path, runs: dict, title: str = "") -> pathlib.Path:
    """Save the loss figures of one or more runs against the step, the learning rate
    recorded at each evaluation on a second axis (crosses: the schedule between them is not
    drawn). Draws without pyplot, so it may run on any thread.

    Args:
      path: the PNG file to write.
      runs: ``{label: records}``, each the list of a run's ``metrics.jsonl`` records.
      title: the figure's title.
    """
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: safe on the loop's drawing thread

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    lr_ax = None
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", "-.", (0, (5, 1)), (0, (3, 1, 1, 1))]
    names: list = []
    for i, (label, records) in enumerate(runs.items()):
        series = loss_series(records)
        prefix = f"{label}: " if len(runs) > 1 else ""
        for name, (steps, values) in series.items():
            if name == "lr":
                continue
            if name not in names:
                names.append(name)
            colour = colours[(i if len(runs) > 1 else names.index(name)) % len(colours)]
            style = styles[names.index(name) % len(styles)] if len(runs) > 1 else "-"
            ax.plot(steps, values, color=colour, linestyle=style, marker=".", markersize=3,
                    label=prefix + name)
        if "lr" in series:
            lr_ax = lr_ax or ax.twinx()
            lr_ax.plot(*series["lr"], color=colours[i % len(colours)] if len(runs) > 1
                       else "0.5", linestyle="none", marker="x", markersize=4,
                       label=prefix + "learning rate at evaluations")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    handles, labels = ax.get_legend_handles_labels()
    if lr_ax is not None:
        lr_ax.set_ylabel("learning rate")
        lr_ax.set_ylim(bottom=0)
        h2, l2 = lr_ax.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="best")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")
    return pathlib.Path(path)
