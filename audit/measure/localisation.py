"""Weak localisation (host side): the box around the map's hot region against the
annotated box (IoU, localisation error), as in the Grad-CAM paper.
"""

from __future__ import annotations

import numpy as np


def localisation_iou(hot: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """Weak localisation (the Grad-CAM paper's ILSVRC protocol), per image.

    The map's box bounds the largest connected component of ``hot`` (map >= t * max);
    the true box bounds ``truth``, the expected regions' pixels (at least half
    covered). Returns their box IoU; 0 for a zero map (no box), NaN when there is no
    expected region (``truth`` None or empty).
    """
    from scipy import ndimage

    result = np.full(len(hot), np.nan)
    if truth is None:
        return result
    for index, (mask, target) in enumerate(zip(hot, truth, strict=True)):
        if not target.any():
            continue
        labelled, count = ndimage.label(mask)
        if count == 0:  # a zero map draws no box: a miss
            result[index] = 0.0
            continue
        sizes = np.bincount(labelled.ravel())[1:]
        found = _box(labelled == 1 + int(sizes.argmax()))
        result[index] = box_iou(found, _box(target))
    return result


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1), inclusive-exclusive, of a non-empty mask's pixels."""
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of two (y0, x0, y1, x1) boxes."""
    height = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    width = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = height * width
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0
