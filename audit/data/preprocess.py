"""Resize and scale decoded pixels for the model, and masks for the region metrics."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from audit.config.sections import PreprocessSection

# ------------------------------------------------------------ preprocessing


@dataclass(frozen=True)
class Preprocessor:
    """Resizes images (bilinear) and masks (nearest) and scales pixels as the model expects.

    With ``region_size`` smaller than ``size``, the finished regions are area-averaged
    to that measuring grid (float coverage fractions): done here, in the decode
    threads, so full-resolution masks never travel to the compiled step.
    """

    size: tuple[int, int]  # (height, width)
    settings: PreprocessSection
    region_size: tuple[int, int] | None = None
    channels: int = 3  # the model's input channels: 3 (RGB) or 1 (grey)

    def coverage(self, regions: np.ndarray) -> np.ndarray:
        """(R, H, W) bool -> (R, h, w) float32 area fractions at ``region_size``."""
        if self.region_size is None or tuple(self.region_size) == tuple(self.size):
            return regions
        (height, width), (rows, cols) = self.size, self.region_size
        values = regions.astype("float32")
        if height % rows == 0 and width % cols == 0:  # exact block means
            blocks = values.reshape(len(values), rows, height // rows, cols, width // cols)
            return blocks.mean(axis=(2, 4))
        return np.stack(
            [
                np.asarray(Image.fromarray(region, mode="F").resize((cols, rows), Image.BOX))
                for region in values
            ]
        )

    def image(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (h, w, 3), or (h, w) grey -> float32 (H, W, channels) ready for the model."""
        height, width = self.size
        if pixels.shape[:2] != (height, width):
            pixels = np.asarray(Image.fromarray(pixels).resize((width, height), Image.BILINEAR))
        values = pixels.astype("float32").reshape(height, width, -1)
        if self.settings.keras_preprocess:
            import keras

            module = getattr(keras.applications, self.settings.keras_preprocess)
            return np.asarray(module.preprocess_input(values.copy()), dtype="float32")
        values *= self.settings.scale
        if self.settings.mean is not None:
            values -= np.asarray(self.settings.mean, dtype="float32")
        if self.settings.std is not None:
            values /= np.asarray(self.settings.std, dtype="float32")
        return values

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """bool (h, w) -> bool (H, W), nearest neighbour."""
        height, width = self.size
        if mask.shape == (height, width):
            return mask
        resized = Image.fromarray(mask.astype("uint8") * 255).resize((width, height), Image.NEAREST)
        return np.asarray(resized) > 127

    def box(self, box: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
        """A pixel box of an image of ``shape`` (h, w) -> bool (H, W): the pixels that
        ``mask`` gives for the box drawn at full size, without drawing it there (a
        12000 x 12000 mask takes 144 MB)."""
        rows = _nearest_indices(shape[0], self.size[0])
        cols = _nearest_indices(shape[1], self.size[1])
        x_min, y_min, x_max, y_max = (max(int(round(v)), 0) for v in box)  # as _box_mask
        return ((rows >= y_min) & (rows < y_max))[:, None] & ((cols >= x_min) & (cols < x_max))


@functools.lru_cache(maxsize=256)
def _nearest_indices(source: int, target: int) -> np.ndarray:
    """The pixels along a side of ``source`` pixels that Pillow's nearest-neighbour
    resize to ``target`` pixels picks (it picks along each side apart)."""
    positions = Image.fromarray(np.arange(source, dtype="int32")[None, :])
    return np.asarray(positions.resize((target, 1), Image.NEAREST))[0]
