"""Face regions: boxes from the manifest or from MTCNN, as masks (box or ellipse).

A face region is ``expected`` for a face-attribute model and ``spurious`` for an
occupation or scene model (the Grad-CAM paper's doctor/nurse case). Boxes come from
the manifest's ``face_x_min, face_y_min, face_x_max, face_y_max`` columns (pixels of
the original image), from five landmark columns (``LANDMARK_COLUMNS``, CelebA's names:
``landmark_box``) or, with ``dataset.face_detector: mtcnn``, from MTCNN, whose
weights ship inside its package. Detection runs batched once per dataset before the
audit and is cached in the store (``STORE/.cache/faces-<fingerprint>.parquet``);
images with no face get empty boxes and are recorded, never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from audit.runs.store import atomic_write

FACE_COLUMNS = ("face_x_min", "face_y_min", "face_x_max", "face_y_max")
# Five face landmarks, named as in CelebA's landmark files (the points MTCNN finds).
LANDMARK_COLUMNS = (
    "lefteye_x",
    "lefteye_y",
    "righteye_x",
    "righteye_y",
    "nose_x",
    "nose_y",
    "leftmouth_x",
    "leftmouth_y",
    "rightmouth_x",
    "rightmouth_y",
)


def landmark_box(values: Sequence[float]) -> tuple[float, float, float, float]:
    """The face box around five landmarks (``LANDMARK_COLUMNS`` order), as MTCNN draws it.

    With d the larger of the eye distance and the eye-to-mouth distance (so a face in
    profile keeps its size): 2d wide, centred on the landmarks; from d above the eyes
    (the forehead) to 0.85d below the mouth (the chin). Fitted on MTCNN's boxes and
    keypoints of scikit-image's astronaut (IoU 0.94 with its box, tests/test_faces.py).
    """
    points = np.asarray(values, dtype="float64").reshape(5, 2)
    eyes, mouth = points[:2].mean(axis=0), points[3:].mean(axis=0)
    size = max(np.hypot(*(points[1] - points[0])), np.hypot(*(mouth - eyes)))
    centre = points[:, 0].mean()
    return (centre - size, eyes[1] - size, centre + size, mouth[1] + 0.85 * size)


def face_mask(
    box: Sequence[float], shape: tuple[int, int], *, ellipse: bool = False, hair_band: float = 0.0
) -> np.ndarray:
    """A face box as a bool mask of ``shape``: the box or its inscribed ellipse.

    ``hair_band`` extends the region upwards by that fraction of the box height (the
    hair and the top of the head, which detectors leave out).
    """
    x_min, y_min, x_max, y_max = (float(v) for v in box)
    y_min -= hair_band * (y_max - y_min)
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    ys, xs = ys + 0.5, xs + 0.5  # pixel centres
    if not ellipse:
        return (xs >= x_min) & (xs < x_max) & (ys >= y_min) & (ys < y_max)
    centre_x, centre_y = (x_min + x_max) / 2, (y_min + y_max) / 2
    radius_x, radius_y = max((x_max - x_min) / 2, 1e-6), max((y_max - y_min) / 2, 1e-6)
    return ((xs - centre_x) / radius_x) ** 2 + ((ys - centre_y) / radius_y) ** 2 <= 1.0


# Images per MTCNN call: batched, its three networks run 4.7x faster on a 2-core CPU
# than one image at a time (32 photos of 256x256, benchmarks/bench_faces.py).
DETECT_BATCH = 16


def _detector():
    try:
        from mtcnn import MTCNN
    except ImportError:
        raise ImportError(
            "face detection needs the mtcnn package: pip install 'bias-audit[faces]'"
        ) from None
    return MTCNN(device="CPU:0")


def detect_faces(
    images: Sequence[np.ndarray], *, min_confidence: float = 0.9, detector=None
) -> list:
    """The most confident face box ``(x_min, y_min, x_max, y_max)`` per image, or None.

    Uses MTCNN (``pip install mtcnn``; its weights are inside the package), on batches
    of images of one size.
    """
    detector = detector or _detector()
    images = [np.asarray(image, dtype="uint8") for image in images]
    by_shape: dict[tuple, list[int]] = {}
    for index, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(index)
    boxes: list = [None] * len(images)
    for indices in by_shape.values():
        for start in range(0, len(indices), DETECT_BATCH):
            chunk = indices[start : start + DETECT_BATCH]
            found = detector.detect_faces([images[index] for index in chunk])
            for index, faces in zip(chunk, found, strict=True):
                boxes[index] = _best_box(faces, min_confidence)
    return boxes


def _best_box(faces: list[dict], min_confidence: float):
    confident = [face for face in faces if face["confidence"] >= min_confidence]
    if not confident:
        return None
    x, y, width, height = max(confident, key=lambda face: face["confidence"])["box"]
    return (float(x), float(y), float(x + width), float(y + height))


def _read_rgb(root: Path, relative: str, confine: bool) -> np.ndarray | None:
    """An image's RGB pixels, or None when it cannot or may not be read (outside the
    dataset root): the audit then skips its row with the reason."""
    from audit.data.decode import SkipRow, _inside, _read_image

    try:  # as the audit reads it: regular files only, within the decoding budget
        return _read_image(_inside(root, relative, confine=confine))
    except SkipRow:
        return None


def with_detected_faces(entries, cache_dir: Path, fingerprint: str, progress: bool = False):
    """The entries with face columns from MTCNN, detected once and cached per dataset."""
    from dataclasses import replace

    cache = Path(cache_dir) / f"faces-{fingerprint[:16]}.parquet"
    if cache.exists():
        faces = pd.read_parquet(cache)
    else:
        from tqdm.auto import tqdm

        detector = _detector()
        paths = [str(path) for path in entries.table["path"]]
        boxes: list = []
        with tqdm(total=len(paths), desc="faces", unit="img", disable=not progress) as bar:
            for start in range(0, len(paths), DETECT_BATCH):
                chunk_paths = paths[start : start + DETECT_BATCH]
                pixels = [_read_rgb(entries.root, path, entries.confine) for path in chunk_paths]
                readable = [index for index, image in enumerate(pixels) if image is not None]
                found = detect_faces([pixels[i] for i in readable], detector=detector)
                chunk: list = [None] * len(pixels)  # the audit records a bad image
                for index, box in zip(readable, found, strict=True):
                    chunk[index] = box
                boxes.extend(chunk)
                bar.update(len(pixels))
        rows = [dict(zip(FACE_COLUMNS, box or (None,) * 4, strict=True)) for box in boxes]
        faces = pd.DataFrame(rows, columns=list(FACE_COLUMNS)).astype("float64")
        atomic_write(cache, lambda tmp: faces.to_parquet(tmp, index=False))
    table = entries.table.drop(columns=[c for c in FACE_COLUMNS if c in entries.table])
    return replace(entries, table=pd.concat([table, faces], axis=1))
