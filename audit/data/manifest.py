"""Dataset sources as one entries table: a manifest (CSV or Parquet), class folders,
or an exported TF dataset; the class names and their order.

Every source becomes the same **entries table** (a DataFrame, one row per image, in a
stable order): ``path``, ``label`` and optionally ``mask_path``, ``mask_rle`` (COCO
run-length encoding), the box columns ``x_min, y_min, x_max, y_max`` (pixels of the
original image) and any slice attributes (docs/manifest.md).
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from audit.config import ConfigError
from audit.data.faces import FACE_COLUMNS, LANDMARK_COLUMNS

BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")
SOURCE_COLUMNS = (
    "path",
    "label",
    "mask_path",
    "mask_rle",
    *BOX_COLUMNS,
    *FACE_COLUMNS,
    *LANDMARK_COLUMNS,
)
# Columns the audit writes itself; a manifest must not use them for slices.
RESERVED_COLUMNS = {
    "row",
    "label_index",
    "pred",
    "pred_label",
    "confidence",
    "correct",
    "target",
    "target_score",
    "cam_total",
    "zero_map",
    "status",
    "skip_reason",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Entries:
    """The audit's input rows and the folder their relative paths start from."""

    table: pd.DataFrame
    root: Path
    name: str  # a short description for the run manifest
    mask_root: Path | None = None  # where mask_path starts, when not at root
    class_names: list[str] | None = None  # the source's own class order, if it has one
    # Class folders, sorted as Keras numbers them: the model's order when there is one
    # folder per output (a subset of the classes cannot tell the order).
    class_folders: list[str] | None = None
    confine: bool = False  # refuse files outside the root (dataset.confine)

    @property
    def mask_base(self) -> Path:
        return self.mask_root if self.mask_root is not None else self.root

    @property
    def slice_columns(self) -> list[str]:
        return [c for c in self.table.columns if c not in SOURCE_COLUMNS]

    def records(self, positions: Sequence[int]) -> list[dict]:
        """The rows at ``positions`` as dicts, in one table read (a per-row ``.iloc``
        costs more than decoding the image)."""
        return self.table.iloc[list(positions)].to_dict("records")


# ------------------------------------------------------------------ sources


def filled(value) -> bool:
    """A filled-in cell: not None, NaN, pandas' NA or blank text."""
    if isinstance(value, str):
        return value.strip() != ""
    return value is not None and not (pd.api.types.is_scalar(value) and pd.isna(value))


def read_manifest(path: Path) -> Entries:
    """A CSV or Parquet manifest; relative paths start at the manifest's folder."""
    if not path.exists():
        raise ConfigError(f"dataset manifest not found: {path}")
    try:
        table = pd.read_parquet(path) if path.suffix == ".parquet" else _read_csv(path)
    except ConfigError:
        raise
    except Exception as error:  # pandas raises many types for unreadable files
        raise ConfigError(f"cannot read manifest {path}: {error}") from None
    missing = [c for c in ("path", "label") if c not in table.columns]
    if missing:
        found = ", ".join(repr(str(c)) for c in table.columns[:8])
        raise ConfigError(
            f"manifest {path} lacks the column(s) {', '.join(missing)}; it needs at least "
            f"'path' and 'label' (see docs/manifest.md); its header has {found}"
            + ("" if path.suffix == ".parquet" else " (comma-separated, no spaces)")
        )
    boxes = [c for c in BOX_COLUMNS if c in table.columns]
    if boxes and len(boxes) != 4:
        raise ConfigError(
            f"manifest {path} has box column(s) {boxes}; give all of {', '.join(BOX_COLUMNS)}"
        )
    reserved = sorted(set(table.columns) & RESERVED_COLUMNS)
    if reserved:
        raise ConfigError(
            f"manifest {path} has column(s) {', '.join(reserved)}, which are names of result "
            "columns in images.parquet; rename them (e.g. to slice_<name>)"
        )
    table = table.reset_index(drop=True)
    # Labels decide the model's class names (every label is read for them), so an
    # empty label is the manifest's error; an empty path only concerns its row
    # (load_row skips it).
    if table["label"].isna().any():
        row = int(table.index[table["label"].isna()][0])
        where = "" if path.suffix == ".parquet" else f", line {_csv_line(path, row)} of the CSV"
        raise ConfigError(
            f"manifest {path}: row {row} (counted from 0 as images.parquet's row column"
            f"{where}) has no label; every row needs one: fill it in or remove the row"
        )
    # Text, with empty cells kept empty (astype(str) would turn them into 'nan').
    table["path"] = table["path"].map(lambda value: str(value) if filled(value) else "")
    table["label"] = table["label"].astype(str)
    return Entries(
        table, path.parent, f"manifest:{path.name}", class_names=_exported_class_names(path)
    )


def _read_csv(path: Path) -> pd.DataFrame:
    """A CSV manifest as text: only an empty cell is missing (a label or slice value such
    as ``NA`` or ``None`` is kept as written) and ``007`` stays ``007``; the box columns
    become numbers when every filled-in cell is one (else a bad cell skips its row).

    Fields past the header's last column must be empty (a trailing comma): they are
    dropped, as is a column without a name and without a value (a trailing comma on
    the header line too); a filled-in one is a ``ConfigError`` naming its line.
    """
    read = functools.partial(
        pd.read_csv, path, dtype=str, keep_default_na=False, na_values=[""], index_col=False
    )
    # index_col=False: pandas would take the first column as the index when every data
    # line has one field more than the header; it drops one empty trailing field quietly,
    # and warns or fails for the rest, which are looked at line by line.
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            table = read()
        except (pd.errors.ParserWarning, pd.errors.ParserError):
            columns = _check_extra_fields(path)
            if columns is None:
                raise
            table = read(usecols=range(columns))
    unnamed = [c for c in table.columns if c.startswith("Unnamed: ") and table[c].isna().all()]
    table = table.drop(columns=unnamed)
    for column in (*BOX_COLUMNS, *FACE_COLUMNS, *LANDMARK_COLUMNS):
        if column in table:
            numbers = pd.to_numeric(table[column], errors="coerce")
            if numbers.notna().sum() == table[column].notna().sum():
                table[column] = numbers
    return table


