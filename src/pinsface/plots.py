"""Figures for the evaluation report: training curves, a clustered confusion matrix, sample hits and misses."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)
import numpy as np  # noqa: E402  (after choosing the Agg backend)
from matplotlib.gridspec import GridSpec  # noqa: E402  (after choosing the Agg backend)

# PNGs written with light compression: a little larger, and the report's figures are written much faster.
FAST_PNG = {"compress_level": 1}


def plot_curves(history: dict, path: Path) -> Path:
    """Loss, accuracy and learning rate per epoch for train and validation, for every training stage."""
    stages = history.get("stages", [])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
    offset = 0
    for stage in stages:
        epochs = np.arange(1, len(stage.get("loss", [])) + 1) + offset
        if not len(epochs):
            continue
        label = stage.get("stage", "")
        # Mixup trains on blends of two faces with blended labels: harder than the plain validation faces.
        train_label = f"train ({label}, mixup blends)" if stage.get("mixup") else f"train ({label})"
        for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
            ax.plot(epochs, stage[key], label=train_label, lw=1.8)
            if f"val_{key}" in stage:
                ax.plot(epochs, stage[f"val_{key}"], label=f"validation ({label})", lw=1.8, ls="--")
            ax.set_title(title)
        if "learning_rate" in stage:
            axes[2].plot(epochs, stage["learning_rate"], label=label, lw=1.8)
        best = offset + stage.get("best_epoch", len(epochs))
        for ax in axes:
            ax.axvline(best, color="crimson", lw=1, ls=":")
        last = best >= offset + len(epochs)  # kept the last epoch: label it on the left, inside the panel
        axes[1].annotate(
            f"kept: epoch {best}",
            xy=(best, axes[1].get_ylim()[0]),
            xytext=(-4 if last else 4, 8),
            textcoords="offset points",
            ha="right" if last else "left",
            color="crimson",
            fontsize=9,
        )
        offset = epochs[-1]
    axes[2].set_yscale("log")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("Training curves (dotted red line: the epoch early stopping kept)", fontsize=12)
    fig.savefig(path, dpi=100, pil_kwargs=FAST_PNG)
    plt.close(fig)
    return path


def cluster_order(similarity: np.ndarray) -> np.ndarray:
    """Leaf order of an average-linkage clustering, so that similar identities sit next to each other."""
    from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
    from scipy.spatial.distance import squareform

    distance = np.clip(1.0 - similarity, 0, None)
    distance = (distance + distance.T) / 2
    np.fill_diagonal(distance, 0)
    condensed = squareform(distance, checks=False)
    tree = linkage(condensed, method="average")
    return leaves_list(optimal_leaf_ordering(tree, condensed))


def most_confused_block(confusion: np.ndarray, size: int) -> tuple[int, int]:
    """[start, end) of the ``size``-wide diagonal window holding the most off-diagonal confusion."""
    n = len(confusion)
    size = min(size, n)
    off = confusion - np.diag(np.diag(confusion))
    scores = [off[i : i + size, i : i + size].sum() for i in range(n - size + 1)]
    start = int(np.argmax(scores))
    return start, start + size


def as_text(name: str) -> str:
    """A name as matplotlib should show it: dollar signs literal, never read as mathtext."""
    return str(name).replace("$", r"\$")


def plot_confusion(
    confusion: np.ndarray, labels: list[str], order: np.ndarray, path: Path, zoom: int = 14
) -> tuple[Path, tuple[int, int]]:
    """Row-normalised confusion matrix in cluster order, with a zoomed, annotated most-confused block."""
    cm = confusion[np.ix_(order, order)].astype(np.float64)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    names = [as_text(labels[i]) for i in order]
    n = len(names)
    side = max(8.0, 0.15 * n + 3)
    fig = plt.figure(figsize=(side + 9, side))
    grid = GridSpec(1, 2, width_ratios=[side, 8.5], wspace=0.35, figure=fig)
    ax = fig.add_subplot(grid[0])
    # Off-diagonal errors are what a reader looks for: a power scale keeps 1-2% cells visible.
    image = ax.imshow(norm, cmap="magma_r", norm=matplotlib.colors.PowerNorm(0.35, vmin=0, vmax=1))
    font = 7 if n > 60 else 9
    ax.set_xticks(range(n), names, rotation=90, fontsize=font)
    ax.set_yticks(range(n), names, fontsize=font)
    ax.set_xlabel("predicted identity", fontsize=11)
    ax.set_ylabel("true identity", fontsize=11)
    ax.set_title("Confusion matrix, normalised by row; similar and confused identities clustered together", fontsize=12)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01, label="share of the true identity's images")
    start, end = most_confused_block(cm, zoom)
    ax.add_patch(
        matplotlib.patches.Rectangle(
            (start - 0.5, start - 0.5), end - start, end - start, fill=False, edgecolor="dodgerblue", lw=2
        )
    )

    zax = fig.add_subplot(grid[1])
    block = norm[start:end, start:end]
    zax.imshow(block, cmap="magma_r", norm=matplotlib.colors.PowerNorm(0.35, vmin=0, vmax=1))
    zax.set_xticks(range(end - start), names[start:end], rotation=90, fontsize=9)
    zax.set_yticks(range(end - start), names[start:end], fontsize=9)
    for i in range(end - start):
        for j in range(end - start):
            count = int(cm[start + i, start + j])
            if count and i != j:
                zax.text(
                    j,
                    i,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if block[i, j] > 0.3 else "black",
                )
    zax.set_title("Most-confused block (numbers: misclassified images)", fontsize=11)
    fig.savefig(path, dpi=100, bbox_inches="tight", pil_kwargs=FAST_PNG)
    plt.close(fig)
    return path, (start, end)


def _crop_panel(ax, image: np.ndarray | None, title: str, color: str, note: str | None = None):
    if image is None:
        ax.imshow(np.full((150, 150, 3), 235, np.uint8))
    else:
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    if note:
        h, w = (150, 150) if image is None else image.shape[:2]
        ax.text(
            w / 2,
            h * 0.9,
            note,
            ha="center",
            va="bottom",
            fontsize=9,
            color="white",
            weight="bold",
            bbox={"facecolor": "crimson", "alpha": 0.85, "pad": 2, "edgecolor": "none"},
        )
    ax.set_title(title, fontsize=8.5, color=color, loc="left")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(2)


def plot_samples(samples: list[dict], path: Path, title: str, columns: int = 6) -> Path:
    """A grid of labelled faces. Each sample: image, true, pred, ``confidence`` (the head's probability) or
    ``distance`` (gallery mode; either may be None), and optionally ``neighbour`` (the nearest training face of
    the predicted identity) and ``note`` (e.g. no face found)."""
    if not samples:
        fig, ax = plt.subplots(figsize=(8, 2.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "Nothing to show: no image in this group.", ha="center", va="center", fontsize=14)
        fig.suptitle(title, fontsize=13)
        fig.savefig(path, dpi=90, pil_kwargs=FAST_PNG)
        plt.close(fig)
        return path
    paired = any("neighbour" in s for s in samples)
    per_row = columns // 2 if paired else columns
    n_rows = max(1, int(np.ceil(len(samples) / per_row)))
    fig, axes = plt.subplots(
        n_rows,
        columns,
        figsize=(columns * 2.6, n_rows * 3.4 + 1.0),
        squeeze=False,
        gridspec_kw={"hspace": 0.55, "wspace": 0.08},
    )
    for ax in axes.ravel():
        ax.axis("off")
    for k, sample in enumerate(samples):
        r, c = divmod(k, per_row)
        c = c * 2 if paired else c
        ax = axes[r][c]
        ax.axis("on")
        ok = sample["true"] == sample["pred"]
        color = "forestgreen" if ok else "crimson"
        pred = as_text(sample["pred"]) if sample["pred"] is not None else "-"
        text = f"true: {as_text(sample['true'])}\npred: {pred}"
        if sample.get("distance") is not None:
            text += f"\ndist: {sample['distance']:.2f}"
        elif sample.get("confidence") is not None:
            text += f"\nconf: {sample['confidence']:.2f}"
        _crop_panel(ax, sample["image"], text, color, sample.get("note"))
        if paired:
            nax = axes[r][c + 1]
            nax.axis("on")
            if sample.get("neighbour") is not None:
                _crop_panel(nax, sample["neighbour"], f"nearest training face\nof {pred}", "dimgray")
            else:
                _crop_panel(nax, None, "no face to compare", "dimgray")
    fig.suptitle(title, fontsize=13)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 1.1 / (n_rows * 3.4 + 1.0))
    fig.savefig(path, dpi=90, pil_kwargs=FAST_PNG)
    plt.close(fig)
    return path


def plot_open_set(curve_distance, curve_probability, point, path: Path) -> Path:
    """Share of strangers rejected vs share of known faces accepted and named correctly: the whole trade-off,
    and a close-up of the corner where a usable operating point lies."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.8), constrained_layout=True)
    # The close-up spans the calibrated point and the best corner, with some room around both.
    lo_x = max(0.0, min(point[0], 0.95) - 0.05)
    lo_y = max(0.0, min(point[1], 0.95) - 0.05)
    for ax, (x0, y0), title in (
        (axes[0], (0.0, 0.0), "the whole trade-off"),
        (axes[1], (lo_x, lo_y), "close-up of the top-right corner"),
    ):
        for curve, label in (
            (curve_distance, "sweeping the distance threshold"),
            (curve_probability, "sweeping the probability threshold"),
        ):
            xs, ys = zip(*curve)
            ax.plot(xs, ys, lw=2, label=label, marker="." if x0 else None, ms=4)
        ax.scatter(
            [point[0]],
            [point[1]],
            s=90,
            color="crimson",
            zorder=5,
            label=f"calibrated: {100 * point[0]:.1f}% rejected, {100 * point[1]:.1f}% named",
        )
        ax.set_xlabel("strangers rejected (share)")
        ax.set_ylabel("known test faces accepted and named correctly (share)")
        ax.set_title(title)
        pad_x, pad_y = (1.0 - x0) * 0.02, (1.0 - y0) * 0.02
        ax.set_xlim(x0 - pad_x, 1.0 + pad_x)
        ax.set_ylim(y0 - pad_y, 1.0 + pad_y)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=9)
    fig.suptitle("Open set: rejecting strangers vs naming known people")
    fig.savefig(path, dpi=100, pil_kwargs=FAST_PNG)
    plt.close(fig)
    return path
