"""Load: one entries row -> a decoded, preprocessed image with its region masks, or a
``SkipRow`` with a reason (the audit records it and goes on; nothing is dropped
silently); rows in batches, decoded in threads, in order."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from audit.config.sections import RegionSection
from audit.data.decode import (
    SkipRow,
    _decode_rle,
    _image_pixels,
    _inside,
    _mask_pixels,
    _opened,
    forget_resolved_paths,
)
from audit.data.faces import FACE_COLUMNS, LANDMARK_COLUMNS, face_mask, landmark_box
from audit.data.manifest import BOX_COLUMNS, Entries, filled
from audit.data.preprocess import Preprocessor
from audit.data.regions import build_regions


@dataclass
class LoadedRow:
    image: np.ndarray
    regions: np.ndarray


def load_row(
    row: dict, entries: Entries, preprocessor: Preprocessor, regions: Sequence[RegionSection]
) -> LoadedRow:
    """Decode, check and preprocess one entry; raises ``SkipRow`` with the reason."""
    if not filled(row.get("path")):
        raise SkipRow(
            "the manifest row has no path; fill in the image file (relative to the "
            "manifest's folder) or remove the row"
        )
    # The pixels (and the mask's) come at the model's input size, resized while the
    # decoded ones are held; the image's full size places the mask check, the box and
    # the face boxes.
    image_path = _inside(entries.root, row["path"], confine=entries.confine)
    with _opened(image_path, "image") as image:
        height, width = image.height, image.width
        pixels = _image_pixels(image, image_path, preprocessor.channels == 1, preprocessor)
    mask = None
    if filled(row.get("mask_path")):
        mask_path = _inside(
            entries.mask_base, row["mask_path"], "mask_path", confine=entries.confine
        )
        with _opened(mask_path, "mask") as image:
            _check_mask_size((image.height, image.width), (height, width))
            mask = _mask_pixels(image, mask_path, preprocessor)
    elif filled(row.get("mask_rle")):
        try:
            mask = _decode_rle(row["mask_rle"])
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise SkipRow(
                f"mask_rle is not a COCO RLE JSON object with size and counts: {error}"
            ) from None
        _check_mask_size(mask.shape, (height, width))
    sources = {region.source for region in regions}
    box = None  # checked only when a region uses it: an unused bad box skips nothing
    if "box" in sources and all(filled(row.get(c)) for c in BOX_COLUMNS):
        box = preprocessor.box(_box_values(row, BOX_COLUMNS, "box"), (height, width))
    faces = {}
    face_box, drawn_from = None, ""
    if "face" in sources and all(filled(row.get(c)) for c in FACE_COLUMNS):
        face_box = _box_values(row, FACE_COLUMNS, "face box")
    elif "face" in sources and all(filled(row.get(c)) for c in LANDMARK_COLUMNS):
        face_box = landmark_box(_numbers(row, LANDMARK_COLUMNS, "face landmarks"))
        drawn_from = " (drawn around the landmarks)"
    if face_box is not None:
        for region in regions:
            if region.source == "face":
                drawn = face_mask(
                    face_box,
                    (height, width),
                    ellipse=region.shape == "ellipse",
                    hair_band=region.hair_band,
                )
                if not drawn.any():
                    raise SkipRow(
                        f"face box {[round(v, 1) for v in face_box]}{drawn_from} covers no "
                        f"pixel of the {width}x{height} image "
                        "(outside it, or under a pixel; x is the column, y the row)"
                    )
                faces[region.name] = preprocessor.mask(drawn)
    stack = build_regions(
        regions, None if mask is None else preprocessor.mask(mask), box, preprocessor.size, faces
    )
    return LoadedRow(image=preprocessor.image(pixels), regions=preprocessor.coverage(stack))


def _check_mask_size(mask: tuple[int, int], image: tuple[int, int]) -> None:
    """``SkipRow`` unless a mask's (height, width) is its image's."""
    if mask != image:
        raise SkipRow(
            f"mask is {mask[1]}x{mask[0]} but the image is {image[1]}x{image[0]} "
            "(width x height); masks must match their image"
        )


def _numbers(row: dict, columns: Sequence[str], what: str) -> list[float]:
    """A row's cells in ``columns`` as finite numbers, or ``SkipRow``."""
    count = "four" if len(columns) == 4 else str(len(columns))
    try:
        values = [float(row[c]) for c in columns]
    except (TypeError, ValueError):
        raise SkipRow(f"{what} {[row[c] for c in columns]} is not {count} numbers") from None
    if not all(np.isfinite(values)):
        raise SkipRow(f"{what} {values} is not {count} finite numbers")
    return values


