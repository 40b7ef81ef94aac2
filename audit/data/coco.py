"""COCO instances files as an entries table: one row per annotated image, labelled
with the category of its largest object, the union mask of that category as a
run-length encoding (``mask_rle``) and its pixel box.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from audit.config import ConfigError
from audit.data.manifest import (
    Entries,
)

log = logging.getLogger(__name__)

# ------------------------------------------------------------------- COCO


def read_coco(coco_json: Path, images: Path) -> Entries:
    """A COCO instances JSON (polygon, RLE and crowd masks) as an entries table.

    One row per image that has at least one annotation, in image-id order:

    * ``path``: the image's ``file_name``, relative to ``images`` (the entries root);
    * ``label``: the category name of the image's largest annotation (by mask area);
    * ``mask_rle``: the union of every instance mask of that category in the image,
      as JSON ``{"size": [h, w], "counts": "..."}`` (compressed COCO RLE);
    * ``x_min, y_min, x_max, y_max``: the pixel box of that union (max exclusive);
    * slice columns ``coco_image_id`` and ``num_objects`` (annotations of the label's
      category in the image, crowd annotations included).

    Images without annotations are not audit entries (they have no object to
    measure attention against); they are counted, logged and named in the
    entries' description, not raised on.
    """
    coco = _load_coco(Path(coco_json))
    images = Path(images)
    if not images.is_dir():
        raise ConfigError(
            f"COCO image folder not found: {images}; set dataset.coco_images to the folder "
            f"that holds the file_name paths of {coco_json}"
        )
    rows, unannotated = [], 0
    for image_id in sorted(coco.imgs):
        annotations = coco.imgToAnns.get(image_id, [])
        if not annotations:
            unannotated += 1
            continue
        rows.append(_coco_row(coco, image_id, annotations, Path(coco_json)))
    if not rows:
        raise ConfigError(
            f"{coco_json} has no annotated images; read_coco needs an instances file "
            "with object annotations (e.g. instances_val2017.json)"
        )
    name = f"coco:{Path(coco_json).name}"
    if unannotated:
        log.info("%s: %d image(s) without annotations are not audit entries", name, unannotated)
        name += f" ({unannotated} unannotated image(s) left out)"
    return Entries(pd.DataFrame(rows), images, name)


def _load_coco(path: Path):
    """Parse and index the JSON with pycocotools, turning every failure into ConfigError."""
    from pycocotools.coco import COCO

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"COCO annotation file not found: {path}; set dataset.coco to an instances JSON"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(
            f"cannot read COCO annotation file {path}: {error}; give a valid instances JSON "
            "(e.g. annotations/instances_val2017.json)"
        ) from None
    keys = ("images", "annotations", "categories")
    missing = [key for key in keys if key not in data] if isinstance(data, dict) else list(keys)
    if missing:
        raise ConfigError(
            f"{path} is not a COCO instances file (no {', '.join(missing)}); give an "
            "instances_*.json with images, annotations and categories"
        )
    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
    except (KeyError, TypeError) as error:
        raise ConfigError(
            f"malformed COCO file {path}: an image, annotation or category lacks {error}; "
            "every annotation needs id, image_id and category_id, every image id and file_name"
        ) from None
    return coco


def _coco_row(coco, image_id: int, annotations: list[dict], source: Path) -> dict:
    """The entry of one annotated image: largest object's category, its union mask and box."""
    from pycocotools import mask as coco_mask

    image = coco.imgs[image_id]
    try:
        height, width, file_name = int(image["height"]), int(image["width"]), image["file_name"]
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            f"image {image_id} in {source} lacks height, width or file_name; COCO images "
            "need all three"
        ) from None
    for annotation in annotations:  # every one, not only the label's (the largest)
        if annotation.get("category_id") not in coco.cats:
            raise ConfigError(
                f"annotation {annotation.get('id')} in {source} has category_id "
                f"{annotation.get('category_id')!r}, which is not listed under categories; "
                "add the category or fix the id"
            )
    rles = [_annotation_rle(a, height, width, source) for a in annotations]
    areas = [float(coco_mask.area(rle)) for rle in rles]
    largest = annotations[int(np.argmax(areas))]  # ties: the first annotation
    category = largest.get("category_id")
    same = [rle for a, rle in zip(annotations, rles, strict=True) if a["category_id"] == category]
    union = coco_mask.merge(same, intersect=False)  # equals encode(decoded union), byte for byte
    row = {
        "path": str(file_name),
        "label": str(coco.cats[category]["name"]),
        "mask_rle": json.dumps({"size": [height, width], "counts": union["counts"].decode()}),
    }
    row.update(_rle_box(union))
    row.update({"coco_image_id": int(image_id), "num_objects": len(same)})
    return row


def _annotation_rle(annotation: dict, height: int, width: int, source: Path) -> dict:
    """One annotation's mask as a compressed RLE: polygons, uncompressed or compressed RLE."""
    from pycocotools import mask as coco_mask

    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, list):
        # pycocotools reads 4-number lists as boxes and rejects shorter ones: keep real polygons.
        polygons = [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            return coco_mask.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        return coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation:
        if list(segmentation.get("size", [])) != [height, width]:
            raise ConfigError(
                f"annotation {annotation.get('id')} in {source} has an RLE of size "
                f"{segmentation.get('size')} on an image of [height, width] = "
                f"[{height}, {width}]; fix the annotation's size"
            )
        counts = segmentation["counts"]
        if isinstance(counts, list):  # uncompressed RLE, as crowd annotations use
            return coco_mask.frPyObjects(segmentation, height, width)
        return {
            "size": [height, width],
            "counts": counts.encode() if isinstance(counts, str) else counts,
        }
    raise ConfigError(
        f"annotation {annotation.get('id')} in {source} has no segmentation; read_coco needs "
        "instance masks (an instances_*.json); for boxes only, write a manifest with "
        "x_min, y_min, x_max, y_max columns"
    )


def _rle_box(rle: dict) -> dict:
    """The pixel box (max exclusive) of an RLE mask; NaN for an empty mask."""
    from pycocotools import mask as coco_mask

    x, y, w, h = (float(v) for v in coco_mask.toBbox(rle))
    if w <= 0 or h <= 0:
        return dict.fromkeys(("x_min", "y_min", "x_max", "y_max"), float("nan"))
    return {"x_min": x, "y_min": y, "x_max": x + w, "y_max": y + h}
