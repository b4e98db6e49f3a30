"""Figures of the image experiments, drawn with matplotlib (Agg backend, PNG files)."""

from __future__ import annotations

import pathlib

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_image_grid(path, images, ncols: int, title: str = "") -> pathlib.Path:
    """Save images (N, H, W, 1) float in [0, 1] as a grid of ``ncols`` columns."""
    plt = _plt()
    images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    n = len(images)
    nrows = -(-n // ncols)
    height = nrows * 0.8 + (0.4 if title else 0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * 0.8, height), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img in zip(axes.ravel(), images):
        ax.imshow(img[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.1, rect=(0, 0, 1, 1 - (0.35 / height if title else 0)))
    fig.savefig(path, dpi=80)
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
    each (real images beside generated ones)."""
    plt = _plt()
    grids = [np.clip(np.asarray(images, np.float32), 0.0, 1.0) for images in (left, right)]
    nrows = max(-(-len(g) // ncols) for g in grids)
    fig = plt.figure(figsize=(2 * ncols * 0.8 + 0.3, nrows * 0.8 + 0.6))
    panels = fig.subfigures(1, 2, wspace=0.05)
    for sub, images, name in zip(panels, grids, (left_title, right_title)):
        axes = sub.subplots(nrows, ncols, squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, img in zip(axes.ravel(), images):
            ax.imshow(img[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
        sub.suptitle(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10, y=1.0)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return pathlib.Path(path)
