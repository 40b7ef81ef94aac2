"""A small biased dataset and model, built in seconds from scikit-learn's digits.

Each image is a digit composited onto a procedural texture. In the training set a
few "shortcut" classes are paired with one texture each most of the time, so a
model can learn to answer from the background instead of the digit. The audit set
draws backgrounds uniformly, which is how a team would test the shortcut.

Everything is generated from a seed; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.datasets import load_digits

TEXTURES = ("stripes", "checker", "dots", "noise", "gradient", "waves")
IMAGE_SIZE = 48
DIGIT_SIZE = 24  # 8x8 digits upsampled by 3


@dataclass(frozen=True)
class DemoSet:
    """Images in [0, 1], labels, object masks, and the background texture of each."""

    images: np.ndarray  # (N, 48, 48, 3) float32
    labels: np.ndarray  # (N,) int32
    masks: np.ndarray  # (N, 48, 48) bool, the digit's strokes
    backgrounds: np.ndarray  # (N,) str, a name from TEXTURES

    def __len__(self) -> int:
        return len(self.labels)


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
    else:
        raise ValueError(f"unknown texture {name!r}; choose from {TEXTURES}")
    colour = rng.uniform(0.15, 0.6, size=3).astype("float32")
    return (0.2 + 0.5 * pattern[..., None]) * colour + 0.05


def make_demo_set(
    count: int,
    *,
    seed: int = 0,
    shortcut_classes: dict[int, str] | None = None,
    shortcut_rate: float = 0.0,
) -> DemoSet:
    """Composite ``count`` digits onto textures.

    With probability ``shortcut_rate`` an image of a class in ``shortcut_classes``
    gets that class's texture; every other image gets a uniformly drawn one.
    """
    shortcut_classes = shortcut_classes or {}
    rng = np.random.default_rng(seed)
    digits = load_digits()
    pick = rng.integers(0, len(digits.target), size=count)
    images = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype="float32")
    masks = np.zeros((count, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    backgrounds = np.empty(count, dtype=object)
    labels = digits.target[pick].astype("int32")
    for index, source in enumerate(pick):
        label = int(labels[index])
        if label in shortcut_classes and rng.uniform() < shortcut_rate:
            name = shortcut_classes[label]
        else:
            name = TEXTURES[rng.integers(len(TEXTURES))]
        canvas = texture(name, rng)
        ink = np.kron(digits.images[source] / 16.0, np.ones((3, 3))).astype("float32")
        top, left = rng.integers(0, IMAGE_SIZE - DIGIT_SIZE + 1, size=2)
        window = canvas[top : top + DIGIT_SIZE, left : left + DIGIT_SIZE]
        colour = rng.uniform(0.85, 1.0, size=3).astype("float32")
        window[:] = window * (1 - ink[..., None]) + colour * ink[..., None]
        masks[index, top : top + DIGIT_SIZE, left : left + DIGIT_SIZE] = ink > 0.25
        images[index] = canvas
        backgrounds[index] = name
    return DemoSet(images, labels, masks, backgrounds.astype(str))
