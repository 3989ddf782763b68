"""MTCNN's box arithmetic between its networks, as mtcnn 1.x does it, but image by image.

Rows are MTCNN's: (image index, x1, y1, x2, y2, score) and, after O-net, 5 landmark x and 5 landmark y. Every
sort and suppression here looks at one image's rows only, so an image's faces never depend on which other
images share its batch (mtcnn sorts a whole batch at once, and equal scores, common near 1.0, then fall in an
order its companions decide).
"""

from __future__ import annotations

import numpy as np

# P-net's window and its stride in the pyramid level's pixels.
CELL = 12
STRIDE = 2


def sort_by_score(rows: np.ndarray, column: int = 5) -> np.ndarray:
    """Highest score first, ties as mtcnn orders them (a reversed ascending argsort)."""
    return rows[np.argsort(rows[:, column])[::-1]]


def proposals(offsets: np.ndarray, scores: np.ndarray, threshold: float, scale: float) -> np.ndarray:
    """P-net's windows above ``threshold`` on one pyramid level (batch of images), moved by its offsets and in
    image pixels: rows of each image, best first."""
    where = np.where(scores[..., 1] > threshold)  # image, y, x
    reg = offsets[where].astype(np.float64)
    image, y, x = where
    span = CELL - 1
    corners = [STRIDE * x + 1, STRIDE * y + 1, STRIDE * x + CELL, STRIDE * y + CELL]
    boxes = np.stack([c + reg[:, k] * span for k, c in enumerate(corners)], axis=1) / scale
    rows = np.column_stack([image, boxes, scores[where][:, 1]]).astype(np.float64)
    return np.concatenate([sort_by_score(rows[image == i]) for i in np.unique(image)] or [np.empty((0, 6))])


def _overlap(boxes: np.ndarray, method: str) -> np.ndarray:
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    x1 = np.maximum(boxes[None, :, 0], boxes[:, None, 0])
    y1 = np.maximum(boxes[None, :, 1], boxes[:, None, 1])
    x2 = np.minimum(boxes[None, :, 2], boxes[:, None, 2])
    y2 = np.minimum(boxes[None, :, 3], boxes[:, None, 3])
    inter = np.maximum(0, x2 - x1) * np.maximum(0, y2 - y1)
    if method == "union":
        return inter / (area[:, None] + area[None, :] - inter)
    return inter / np.minimum(area[:, None], area[None, :])


def same_place(a, b, least: float = 0.5) -> bool:
    """Whether boxes ``a`` and ``b`` (x1, y1, x2, y2) overlap by at least ``least`` of their union: one face."""
    return bool(_overlap(np.array([a, b], np.float64), "union")[0, 1] >= least)


def suppress(rows: np.ndarray, threshold: float, method: str = "union", sort: bool = True) -> np.ndarray:
    """mtcnn's suppression, per image: a row goes where any row before it (even one that went) overlaps it more
    than ``threshold``. With ``sort`` each image's rows are put best first before."""
    kept = []
    for i in np.unique(rows[:, 0]):
        own = rows[rows[:, 0] == i]
        if sort:
            own = sort_by_score(own)
        overlap = np.triu(_overlap(own[:, 1:5], method) > threshold, k=1)
        kept.append(own[~overlap.any(axis=0)])
    return np.concatenate(kept) if kept else np.empty((0, rows.shape[1]))


def to_square(rows: np.ndarray) -> np.ndarray:
    """Each box grown to a square on its longer side, about its centre."""
    rows = rows.copy()
    w, h = rows[:, 3] - rows[:, 1], rows[:, 4] - rows[:, 2]
    side = np.maximum(w, h)
    rows[:, 1] = rows[:, 1] + w * 0.5 - side * 0.5  # in mtcnn's order of operations, to its last bit
    rows[:, 2] = rows[:, 2] + h * 0.5 - side * 0.5
    rows[:, 3], rows[:, 4] = rows[:, 1] + side, rows[:, 2] + side
    return rows


def moved(rows: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Boxes moved by a network's offsets (fractions of each box's inclusive width and height). The shifts are
    float32 products, as mtcnn's (a TensorFlow tensor times an array) are."""
    rows = rows.copy()
    w, h = rows[:, 3] - rows[:, 1] + 1, rows[:, 4] - rows[:, 2] + 1
    rows[:, 1:5] += offsets.astype(np.float32) * np.stack([w, h, w, h], axis=-1).astype(np.float32)
    return rows


def landmarks_in_box(points: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """O-net's 5 x and 5 y (fractions of the box it was given) in image pixels, as mtcnn places them."""
    w, h = rows[:, 3:4] - rows[:, 1:2] + 1, rows[:, 4:5] - rows[:, 2:3] + 1
    return np.concatenate([w * points[:, :5] + rows[:, 1:2] - 1, h * points[:, 5:] + rows[:, 2:3] - 1], axis=1)


def above(rows: np.ndarray, threshold: float, column: int = 5) -> np.ndarray:
    return rows[rows[:, column] > threshold]
