"""Checks before a run: the model's input size and channels, the store, the slice
columns and the regions against the data; each failure a ``ConfigError`` that
names the key and the fix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import keras

from audit.config import AuditConfig, ConfigError
from audit.config.sections import RegionSection
from audit.data.faces import FACE_COLUMNS, LANDMARK_COLUMNS
from audit.data.manifest import (
    BOX_COLUMNS,
    Entries,
)
from audit.engine.explain import GradCAM
from audit.measure.rows import result_columns


def input_size(model: keras.Model, config: AuditConfig) -> tuple[int, int]:
    shape = model.input_shape
    if config.preprocess.size is not None:
        size = tuple(config.preprocess.size)
        fixed = not isinstance(shape, list) and len(shape) == 4 and None not in shape[1:3]
        if fixed and size != tuple(shape[1:3]):
            raise ConfigError(
                f"preprocess.size {list(size)} differs from the model's input size "
                f"{list(shape[1:3])}; images are resized to preprocess.size, so set it to "
                f"{list(shape[1:3])} or leave it out"
            )
        return size
    if isinstance(shape, list) or len(shape) != 4 or None in shape[1:3]:
        raise ConfigError(
            f"cannot tell the model's image size from its input shape {shape}; set "
            "preprocess.size: [height, width]"
        )
    return int(shape[1]), int(shape[2])


def input_channels(cam: GradCAM, config: AuditConfig) -> int:
    """The model's input channels: 3 (images decoded as RGB) or 1 (decoded as grey)."""
    channels = cam.input_channels
    if channels not in (1, 3):
        raise ConfigError(
            f"the model's input has {channels} channels; the audit decodes images as RGB "
            "(3 channels) or grey (1 channel)"
        )
    if channels == 1 and config.preprocess.keras_preprocess is not None:
        raise ConfigError(
            f"preprocess.keras_preprocess {config.preprocess.keras_preprocess!r} expects RGB "
            "images, but the model takes one channel (grey); use preprocess.scale (and "
            "mean/std with one value) instead"
        )
    for key in ("mean", "std"):
        values = getattr(config.preprocess, key)
        if values is not None and len(values) != channels:
            raise ConfigError(
                f"preprocess.{key} has {len(values)} values, but the model's input has "
                f"{channels} channel{'s' if channels > 1 else ''}; give one value per channel"
            )
    return channels


def skip_kind(reason: str) -> str:
    """A skip reason without its particulars (quoted values, paths, lists), so the run's
    counts group rows by kind of problem: "image file not found: …" once, with a
    count, not once per file. ``images.parquet`` keeps every row's full reason."""
    return re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\S*[/\\]\S*", "…", str(reason))


def check_store_path(store: Path) -> None:
    """The run store must be (or become) a folder this user can write: a file in its
    place, or a read-only folder, is a usage error."""
    for path in (store, *store.parents):
        if path.exists():
            if not path.is_dir():
                raise ConfigError(
                    f"the run store {store} (output.store, --out) must be a folder, but "
                    f"{path} is a file; give a folder path"
                )
            if not os.access(path, os.W_OK | os.X_OK):
                raise ConfigError(
                    f"the run store {store} (output.store, --out) cannot be written: {path} "
                    "is read-only for this user; give a folder you can write to"
                )
            return


def check_slice_columns(entries: Entries, config: AuditConfig) -> None:
    """A slice column named like a result column would be overwritten by (or overwrite)
    the audit's numbers: a setup error."""
    clashes = sorted(set(entries.slice_columns) & result_columns(config))
    if clashes:
        raise ConfigError(
            f"the dataset ({entries.name}) has column(s) {', '.join(clashes)}, which are "
            "names of result columns in images.parquet; rename them (e.g. to slice_<name>)"
        )


def region_sources(entries: Entries, face_detector: bool = False) -> dict[str, bool]:
    """Which region sources the dataset has on some row: masks, boxes, faces."""
    table = entries.table

    def filled(columns) -> bool:  # some row has all of these columns
        return all(c in table for c in columns) and table[list(columns)].notna().all(1).any()

    return {
        "mask": filled(["mask_path"]) or filled(["mask_rle"]),
        "box": filled(BOX_COLUMNS),
        "face": face_detector or filled(FACE_COLUMNS) or filled(LANDMARK_COLUMNS),
    }


def regions_for_data(config: AuditConfig, entries: Entries) -> tuple[AuditConfig, str | None]:
    """The config with default regions that follow the data, and a sentence saying
    which it chose (None when the config names its regions or the data has masks).

    Without configured regions the object is the mask; a dataset without masks but with
    boxes gets the box as its object, and one with only face boxes or landmarks the
    face as the expected region (a face-attribute model: configure the face as
    spurious for, say, an occupation model). The background is the rest either way.
    """
    if "regions" in config.model_fields_set:
        return config, None
    has = region_sources(entries, face_detector=config.dataset.face_detector is not None)
    if has["mask"] or not (has["box"] or has["face"]):
        return config, None  # masks, or nothing: the default (and its clear error)
    source = "box" if has["box"] else "face"
    regions = (
        RegionSection(name="object" if source == "box" else "face", source=source),
        RegionSection(name="background", source="background", role="spurious"),
    )
    what = "boxes (x_min, y_min, x_max, y_max)" if source == "box" else "face boxes"
    note = (
        f"regions: the dataset has no masks, so the expected region is its {what}: "
        f"'{regions[0].name}' ({source}, expected) and 'background' (the rest, spurious)"
    )
    return config.model_copy(update={"regions": regions}), note


def check_regions_have_data(entries: Entries, regions, face_detector: bool = False) -> None:
    """Fail fast when a region's source is absent from the whole dataset (every row
    would be skipped for it, or a spurious face region empty on every row): a setup
    error, not a bad row."""
    has = region_sources(entries, face_detector)
    needs = {"mask": "object masks", "box": "boxes", "face": "face boxes"}
    fixes = {
        "mask": "a mask_path or mask_rle column in the manifest, a masks folder for class "
        "folders (dataset.masks, or --masks DIR with --data), COCO annotations or a tfds "
        "mask_key, or boxes (x_min, y_min, x_max, y_max columns), which the default "
        "regions then use",
        "box": "the columns x_min, y_min, x_max, y_max in the manifest",
        "face": f"the columns {', '.join(FACE_COLUMNS)} or the five landmarks "
        f"({', '.join(LANDMARK_COLUMNS[::2])} and *_y) in the manifest, or "
        "dataset.face_detector: mtcnn",
    }
    for region in regions:
        if region.source in has and not has[region.source]:
            raise ConfigError(
                f"region {region.name!r} (source: {region.source}) needs "
                f"{needs[region.source]} and the dataset ({entries.name}) has none: give "
                f"{fixes[region.source]}, or configure regions the data has "
                "(docs/config.md, regions). Without any object region an audit can give "
                "accuracy per class and slice but no map metrics, flags or interventions, "
                "so it is refused"
            )
