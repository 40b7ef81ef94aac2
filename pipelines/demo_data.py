"""A small biased dataset and model, built in seconds from scikit-learn's digits.

Each image is a digit composited onto a procedural texture. In the training set a
few "shortcut" classes are paired with one texture each most of the time, so a
model can learn to answer from the background instead of the digit. The audit set
draws backgrounds uniformly, which is how a team would test the shortcut.

Everything is generated from a seed; nothing is downloaded. The defaults (six
textures, 48 px, digits upsampled x3) are the demo's; ``pipelines.scenarios`` also
draws on six more textures, larger images and per-class ink opacity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.datasets import load_digits

TEXTURES = ("stripes", "checker", "dots", "noise", "gradient", "waves")
# More textures for the scenarios; TEXTURES stays the demo's default draw.
MORE_TEXTURES = ("rings", "diagonal", "grid", "zigzag", "blobs", "crosshatch")
ALL_TEXTURES = TEXTURES + MORE_TEXTURES
IMAGE_SIZE = 48
DIGIT_SCALE = 3  # the 8x8 digits are upsampled by this
DIGIT_SIZE = 8 * DIGIT_SCALE


@dataclass(frozen=True)
class DemoSet:
    """Images in [0, 1], labels, object masks, and the background texture of each."""

    images: np.ndarray  # (N, S, S, 3) float32, S = image_size (48 by default)
    labels: np.ndarray  # (N,) int32
    masks: np.ndarray  # (N, S, S) bool, the digit's strokes
    backgrounds: np.ndarray  # (N,) str, a texture name

    def __len__(self) -> int:
        return len(self.labels)

    def boxes(self) -> np.ndarray:
        """(N, 4) int boxes ``x_min, y_min, x_max, y_max`` around each mask (max exclusive)."""
        (x_min, x_max), (y_min, y_max) = (
            _span(self.masks.any(axis=1)),
            _span(self.masks.any(axis=2)),
        )
        return np.stack([x_min, y_min, x_max, y_max], axis=1)


def _span(hits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``hits`` (N, S) bool: the first True and one past the last."""
    return hits.argmax(axis=1), hits.shape[1] - hits[:, ::-1].argmax(axis=1)


def texture(name: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A (size, size, 3) float32 texture with a random colour and phase."""
    y, x = np.mgrid[0:size, 0:size].astype("float32")
    phase = rng.uniform(0, 2 * np.pi)
    if name == "stripes":
        pattern = (np.sin(y * 0.8 + phase) > 0).astype("float32")
    elif name == "checker":
        offset = rng.integers(0, 6)
        pattern = (((x + offset) // 6 + (y + offset) // 6) % 2).astype("float32")
    elif name == "dots":
        pattern = ((np.sin(x * 0.9 + phase) * np.sin(y * 0.9 + phase)) > 0.5).astype("float32")
    elif name == "noise":
        pattern = rng.uniform(0, 1, (size, size)).astype("float32")
    elif name == "gradient":
        pattern = (x + y) / (2 * size)
    elif name == "waves":
        pattern = 0.5 + 0.5 * np.sin(x * 0.5 + 2 * np.sin(y * 0.25 + phase))
    elif name == "rings":
        centre_y, centre_x = rng.uniform(0, size, size=2)
        pattern = (np.sin(np.hypot(x - centre_x, y - centre_y) * 0.9 + phase) > 0).astype("float32")
    elif name == "diagonal":
        pattern = (np.sin((x + y) * 0.55 + phase) > 0).astype("float32")
    elif name == "grid":
        offset = rng.integers(0, 8)
        pattern = (((x + offset) % 8 < 2) | ((y + offset) % 8 < 2)).astype("float32")
    elif name == "zigzag":
        offset = rng.integers(0, 12)
        pattern = ((y + np.abs((x + offset) % 12 - 6)) // 4 % 2).astype("float32")
    elif name == "blobs":
        centres = rng.uniform(0, size, size=(size // 6, 2)).astype("float32")
        distance = np.hypot(x[..., None] - centres[:, 1], y[..., None] - centres[:, 0])
        pattern = (distance.min(axis=-1) < 4.5).astype("float32")
    elif name == "crosshatch":
        offset = rng.integers(0, 9)
        pattern = (((x + y + offset) % 9 < 2) | ((x - y + offset) % 9 < 2)).astype("float32")
    else:
        raise ValueError(f"unknown texture {name!r}; choose from {ALL_TEXTURES}")
    colour = rng.uniform(0.15, 0.6, size=3).astype("float32")
    return (0.2 + 0.5 * pattern[..., None]) * colour + 0.05


def make_demo_set(
    count: int,
    *,
    seed: int = 0,
    shortcut_classes: dict[int, str] | None = None,
    shortcut_rate: float = 0.0,
    textures: Sequence[str] = TEXTURES,
    image_size: int = IMAGE_SIZE,
    digit_scale: int = DIGIT_SCALE,
    ink_opacity: dict[int, float] | None = None,
    class_scale: dict[int, int] | None = None,
) -> DemoSet:
    """Composite ``count`` digits onto ``image_size`` textures.

    With probability ``shortcut_rate`` an image of a class in ``shortcut_classes``
    gets that class's texture; every other image gets one drawn uniformly from
    ``textures``. Digits are upsampled ``digit_scale`` times (8 px each) and placed
    at random; a class in ``ink_opacity`` is blended at that opacity (1: the usual
    solid ink), its mask still being its strokes; a class in ``class_scale`` is
    upsampled that many times instead of ``digit_scale`` (small, thin objects).
    """
    shortcut_classes = shortcut_classes or {}
    ink_opacity = ink_opacity or {}
    class_scale = class_scale or {}
    rng = np.random.default_rng(seed)
    digits = load_digits()
    pick = rng.integers(0, len(digits.target), size=count)
    images = np.empty((count, image_size, image_size, 3), dtype="float32")
    masks = np.zeros((count, image_size, image_size), dtype=bool)
    backgrounds = np.empty(count, dtype=object)
    labels = digits.target[pick].astype("int32")
    for index, source in enumerate(pick):
        label = int(labels[index])
        if label in shortcut_classes and rng.uniform() < shortcut_rate:
            name = shortcut_classes[label]
        else:
            name = textures[rng.integers(len(textures))]
        canvas = texture(name, rng, image_size)
        scale = class_scale.get(label, digit_scale)
        digit_size = 8 * scale
        ink = np.kron(digits.images[source] / 16.0, np.ones((scale, scale)))
        ink = ink.astype("float32")
        top, left = rng.integers(0, image_size - digit_size + 1, size=2)
        window = canvas[top : top + digit_size, left : left + digit_size]
        colour = rng.uniform(0.85, 1.0, size=3).astype("float32")
        alpha = ink[..., None] * ink_opacity[label] if label in ink_opacity else ink[..., None]
        window[:] = window * (1 - alpha) + colour * alpha
        masks[index, top : top + digit_size, left : left + digit_size] = ink > 0.25
        images[index] = canvas
        backgrounds[index] = name
    return DemoSet(images, labels, masks, backgrounds.astype(str))
