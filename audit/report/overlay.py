"""Render CAMs over images as PNGs (reports, the demo and the dashboard read these)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# A compact perceptual colour ramp (dark blue -> cyan -> yellow -> red).
_RAMP = np.array(
    [
        [0.05, 0.05, 0.35],
        [0.0, 0.55, 0.85],
        [0.35, 0.85, 0.45],
        [0.98, 0.85, 0.15],
        [0.85, 0.1, 0.05],
    ],
    dtype="float32",
)


def colorize(cam: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """(h, w) map -> (h, w, 3) float32 colours in [0, 1]; ``vmax`` defaults to the map's max."""
    top = float(cam.max()) if vmax is None else float(vmax)
    scaled = np.clip(cam / top, 0.0, 1.0) if top > 0 else np.zeros_like(cam)
    position = scaled * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    fraction = (position - low)[..., None]
    return (_RAMP[low] * (1 - fraction) + _RAMP[low + 1] * fraction).astype("float32")


def overlay(
    image: np.ndarray, cam: np.ndarray, *, alpha: float = 0.45, outline: np.ndarray | None = None
) -> Image.Image:
    """Blend a map (any size; resized bilinearly) over an RGB image in [0, 1].

    ``outline``: an optional boolean mask whose border is drawn in white.
    """
    height, width = image.shape[:2]
    if cam.shape != (height, width):
        resized = Image.fromarray(cam.astype("float32")).resize((width, height), Image.BILINEAR)
        cam = np.asarray(resized)
    rgb = image[..., :3] if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)
    rgb = np.clip(rgb, 0.0, 1.0)
    blended = (1 - alpha) * rgb + alpha * colorize(cam)
    if outline is not None:
        mask = outline.astype(bool)
        interior = mask.copy()
        interior[1:-1, 1:-1] = (
            mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        )
        blended[mask & ~interior] = 1.0
    return Image.fromarray((blended * 255).round().astype("uint8"))


def stored_overlay(
    dataset: dict, path: str, mask_path, cam: np.ndarray | None, max_side: int | None = None
) -> Image.Image | None:
    """A stored CAM over its dataset image, outlined by the row's mask file if it has one.

    ``dataset`` is a run manifest's ``dataset`` section (``root``, ``mask_root``);
    ``max_side`` shrinks the image to a thumbnail first. Returns None when the image
    cannot be read, and the plain image when there is no CAM.
    """
    root = Path(dataset["root"])
    try:
        with Image.open(root / path) as source:
            picture = source.convert("RGB")
    except OSError:
        return None
    if max_side is not None:
        picture.thumbnail((max_side, max_side))
    if cam is None:
        return picture
    outline = None
    if isinstance(mask_path, str) and mask_path:
        try:
            with Image.open(Path(dataset.get("mask_root") or root) / mask_path) as mask:
                outline = np.asarray(mask.convert("L").resize(picture.size, Image.NEAREST)) > 0
        except OSError:
            outline = None
    pixels = np.asarray(picture, "float32") / 255
    return overlay(pixels, cam.astype("float32"), outline=outline)