def _check_extra_fields(path: Path) -> int | None:
    """The header's number of fields when some data line has more, all of them empty;
    ``ConfigError`` for a line with a filled-in field past the header; None when no line
    has more fields than the header (the CSV's trouble is another)."""
    import csv

    with open(path, newline="", encoding="utf-8-sig", errors="replace") as file:
        reader = csv.reader(file)
        header, longer, end = None, False, 0
        for record in reader:
            start, end = end + 1, reader.line_num
            if not record:
                continue  # a blank line
            if header is None:
                header = record
            elif len(record) > len(header):
                longer = True
                extra = [field for field in record[len(header) :] if field.strip()]
                if extra:
                    raise ConfigError(
                        f"manifest {path}: line {start} has {len(record)} fields but the "
                        f"header has {len(header)} ({', '.join(header[:8])}); the extra "
                        f"value(s) {', '.join(repr(f) for f in extra[:3])} belong to no "
                        "column: remove them, quote a value that contains a comma, or name "
                        "the column in the header"
                    )
    return len(header) if longer and header is not None else None


def _csv_line(path: Path, row: int) -> int:
    """The line of ``path`` on which data row ``row`` (from 0) starts, as pandas reads it:
    blank lines skipped, a quoted field may span lines."""
    import csv

    with open(path, newline="", encoding="utf-8-sig", errors="replace") as file:
        reader = csv.reader(file)
        end, seen = 0, -1  # the line the previous record ended on; data rows seen
        for record in reader:
            start, end = end + 1, reader.line_num
            if not record:
                continue  # a blank line
            if seen == row:
                return start
            seen += 1
    return row + 2


# What ``audit.data.tfds.export_tf_dataset`` writes: the manifest and, last, a marker
# with the label feature's names in index order (the model's output order).
EXPORT_MANIFEST, EXPORT_MARKER = "manifest.csv", "complete"


def _exported_class_names(manifest: Path) -> list[str] | None:
    """The class order an exported ``tf.data`` folder records next to its manifest, so
    that its label names keep the model's output order, not the alphabet's."""
    marker = manifest.parent / EXPORT_MARKER
    if manifest.name != EXPORT_MANIFEST or not marker.is_file():
        return None
    try:
        names = json.loads(marker.read_text()).get("label_names")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(name) for name in names] if isinstance(names, list) else None


def read_folders(root: Path, masks: Path | None = None) -> Entries:
    """Keras' class-folder layout ``root/<class>/<image>``; masks ``masks/<class>/<stem>.png``."""
    if not root.is_dir():
        raise ConfigError(f"dataset folder not found: {root}")
    if masks is not None and not masks.is_dir():
        raise ConfigError(
            f"masks folder not found: {masks} (dataset.masks, --masks); it mirrors the "
            "class folders: MASKS/<class>/<image stem>.png"
        )
    rows = []
    # Hidden folders (.ipynb_checkpoints, ...) are no classes, as for Keras.
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for name in classes:
        # Sub-folders of a class folder hold its images too, as for Keras.
        for image in sorted(p for p in (root / name).rglob("*") if p.is_file()):
            if image.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            relative = image.relative_to(root).as_posix()
            row = {"path": relative, "label": name}
            if masks is not None:
                row["mask_path"] = Path(relative).with_suffix(".png").as_posix()
            rows.append(row)
    if not rows:
        raise ConfigError(f"no images found under {root}/<class>/ (suffixes {IMAGE_SUFFIXES})")
    # Keras' image_dataset_from_directory numbers the class folders in sorted order
    # ("10" before "2"): the model's output order.
    return Entries(
        pd.DataFrame(rows), root, f"folders:{root.name}", mask_root=masks, class_folders=classes
    )


def class_names_for(
    labels: pd.Series,
    num_classes: int,
    given: Sequence[str] | None,
    folders: Sequence[str] | None = None,
) -> list[str]:
    """The model's class names in output order.

    Given names win. Then class ``folders`` (sorted, Keras' ``image_dataset_from_directory``
    order: "10" before "2") when there is one per output. Otherwise labels that are all
    integers are class indices, and other labels are sorted alphabetically.
    """
    if given is not None:
        names = list(given)
    elif folders is not None and len(folders) == num_classes:
        names = list(folders)
    else:
        unique = sorted(set(labels))
        if all(label.lstrip("-").isdigit() for label in unique):
            names = [str(index) for index in range(num_classes)]
            if folders is not None and any(len(label) > 1 for label in unique):
                warnings.warn(
                    f"{len(folders)} class folders for a model with {num_classes} outputs: "
                    "their labels are read as class indices, but a model trained from "
                    "class folders numbers them in sorted order ('10' before '2'); if it "
                    "was, list its classes in that order under model.class_names",
                    stacklevel=2,
                )
        else:
            names = unique
    if len(names) != num_classes:
        raise ConfigError(
            f"the model has {num_classes} outputs but there are {len(names)} class names "
            f"({', '.join(names[:12])}{', ...' if len(names) > 12 else ''}); list the model's "
            "classes in output order under model.class_names"
        )
    return names
