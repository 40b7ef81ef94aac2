"""TensorFlow Datasets as files: a split exported once to a cache folder of PNG files
and a manifest CSV (``export_tf_dataset``, also usable on any ``tf.data.Dataset`` of
dicts), so the rest of the audit reads files exactly as for a manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from audit.config import ConfigError
from audit.config.sections import DatasetSection
from audit.data.manifest import (
    EXPORT_MANIFEST,
    EXPORT_MARKER,
    Entries,
    read_manifest,
)
from audit.runs.store import atomic_write

# ------------------------------------------------------------------- TFDS

EXPORT_FORMAT = 1
TRIMAP_VALUES = {1, 2, 3}  # Oxford-IIIT Pet: 1 pet, 2 background, 3 border


def cache_root() -> Path:
    """``$BIAS_AUDIT_CACHE`` or ``~/.cache/bias-audit``."""
    return Path(os.environ.get("BIAS_AUDIT_CACHE", "~/.cache/bias-audit")).expanduser()


def tfds_cache_folder(name: str, split: str) -> Path:
    """Where a TFDS split is exported: ``<cache>/tfds/<name>/<split>``."""
    return cache_root() / "tfds" / _safe_name(name) / _safe_name(split)


def _safe_name(text: str) -> str:
    """A folder name for a TFDS name or split (``train[:10%]``, ``pet:4.0.0``), unambiguous."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", text)
    if safe != text:
        safe += "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return safe


def read_tfds(dataset: DatasetSection) -> Entries:
    """A TensorFlow Datasets split, exported once to PNG files + a manifest, as entries.

    The split must already be prepared (``tfds build NAME`` or ``tfds.load(NAME)``
    once with downloads); the audit never downloads. The export lives in
    ``tfds_cache_folder(name, split)`` (``$BIAS_AUDIT_CACHE``, default
    ``~/.cache/bias-audit``) and is reused while its ``complete`` marker names the
    same image, label and mask keys; delete the folder to export again. Masks are
    binarised as described in ``export_tf_dataset``. ``dataset.limit`` keeps the
    first N rows of the (complete) export.
    """
    folder = tfds_cache_folder(dataset.tfds, dataset.tfds_split)
    keys = {
        "image_key": dataset.image_key,
        "label_key": dataset.label_key,
        "mask_key": dataset.mask_key,
    }
    manifest = _complete_export(folder, keys)
    if manifest is None:
        ds, label_names = _load_tfds(dataset)
        manifest = export_tf_dataset(ds, folder, label_names=label_names, **keys)
    entries = read_manifest(manifest)  # with the marker's class order
    table = entries.table
    if dataset.limit is not None:
        table = table.iloc[: dataset.limit].copy()
    return Entries(
        table,
        entries.root,
        f"tfds:{dataset.tfds}/{dataset.tfds_split}",
        class_names=entries.class_names,
    )


def _load_tfds(dataset: DatasetSection):
    """The prepared split and the label feature's class names (None if not a ClassLabel)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ConfigError(
            "dataset.tfds needs tensorflow-datasets: pip install 'bias-audit[tfds]'"
        ) from None
    name, split = dataset.tfds, dataset.tfds_split
    try:
        ds, info = tfds.load(name, split=split, with_info=True, download=False)
    except Exception as error:  # tfds raises AssertionError, ValueError, ... for missing data
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(
            f"cannot load TFDS dataset {name!r}, split {split!r}: {first_line}; check the "
            f"name and split and prepare the data first (`tfds build {name}`, or "
            f"tfds.load({name!r}) once with downloads); TFDS_DATA_DIR sets where it looks"
        ) from None
    features = info.features
    wanted = [dataset.image_key, dataset.label_key, dataset.mask_key]
    missing = [key for key in wanted if key is not None and key not in features]
    if missing:
        raise ConfigError(
            f"TFDS dataset {name!r} has no feature(s) {', '.join(missing)}; its features are "
            f"{', '.join(features)}; set dataset.image_key / label_key / mask_key"
        )
    label = features[dataset.label_key]
    names = list(label.names) if hasattr(label, "int2str") and hasattr(label, "names") else None
    return ds, names


def _complete_export(folder: Path, keys: dict) -> Path | None:
    """The manifest of a finished export with these keys, or None if it must be (re)done."""
    try:
        marker = json.loads((folder / EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    expected = {"format": EXPORT_FORMAT, **keys}
    if any(marker.get(key) != value for key, value in expected.items()):
        return None
    manifest = folder / EXPORT_MANIFEST
    return manifest if manifest.exists() else None


def export_tf_dataset(
    ds,
    folder: Path,
    *,
    image_key: str,
    label_key: str,
    mask_key: str | None = None,
    label_names: Sequence[str] | None = None,
) -> Path:
    """Write a ``tf.data.Dataset`` of dicts as PNG files and a manifest; return the manifest.

    Element ``i`` becomes ``images/{i:06d}.png`` (uint8, 1, 3 or 4 channels) and,
    with ``mask_key``, ``masks/{i:06d}.png`` (0 / 255). ``manifest.csv`` lists
    ``path``, ``label`` and ``mask_path`` relative to ``folder``; labels are
    ``label_names[i]`` for integer labels when given, else ``str(i)``; string
    labels are kept.

    Mask rule: a mask (``(h, w)`` or ``(h, w, 1)``) whose values all lie in
    {1, 2, 3} is a trimap as in Oxford-IIIT Pet (1 object, 2 background, 3 border)
    and the object is ``value == 1``; any other mask is ``value > 0`` (booleans as
    they are).

    The export always runs (``read_tfds`` is what reuses one). The manifest is
    written atomically and the ``complete`` marker last, so a killed export is
    redone, never half-used. Files other than the manifest, the marker and those
    listed are left alone.
    """
    folder = Path(folder)
    _check_keys(ds, [image_key, label_key, mask_key])
    (folder / EXPORT_MARKER).unlink(missing_ok=True)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    if mask_key is not None:
        (folder / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for index, element in enumerate(ds.as_numpy_iterator()):
        stem = f"{index:06d}.png"
        row = {"path": f"images/{stem}", "label": _label(element[label_key], label_names)}
        _save_png(_image_array(element[image_key], index), folder / row["path"])
        if mask_key is not None:
            row["mask_path"] = f"masks/{stem}"
            mask = _object_mask(element[mask_key], index)
            _save_png(mask.astype(np.uint8) * 255, folder / row["mask_path"])
        rows.append(row)
    if not rows:
        raise ConfigError(f"the dataset exported to {folder} is empty; nothing to audit")
    columns = ["path", "label"] + (["mask_path"] if mask_key is not None else [])
    manifest = folder / EXPORT_MANIFEST
    _write_atomic(manifest, pd.DataFrame(rows, columns=columns).to_csv(index=False))
    marker = {
        "format": EXPORT_FORMAT,
        "image_key": image_key,
        "label_key": label_key,
        "mask_key": mask_key,
        "rows": len(rows),
        # The label feature's names in index order: the model's output order.
        "label_names": None if label_names is None else list(label_names),
    }
    _write_atomic(folder / EXPORT_MARKER, json.dumps(marker))
    return manifest


def _check_keys(ds, keys: Sequence[str | None]) -> None:
    spec = getattr(ds, "element_spec", None)
    if not isinstance(spec, dict):
        raise ConfigError(
            f"export_tf_dataset needs a tf.data.Dataset of dicts (feature name -> tensor), "
            f"got elements of {type(spec).__name__}; map it to a dict first"
        )
    missing = [key for key in keys if key is not None and key not in spec]
    if missing:
        raise ConfigError(
            f"the dataset's elements have no key(s) {', '.join(missing)}; they have "
            f"{', '.join(spec)}; pass the right image_key / label_key / mask_key"
        )


def _label(value, names: Sequence[str] | None) -> str:
    value = np.asarray(value)
    if value.ndim != 0:
        raise ConfigError(
            f"labels must be scalars (a class index or name), got shape {value.shape}; "
            "map one-hot labels to indices with argmax first"
        )
    item = value.item()
    if isinstance(item, bytes):
        return item.decode()
    if isinstance(item, str):
        return item
    index = int(item)
    if names is not None and 0 <= index < len(names):
        return str(names[index])
    return str(index)


def _image_array(value, index: int) -> np.ndarray:
    """uint8 (h, w), (h, w, 1), (h, w, 3) or (h, w, 4) -> an array PIL can write."""
    pixels = np.asarray(value)
    if pixels.dtype != np.uint8:
        integral = np.issubdtype(pixels.dtype, np.integer)
        if not (integral and pixels.size and pixels.min() >= 0 and pixels.max() <= 255):
            raise ConfigError(
                f"image {index} is {pixels.dtype} with values outside uint8; export 0..255 "
                "uint8 pixels (undo any scaling, then tf.cast(image, tf.uint8))"
            )
        pixels = pixels.astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)):
        raise ConfigError(
            f"image {index} has shape {pixels.shape}; expected (height, width[, 1, 3 or 4])"
        )
    return pixels


def _object_mask(value, index: int) -> np.ndarray:
    """The object pixels of a mask: trimap ``== 1`` or ``> 0`` (see ``export_tf_dataset``)."""
    mask = np.asarray(value)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ConfigError(f"mask {index} has shape {mask.shape}; expected (height, width[, 1])")
    if mask.dtype == bool:
        return mask
    if mask.size and set(np.unique(mask).tolist()) <= TRIMAP_VALUES:
        return mask == 1
    return mask > 0


def _save_png(pixels: np.ndarray, path: Path) -> None:
    Image.fromarray(pixels).save(path, format="PNG", compress_level=1)


def _write_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda temporary: temporary.write_text(text))
