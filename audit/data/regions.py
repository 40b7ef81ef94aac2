"""Region masks (object, box, face, background, ...) of one image, from its mask,
boxes and faces, as the config's regions ask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from audit.config.sections import RegionSection
from audit.data.decode import SkipRow

# ------------------------------------------------------------------ regions


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    if pixels <= 0 or not mask.any():
        return mask
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, iterations=pixels)


def _box_mask(box: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
    x_min, y_min, x_max, y_max = (int(round(v)) for v in box)
    mask = np.zeros(shape, dtype=bool)
    mask[max(y_min, 0) : max(y_max, 0), max(x_min, 0) : max(x_max, 0)] = True
    return mask


def _mask_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return _box_mask((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), mask.shape)


def build_regions(
    regions: Sequence[RegionSection],
    mask: np.ndarray | None,
    box: np.ndarray | None,
    shape: tuple[int, int],
    faces: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """The (regions, H, W) stack for one image, from its resized mask, box and face masks.

    ``faces`` maps face region names to their masks, or to None when the image has
    no face: an expected face region then skips the row, a spurious one stays empty.
    """
    built: dict[str, np.ndarray] = {}
    for region in regions:
        if region.source == "mask":
            if mask is None:
                raise SkipRow(f"region {region.name!r} needs an object mask and the row has none")
            area = _mask_box(mask) if region.box_from_mask and mask.any() else mask
        elif region.source == "box":
            if box is None:
                raise SkipRow(f"region {region.name!r} needs a box and the row has none")
            area = box
        elif region.source == "face":
            area = (faces or {}).get(region.name)
            if area is None:
                if region.role == "expected":
                    raise SkipRow(f"no face found for region {region.name!r}")
                area = np.zeros(shape, dtype=bool)
        elif region.source == "border":
            area = np.ones(shape, dtype=bool)
            area[region.width : -region.width, region.width : -region.width] = False
        else:
            continue  # background: the complement, filled in below
        built[region.name] = _dilate(area, region.dilate)
    # The background is the rest: what no object, box or face region covers, whatever
    # its role (a spurious face is not background); a border band may overlap it.
    taken = np.zeros(shape, dtype=bool)
    for region in regions:
        if region.name not in built or region.source == "border":
            continue
        if region.role == "expected" and not built[region.name].any():
            raise SkipRow(f"the {region.name!r} region is empty (an empty mask or box)")
        taken |= built[region.name]
    for region in regions:
        if region.source == "background":
            built[region.name] = _dilate(~taken, region.dilate)
    if not built:  # no regions: what a plain forward pass reads (benchmarks)
        return np.zeros((0, *shape), dtype=bool)
    return np.stack([built[region.name] for region in regions])
