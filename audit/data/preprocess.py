"""Resize and scale decoded pixels for the model, and masks for the region metrics."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from audit.config.sections import PreprocessSection

# ------------------------------------------------------------------ geometry


@dataclass(frozen=True)
class Frame:
    """Where an image's pixels land in the model's input of ``size``: the part of the
    image that is kept (``window``: top, left, height, width; all of it unless cropped
    to the input's aspect ratio), the size that part is resized to (``inner``), and
    where it lies in the input (``offset``: top, left; the rest is padding, zeros)."""

    window: tuple[int, int, int, int]
    inner: tuple[int, int]
    offset: tuple[int, int]
    size: tuple[int, int]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """The window as Pillow's box: (left, top, right, bottom)."""
        top, left, height, width = self.window
        return left, top, left + width, top + height

    def place(self, resized: np.ndarray) -> np.ndarray:
        """The window resized to ``inner`` -> the input of ``size``, padded with zeros
        (False for a mask)."""
        if resized.shape[:2] == tuple(self.size):
            return resized
        canvas = np.zeros((*self.size, *resized.shape[2:]), resized.dtype)
        top, left = self.offset
        canvas[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
        return canvas


def _frame(shape: tuple[int, int], size: tuple[int, int], crop: bool, pad: bool) -> Frame:
    """The frame of an image of ``shape`` (h, w) in an input of ``size`` (H, W), computed
    as image_dataset_from_directory computes it, in float32 as TensorFlow traces it:
    ``smart_resize``'s centred crop, or ``tf.image.resize_with_pad``'s fit and padding."""
    (height, width), (rows, cols) = shape, size
    f32 = np.float32
    if crop:
        kept_height = max(min(height, int(f32(width * rows) / f32(cols))), 1)
        kept_width = max(min(width, int(f32(height * cols) / f32(rows))), 1)
        top, left = int(f32(height - kept_height) / f32(2)), int(f32(width - kept_width) / f32(2))
        return Frame((top, left, kept_height, kept_width), size, (0, 0), size)
    if pad:
        ratio = max(f32(width) / f32(cols), f32(height) / f32(rows))
        fitted_height, fitted_width = f32(height) / ratio, f32(width) / ratio
        # TensorFlow refuses a side that rounds down to 0 pixels (a 1 x 500 strip for a
        # square input); it is kept one pixel thick here.
        inner = (max(int(np.floor(fitted_height)), 1), max(int(np.floor(fitted_width)), 1))
        offset = tuple(
            max(int(np.floor((f32(target) - fitted) / f32(2))), 0)
            for target, fitted in ((rows, fitted_height), (cols, fitted_width))
        )
        return Frame((0, 0, height, width), inner, offset, size)
    return Frame((0, 0, height, width), size, (0, 0), size)


# ------------------------------------------------------------ preprocessing


@dataclass(frozen=True)
class Preprocessor:
    """Resizes images (bilinear) and masks (nearest) and scales pixels as the model expects.

    ``settings.resize``: ``keras`` resizes as TensorFlow's ``tf.image.resize`` (bilinear,
    no antialiasing, float32 pixels), the pixels ``image_dataset_from_directory`` gives;
    ``pillow`` as Pillow (antialiased bilinear, uint8). Either crops or pads to the
    input's aspect ratio as configured (``Frame``); masks and boxes follow the same
    frame, and padding belongs to no mask or box (so it is background).

    With ``region_size`` smaller than ``size``, the finished regions are area-averaged
    to that measuring grid (float coverage fractions): done here, in the decode
    threads, so full-resolution masks never travel to the compiled step.
    """

    size: tuple[int, int]  # (height, width)
    settings: PreprocessSection
    region_size: tuple[int, int] | None = None
    channels: int = 3  # the model's input channels: 3 (RGB) or 1 (grey)

    def frame(self, shape: tuple[int, int]) -> Frame:
        """Where an image of ``shape`` (h, w) lands in the model's input."""
        settings = self.settings
        crop, pad = settings.crop_to_aspect_ratio, settings.pad_to_aspect_ratio
        return _frame(tuple(shape), tuple(self.size), crop, pad)

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

    def resize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (h, w, 3), or (h, w) grey -> the same at the input size, cropped or padded
        as configured: float32 with ``resize: keras``, uint8 with ``pillow``. Pixels
        already at the input size are returned as they are."""
        if pixels.shape[:2] == tuple(self.size):
            return pixels
        frame = self.frame(pixels.shape[:2])
        if self.settings.resize == "keras":
            top, left, height, width = frame.window
            resized = _bilinear(pixels[top : top + height, left : left + width], frame.inner)
        else:
            rows, cols = frame.inner
            image = Image.fromarray(pixels)
            resized = np.asarray(image.resize((cols, rows), Image.BILINEAR, box=frame.box))
        return frame.place(resized)

    def image(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (h, w, 3) or (h, w) grey, or pixels at the input size (``resize``, as the
        decoder gives them) -> float32 (H, W, channels) ready for the model."""
        height, width = self.size
        values = self.resize(pixels).astype("float32").reshape(height, width, -1)
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
        """bool (h, w) -> bool (H, W): the frame's window, nearest neighbour, placed."""
        if mask.shape == tuple(self.size):
            return mask
        frame = self.frame(mask.shape)
        top, left, height, width = frame.window
        rows, cols = frame.inner
        window = mask[top : top + height, left : left + width].astype("uint8") * 255
        resized = Image.fromarray(window).resize((cols, rows), Image.NEAREST)
        return frame.place(np.asarray(resized) > 127)

    def box(self, box: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
        """A pixel box of an image of ``shape`` (h, w) -> bool (H, W): the pixels that
        ``mask`` gives for the box drawn at full size, without drawing it there (a
        12000 x 12000 mask takes 144 MB)."""
        frame = self.frame(shape)
        top, left, height, width = frame.window
        rows = top + _nearest_indices(height, frame.inner[0])
        cols = left + _nearest_indices(width, frame.inner[1])
        x_min, y_min, x_max, y_max = (max(int(round(v)), 0) for v in box)  # as _box_mask
        inside = ((rows >= y_min) & (rows < y_max))[:, None] & ((cols >= x_min) & (cols < x_max))
        return frame.place(inside)


@functools.lru_cache(maxsize=256)
def _nearest_indices(source: int, target: int) -> np.ndarray:
    """The pixels along a side of ``source`` pixels that Pillow's nearest-neighbour
    resize to ``target`` pixels picks (it picks along each side apart)."""
    positions = Image.fromarray(np.arange(source, dtype="int32")[None, :])
    return np.asarray(positions.resize((target, 1), Image.NEAREST))[0]


# --------------------------------------------------------- Keras' resize


@functools.lru_cache(maxsize=256)
def _interpolation(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Along a side of ``source`` pixels resized to ``target``: each output pixel's
    lower and upper source pixel and the weight of the upper one, in float32 as
    TensorFlow's ResizeBilinear computes them (half-pixel centres)."""
    scale = np.float32(source) / np.float32(target)
    centres = (np.arange(target, dtype="float32") + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(centres)
    lower = np.maximum(floor, 0).astype(np.intp)
    upper = np.minimum(np.ceil(centres), source - 1).astype(np.intp)
    return lower, upper, centres - floor


def _bilinear(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (h, w[, c]) -> float32 (H, W[, c]): ``tf.image.resize(pixels, size)``
    (bilinear, antialias False) to the bit, in NumPy: it reads only the two nearest
    rows and columns of each output pixel, so those are gathered from the uint8 pixels
    first (a 12000 x 12000 image is never converted to float whole)."""
    if pixels.shape[:2] == tuple(size):
        return pixels.astype("float32")
    top, bottom, down = _interpolation(pixels.shape[0], size[0])
    left, right, across = _interpolation(pixels.shape[1], size[1])
    extra = (1,) * (pixels.ndim - 2)  # the channel axis, if any
    across, down = across.reshape(1, -1, *extra), down.reshape(-1, 1, *extra)
    upper_rows, lower_rows = pixels[top], pixels[bottom]
    # In TensorFlow's order: along each row first, then between the rows.
    upper = _lerp(upper_rows[:, left], upper_rows[:, right], across)
    lower = _lerp(lower_rows[:, left], lower_rows[:, right], across)
    return upper + (lower - upper) * down


def _lerp(start: np.ndarray, end: np.ndarray, weight: np.ndarray) -> np.ndarray:
    start = start.astype("float32")
    return start + (end.astype("float32") - start) * weight