def _box_values(row: dict, columns: Sequence[str], what: str) -> list[float]:
    """A row's box as four numbers, x_min < x_max and y_min < y_max, or ``SkipRow``."""
    values = _numbers(row, columns, what)
    if not (values[0] < values[2] and values[1] < values[3]):
        raise SkipRow(f"{what} {values} is empty or inverted (need x_min < x_max, y_min < y_max)")
    return values


@dataclass
class Batch:
    """Loaded rows of one chunk, and the rows of the chunk that were skipped."""

    rows: list[int]  # positions in the entries table
    images: np.ndarray  # (n, H, W, channels)
    regions: np.ndarray  # (n, R, H, W) bool
    labels: np.ndarray  # (n,) int32 class indices
    skipped: dict[int, str] = field(default_factory=dict)
    chunk: int = 0  # the chunk of rows the batch belongs to
    chunk_end: bool = True  # the chunk's last batch


def load_entry(
    entries: Entries,
    position: int,
    class_index: dict[str, int],
    preprocessor: Preprocessor,
    regions: Sequence[RegionSection],
    row: dict | None = None,
) -> tuple[str | None, tuple[int, LoadedRow] | None]:
    """One entry: ``(None, (label index, loaded row))``, or ``(skip reason, None)``.

    ``row``: the entry's table row as a dict, when the caller already has it.
    """
    if row is None:
        (row,) = entries.records([position])
    label = class_index.get(row["label"])
    if label is None:
        return f"label {row['label']!r} is not one of the model's classes", None
    try:
        return None, (label, load_row(row, entries, preprocessor, regions))
    except SkipRow as reason:
        return str(reason), None


def load_batches(
    entries: Entries,
    positions: Sequence[int],
    *,
    class_index: dict[str, int],
    preprocessor: Preprocessor,
    regions: Sequence[RegionSection],
    batch_size: int,
    pool: ThreadPoolExecutor,
    chunk_rows: int | None = None,
) -> Iterator[Batch]:
    """Decode rows in a thread pool (PIL releases the GIL) and yield batches in order.

    Decoding runs ahead of the consumer by a bounded window (four batches), across
    chunk boundaries, so the device never waits while a chunk is written. Batches
    never straddle a chunk of ``chunk_rows`` rows (the unit of resume): the last
    batch of each chunk has ``chunk_end`` set and may be short or empty. Skipped rows
    ride along with the batch after which they were found, so the caller records
    every row exactly once.
    """
    height, width = preprocessor.size
    region_height, region_width = preprocessor.region_size or preprocessor.size
    forget_resolved_paths()

    def load(position: int, row: dict):
        reason, loaded = load_entry(entries, position, class_index, preprocessor, regions, row)
        return position, reason, loaded

    def emit(items, skipped, chunk, chunk_end):
        return Batch(
            rows=[p for p, _, _ in items],
            images=np.stack([item.image for _, _, item in items]).astype("float32")
            if items
            else np.zeros((0, height, width, preprocessor.channels), "float32"),
            regions=np.stack([item.regions for _, _, item in items])
            if items
            else np.zeros((0, len(regions), region_height, region_width), "float32"),
            labels=np.array([label for _, label, _ in items], dtype="int32"),
            skipped=skipped,
            chunk=chunk,
            chunk_end=chunk_end,
        )

    window: deque = deque()
    remaining = iter(positions)
    ahead: deque = deque()  # (position, row dict), read from the table a batch at a time

    def refill() -> None:
        while len(window) < 4 * batch_size:
            if not ahead:
                block = list(itertools.islice(remaining, batch_size))
                if not block:
                    return
                ahead.extend(zip(block, entries.records(block), strict=True))
            window.append(pool.submit(load, *ahead.popleft()))

    pending: list[tuple[int, int, LoadedRow]] = []
    skipped: dict[int, str] = {}
    current = None
    refill()
    while window:
        position, reason, loaded = window.popleft().result()
        refill()
        chunk = position // chunk_rows if chunk_rows else 0
        if current is not None and chunk != current:
            yield emit(pending, skipped, current, True)
            pending, skipped = [], {}
        current = chunk
        if reason is not None:
            skipped[position] = reason
            continue
        pending.append((position, *loaded))
        if len(pending) == batch_size:
            yield emit(pending, skipped, chunk, False)
            pending, skipped = [], {}
    if current is not None:
        yield emit(pending, skipped, current, True)
