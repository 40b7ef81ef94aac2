"""Generated portraits for face/background audits (the Grad-CAM paper's doctor/nurse case).

Each 48x48 image shows a face (a skin-toned ellipse with eyes, its box known) and
a small badge on the coat: a cross for class 0 ("doctor"), a ring for class 1
("nurse"), a bar for class 2 ("patient"). With ``shortcut_rate`` > 0, training images
of the nurse class get a light face and the others a dark one at that rate: a model
can then say "nurse" from the face instead of the badge. Audit sets draw face tones
independently of the class. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

SIZE = 48
TONES = {"light": (0.95, 0.80, 0.70), "dark": (0.45, 0.30, 0.22)}


@dataclass(frozen=True)
class PortraitSet:
    images: np.ndarray  # (N, 48, 48, 3) float32 in [0, 1]
    labels: np.ndarray  # (N,) int32: 0 doctor, 1 nurse, 2 patient
    tools: np.ndarray  # (N, 48, 48) bool: the tool's mask (the expected region)
    faces: np.ndarray  # (N, 4) float32 face boxes x_min, y_min, x_max, y_max
    tones: np.ndarray  # (N,) str: light | dark


def _tool(label: int, centre: tuple[int, int]) -> np.ndarray:
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    dy, dx = ys - centre[0], xs - centre[1]
    if label == 0:  # a cross
        return ((np.abs(dy) <= 1) & (np.abs(dx) <= 5)) | ((np.abs(dx) <= 1) & (np.abs(dy) <= 5))
    if label == 1:  # a ring
        radius = np.sqrt(dy**2 + dx**2)
        return (radius >= 3) & (radius <= 5.5)
    return (np.abs(dy) <= 1) & (np.abs(dx) <= 5)  # a bar


def make_portraits(count: int, *, seed: int = 0, shortcut_rate: float = 0.0) -> PortraitSet:
    rng = np.random.default_rng(seed)
    images = np.empty((count, SIZE, SIZE, 3), "float32")
    tools = np.zeros((count, SIZE, SIZE), bool)
    faces = np.empty((count, 4), "float32")
    labels = rng.integers(0, 3, size=count).astype("int32")
    tones = np.empty(count, dtype=object)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    for index, label in enumerate(labels):
        if rng.uniform() < shortcut_rate:
            tone = "light" if label == 1 else "dark"
        else:
            tone = "light" if rng.uniform() < 0.5 else "dark"
        background = rng.uniform(0.1, 0.3, size=3).astype("float32")
        image = np.broadcast_to(background, (SIZE, SIZE, 3)).copy()
        image += rng.normal(0, 0.03, size=image.shape).astype("float32")
        centre_x, centre_y = rng.integers(14, 34), rng.integers(10, 16)
        half_w, half_h = 7, 9
        face = ((xs - centre_x) / half_w) ** 2 + ((ys - centre_y) / half_h) ** 2 <= 1
        image[face] = np.asarray(TONES[tone], "float32") + rng.normal(0, 0.02, 3)
        for eye in (-3, 3):
            image[centre_y - 2 : centre_y, centre_x + eye - 1 : centre_x + eye + 1] = 0.05
        body_top = centre_y + half_h + 2
        image[body_top:, max(0, centre_x - 12) : centre_x + 12] = (0.85, 0.88, 0.92)  # a coat
        tool = _tool(int(label), (int(rng.integers(body_top + 7, 41)), int(centre_x)))
        image[tool] = (0.1, 0.35, 0.8)
        images[index] = np.clip(image, 0, 1)
        tools[index] = tool
        faces[index] = (centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h)
        tones[index] = tone
    return PortraitSet(images, labels, tools, faces, tones.astype(str))


CLASS_NAMES = ["doctor", "nurse", "patient"]


def write_portraits(portraits: PortraitSet, root) -> Path:
    """PNG images, badge masks and a manifest with face boxes and a face_tone slice."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(len(portraits.labels)):
        name = f"{index:05d}.png"
        pixels = (portraits.images[index] * 255).round().astype("uint8")
        Image.fromarray(pixels).save(root / "images" / name)
        Image.fromarray(portraits.tools[index].astype("uint8") * 255).save(root / "masks" / name)
        x_min, y_min, x_max, y_max = (float(v) for v in portraits.faces[index])
        rows.append(
            {
                "path": f"images/{name}",
                "label": CLASS_NAMES[portraits.labels[index]],
                "mask_path": f"masks/{name}",
                "face_x_min": x_min,
                "face_y_min": y_min,
                "face_x_max": x_max,
                "face_y_max": y_max,
                "face_tone": portraits.tones[index],
            }
        )
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest
