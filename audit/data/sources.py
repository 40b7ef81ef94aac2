"""Every dataset source as one entries table (``read_entries``): a manifest, class
folders (``audit.data.manifest``), a COCO instances file (``audit.data.coco``) or a
TensorFlow dataset exported once to files (``audit.data.tfds``)."""

from __future__ import annotations

from dataclasses import replace

from audit.config import ConfigError
from audit.config.sections import DatasetSection
from audit.data.coco import read_coco
from audit.data.manifest import (
    Entries,
    read_folders,
    read_manifest,
)
from audit.data.tfds import read_tfds


def read_entries(dataset: DatasetSection) -> Entries:
    """The entries table of the configured source (a manifest, class folders, a COCO file
    or a TensorFlow dataset)."""
    if dataset.tfds is not None:
        return read_tfds(dataset)
    if dataset.manifest is not None:
        entries = read_manifest(dataset.manifest)
    elif dataset.folders is not None:
        entries = read_folders(dataset.folders, dataset.masks)
    elif dataset.coco is not None:
        entries = read_coco(dataset.coco, dataset.coco_images)
    else:
        raise ConfigError("the dataset section names no source (manifest, folders, coco or tfds)")
    if dataset.limit is not None:
        entries = replace(entries, table=entries.table.iloc[: dataset.limit].copy())
    if dataset.root is not None and dataset.manifest is not None:
        if not dataset.root.is_dir():
            raise ConfigError(f"dataset.root (--root): folder not found: {dataset.root}")
        entries = replace(entries, root=dataset.root)
    return replace(entries, confine=dataset.confine)
