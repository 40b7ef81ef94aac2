"""Interventions on an image: remove the object (filled from shifted copies of the
image's own background), keep only the object, or paste it on another background.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

INTERVENTIONS = ("original", "object_only", "background_only", "mixed_rand", "mixed_same")
# What ``run_interventions`` probes unless told: Mixed-Same runs only where a heatmap
# flag is to be judged (``audit.analysis.analyse._interventions``).
DEFAULT_KINDS = ("object_only", "background_only", "mixed_rand")

# Shifts (fractions of the image's height and width) whose copies of an image fill its
# removed object (``fill_objects``).
FILL_SHIFTS = (
    (0.0, 0.5),
    (0.5, 0.0),
    (0.5, 0.5),
    (0.0, 0.25),
    (0.25, 0.0),
    (0.0, 0.75),
    (0.75, 0.0),
    (0.25, 0.25),
    (0.75, 0.75),
    (0.25, 0.75),
    (0.75, 0.25),
)


def _background_colours(images: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """Each image's mean colour outside its object (``(n, H, W)`` bool): ``(n, 1, 1, C)``."""
    background = ~objects
    counts = np.maximum(background.sum(axis=(1, 2)), 1)[:, None]
    sums = np.einsum("nhwc,nhw->nc", images, background.astype(images.dtype))
    return (sums / counts).astype(images.dtype)[:, None, None, :]


def _grow(objects: np.ndarray, pixels: int) -> np.ndarray:
    """``(n, H, W)`` masks grown by ``pixels`` in each image's plane."""
    from scipy.ndimage import binary_dilation

    return binary_dilation(objects, structure=np.ones((1, 3, 3), bool), iterations=pixels)


def _shifts(grown: np.ndarray) -> list[tuple[int, int]]:
    """Candidate shifts for one image's removed object (``grown``, (H, W) bool): one and
    two object widths and heights to each side (the nearest background, alike in
    colour and texture), then ``FILL_SHIFTS`` of the image."""
    height, width = grown.shape
    ys, xs = np.nonzero(grown)
    if not len(ys):
        return []
    tall, wide = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    near = [
        (dy * step * tall, dx * step * wide)
        for step in (1, 2)
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1))
    ]
    return near + [(round(dy * height), round(dx * width)) for dy, dx in FILL_SHIFTS]


def fill_objects(images: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """Each image with its object removed: the ``background_only`` intervention, and the
    backgrounds of Mixed-Rand and the transplant test.

    The object, grown by three pixels to take its anti-aliased rim, is filled with the
    image's own background, copied from a shifted copy of the image (``_shifts``: the
    nearest background first, then further): for each image the shifts are tried in
    the order of how well their copy continues the background just around the object,
    and each fills what earlier ones could not from background pixels. What no shift
    reaches (an object covering most of the image) takes the mean background colour.
    A flat fill would keep the object's silhouette (a filled stroke mask is the digit;
    a filled box looks like a "1"), and a silhouette is a shape the model may read as
    a class.
    """
    grown = _grow(objects, 3)
    rims = _grow(grown, 2) & ~grown
    height, width = objects.shape[1:]
    out = np.where(grown[..., None], _background_colours(images, objects), images)
    for index in range(len(images)):
        image, mine, rim = images[index], grown[index], rims[index]
        rim_y, rim_x = np.nonzero(rim)
        errors = []
        for dy, dx in (shifts := _shifts(mine)):
            source_y, source_x = (rim_y - dy) % height, (rim_x - dx) % width
            usable = ~mine[source_y, source_x]
            difference = image[rim_y, rim_x] - image[source_y, source_x]
            squared = (difference[usable] ** 2).sum(axis=-1)
            errors.append(squared.mean() if len(squared) else np.inf)
        todo_y, todo_x = np.nonzero(mine)
        for k in np.argsort(errors, kind="stable"):
            if not len(todo_y):
                break
            dy, dx = shifts[k]
            source_y, source_x = (todo_y - dy) % height, (todo_x - dx) % width
            found = ~mine[source_y, source_x]
            out[index, todo_y[found], todo_x[found]] = image[source_y[found], source_x[found]]
            todo_y, todo_x = todo_y[~found], todo_x[~found]
    return out


def intervene(
    images: np.ndarray,
    objects: np.ndarray,
    backgrounds: np.ndarray | None = None,
    kinds: Sequence[str] = ("original", *DEFAULT_KINDS),
    same: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The intervened copies of a batch, only those of ``kinds`` (each is a full copy).

    ``objects``: (n, H, W) bool object masks; ``backgrounds``: for each image the
    object-removed background of another class's image it is pasted onto (Mixed-Rand);
    ``same``: that of another image of its own class (Mixed-Same).
    """
    mask = objects[..., None]
    out: dict[str, np.ndarray] = {}
    if "original" in kinds:
        out["original"] = images
    if "object_only" in kinds:
        # Everything but the object is one flat colour, the mean background colour.
        out["object_only"] = np.where(mask, images, _background_colours(images, objects))
    if "background_only" in kinds:
        out["background_only"] = fill_objects(images, objects)
    if "mixed_rand" in kinds:
        if backgrounds is None:
            raise ValueError("mixed_rand needs the backgrounds to paste the objects onto")
        out["mixed_rand"] = np.where(mask, images, backgrounds)
    if "mixed_same" in kinds:
        if same is None:
            raise ValueError("mixed_same needs the backgrounds to paste the objects onto")
        out["mixed_same"] = np.where(mask, images, same)
    return out
