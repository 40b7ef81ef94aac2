"""The report's example images (the most spurious mass per class) and their Guided
Grad-CAM pictures.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from audit.measure import spec
from audit.runs.store import RunStore, atomic_write

EXAMPLES_PER_CLASS = 4


def stacked(loaded) -> tuple[np.ndarray, np.ndarray]:
    """Images and label indices of ``(row, (label, LoadedRow))`` pairs."""
    pixels = np.stack([item.image for _, (_, item) in loaded]).astype("float32")
    return pixels, np.array([label for _, (label, _) in loaded], dtype="int32")


def worst_examples(images: pd.DataFrame, index: int, manifest: dict) -> pd.DataFrame:
    """The class's audited rows with the most spurious mass (the report's examples)."""
    spurious = spurious_regions(manifest)
    rows = images[(images["status"] == "ok") & (images["label_index"] == index)]
    if not spurious or not len(rows):
        return rows.iloc[:0]
    column = spec.column("mass", spurious[0])
    return rows.sort_values(column, ascending=False, na_position="last").head(EXAMPLES_PER_CLASS)


def spurious_regions(manifest: dict) -> list[str]:
    return [region["name"] for region in manifest["regions"] if region["role"] == "spurious"]


def guided_note(trust: dict, input_size) -> str | None:
    """Why the run draws no Guided Grad-CAM pictures (``None``: it draws them).

    Guided backpropagation shows pixel-level edges; on a small input those edges are a
    few pixels each and the picture reads as noise, so below ``trust.guided_min_side``
    the report says so instead of showing it."""
    if not trust.get("guided_examples", True):
        return "Guided Grad-CAM pictures were not drawn (trust.guided_examples: false)."
    height, width = input_size
    least = trust.get("guided_min_side", 0)
    if min(height, width) < least:
        return (
            f"Guided Grad-CAM pictures were not drawn: the model's input is {height}x{width} "
            f"px, under trust.guided_min_side ({least} px), where they read as noise rather "
            "than as an image. Set trust.guided_min_side: 0 to draw them anyway."
        )
    return None


def _write_guided(run: RunStore, model, cam, loaded) -> None:
    """Guided Grad-CAM of each example row as ``guided/<row>.png`` (grey, input size)."""
    from PIL import Image

    from audit.engine.guided import GuidedGradCAM, guided_picture

    if not loaded:
        return
    guided = GuidedGradCAM(model, cam=cam)
    folder = run.root / "guided"
    folder.mkdir(exist_ok=True)
    # Memory: one batch at a time. The full backward pass to the input is costly, so
    # the rows are split evenly (40 rows: two calls of 20, not 32 and 8 padded to 32).
    batch = math.ceil(len(loaded) / math.ceil(len(loaded) / cam.batch_size))
    for start in range(0, len(loaded), batch):
        part = loaded[start : start + batch]
        pixels, labels = stacked(part)
        results = guided.explain(pixels, labels, batch_size=batch)
        for (row, _), result in zip(part, results, strict=True):
            picture = Image.fromarray(guided_picture(result))
            atomic_write(folder / f"{row}.png", lambda tmp, p=picture: p.save(tmp, format="PNG"))
