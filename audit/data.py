"""Load: dataset sources -> an entries table -> decoded, preprocessed batches with regions.

Every source becomes the same **entries table** (a DataFrame, one row per image,
in a stable order): ``path``, ``label`` and optionally ``mask_path``, ``mask_rle``
(COCO run-length encoding), the box columns ``x_min, y_min, x_max, y_max`` (pixels
of the original image) and any slice attributes. Loading a row either yields a
preprocessed image with its region masks or a ``SkipRow`` with a reason: the audit
records it and goes on; nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import stat
import threading
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from audit.config import ConfigError, DatasetSection, PreprocessSection, RegionSection
from audit.faces import FACE_COLUMNS, LANDMARK_COLUMNS, face_mask, landmark_box

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


class SkipRow(Exception):
    """This row cannot be audited; the message is the recorded reason."""


# Decode threads of the local engine and the interventions: Pillow releases the GIL
# while it decodes and resamples, so threads scale with the cores (4 on 2 cores, as
# before; 32 at most on a large machine).
DECODE_THREADS = max(4, min(32, 2 * (os.cpu_count() or 2)))
# Pixels that the decode threads hold at once, all together, at the size they are
# decoded (before the resize to the model's input): 128 Mi pixels, about 0.5 GB as
# Pillow's 4-byte RGB. Ordinary images never wait (32 threads of 2048 x 2048 images
# fit); an image larger than the whole budget (12000 x 12000) is decoded alone.
DECODE_PIXEL_BUDGET = 2**27
# An image at least twice this many times the model's input on both sides is shrunk
# while it is decoded: JPEG's DCT scaling (Pillow's draft), then reduce() by an integer
# factor that leaves at least this many times the input for the bilinear resize, which
# keeps the result close to resizing from full size (Pillow's reducing_gap). Smaller
# images are decoded and resized exactly as before.
REDUCING_GAP = 2


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
    table["path"] = table["path"].map(lambda value: str(value) if _present(value) else "")
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


# What ``audit.sources.export_tf_dataset`` writes: the manifest and, last, a marker
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


def read_entries(dataset: DatasetSection) -> Entries:
    """The entries table of a file-based source."""
    if dataset.manifest is not None:
        entries = read_manifest(dataset.manifest)
    elif dataset.folders is not None:
        entries = read_folders(dataset.folders, dataset.masks)
    elif dataset.coco is not None:
        from audit.sources import read_coco

        entries = read_coco(dataset.coco, dataset.coco_images)
    else:
        raise ConfigError("read_entries handles manifest, folders and coco sources")
    if dataset.limit is not None:
        entries = replace(entries, table=entries.table.iloc[: dataset.limit].copy())
    if dataset.root is not None and dataset.manifest is not None:
        if not dataset.root.is_dir():
            raise ConfigError(f"dataset.root (--root): folder not found: {dataset.root}")
        entries = replace(entries, root=dataset.root)
    return replace(entries, confine=dataset.confine)


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


# ------------------------------------------------------------ preprocessing


@dataclass(frozen=True)
class Preprocessor:
    """Resizes images (bilinear) and masks (nearest) and scales pixels as the model expects.

    With ``region_size`` smaller than ``size``, the finished regions are area-averaged
    to that measuring grid (float coverage fractions): done here, in the decode
    threads, so full-resolution masks never travel to the compiled step.
    """

    size: tuple[int, int]  # (height, width)
    settings: PreprocessSection
    region_size: tuple[int, int] | None = None
    channels: int = 3  # the model's input channels: 3 (RGB) or 1 (grey)

    def coverage(self, regions: np.ndarray) -> np.ndarray:
        """(R, H, W) bool -> (R, h, w) float32 area fractions at ``region_size``."""
        if self.region_size is None or tuple(self.region_size) == tuple(self.size):
            return regions
        (height, width), (rows, cols) = self.size, self.region_size
        values = regions.astype("float32")
        if height % rows == 0 and width % cols == 0:  # exact block means
            blocks = values.reshape(len(values), rows, height // rows, cols, width // cols)
            return blocks.mean(axis=(2, 4))
        return np.stack(
            [
                np.asarray(Image.fromarray(region, mode="F").resize((cols, rows), Image.BOX))
                for region in values
            ]
        )

    def image(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (h, w, 3), or (h, w) grey -> float32 (H, W, channels) ready for the model."""
        height, width = self.size
        if pixels.shape[:2] != (height, width):
            pixels = np.asarray(Image.fromarray(pixels).resize((width, height), Image.BILINEAR))
        values = pixels.astype("float32").reshape(height, width, -1)
        if self.settings.keras_preprocess:
            import keras

            module = getattr(keras.applications, self.settings.keras_preprocess)
            return np.asarray(module.preprocess_input(values.copy()), dtype="float32")
        values *= self.settings.scale
        if self.settings.mean is not None:
            values -= np.asarray(self.settings.mean, dtype="float32")
        if self.settings.std is not None:
            values /= np.asarray(self.settings.std, dtype="float32")
        return values

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """bool (h, w) -> bool (H, W), nearest neighbour."""
        height, width = self.size
        if mask.shape == (height, width):
            return mask
        resized = Image.fromarray(mask.astype("uint8") * 255).resize((width, height), Image.NEAREST)
        return np.asarray(resized) > 127

    def box(self, box: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
        """A pixel box of an image of ``shape`` (h, w) -> bool (H, W): the pixels that
        ``mask`` gives for the box drawn at full size, without drawing it there (a
        12000 x 12000 mask takes 144 MB)."""
        rows = _nearest_indices(shape[0], self.size[0])
        cols = _nearest_indices(shape[1], self.size[1])
        x_min, y_min, x_max, y_max = (max(int(round(v)), 0) for v in box)  # as _box_mask
        return ((rows >= y_min) & (rows < y_max))[:, None] & ((cols >= x_min) & (cols < x_max))


@functools.lru_cache(maxsize=256)
def _nearest_indices(source: int, target: int) -> np.ndarray:
    """The pixels along a side of ``source`` pixels that Pillow's nearest-neighbour
    resize to ``target`` pixels picks (it picks along each side apart)."""
    positions = Image.fromarray(np.arange(source, dtype="int32")[None, :])
    return np.asarray(positions.resize((target, 1), Image.NEAREST))[0]


# ------------------------------------------------------------------ regions


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    if pixels <= 0 or not mask.any():
        return mask
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, iterations=pixels)


def _box_mask(box: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
    x_min, y_min, x_max, y_max = (int(round(v)) for v in box)
    mask = np.zeros(shape, dtype=bool)
    mask[max(y_min, 0) : max(y_max, 0), max(x_min, 0) : max(x_max, 0)] = True
    return mask


def _mask_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return _box_mask((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), mask.shape)


def build_regions(
    regions: Sequence[RegionSection],
    mask: np.ndarray | None,
    box: np.ndarray | None,
    shape: tuple[int, int],
    faces: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """The (regions, H, W) stack for one image, from its resized mask, box and face masks.

    ``faces`` maps face region names to their masks, or to None when the image has
    no face: an expected face region then skips the row, a spurious one stays empty.
    """
    built: dict[str, np.ndarray] = {}
    for region in regions:
        if region.source == "mask":
            if mask is None:
                raise SkipRow(f"region {region.name!r} needs an object mask and the row has none")
            area = _mask_box(mask) if region.box_from_mask and mask.any() else mask
        elif region.source == "box":
            if box is None:
                raise SkipRow(f"region {region.name!r} needs a box and the row has none")
            area = box
        elif region.source == "face":
            area = (faces or {}).get(region.name)
            if area is None:
                if region.role == "expected":
                    raise SkipRow(f"no face found for region {region.name!r}")
                area = np.zeros(shape, dtype=bool)
        elif region.source == "border":
            area = np.ones(shape, dtype=bool)
            area[region.width : -region.width, region.width : -region.width] = False
        else:
            continue  # background: the complement, filled in below
        built[region.name] = _dilate(area, region.dilate)
    # The background is the rest: what no object, box or face region covers, whatever
    # its role (a spurious face is not background); a border band may overlap it.
    taken = np.zeros(shape, dtype=bool)
    for region in regions:
        if region.name not in built or region.source == "border":
            continue
        if region.role == "expected" and not built[region.name].any():
            raise SkipRow(f"the {region.name!r} region is empty (an empty mask or box)")
        taken |= built[region.name]
    for region in regions:
        if region.source == "background":
            built[region.name] = _dilate(~taken, region.dilate)
    if not built:  # no regions: what a plain forward pass reads (benchmarks)
        return np.zeros((0, *shape), dtype=bool)
    return np.stack([built[region.name] for region in regions])


# ------------------------------------------------------------------ loading


def _inside(root: Path, relative: str, column: str = "path", confine: bool = True) -> Path:
    """``root / relative`` (an absolute ``relative`` as it is); with ``confine``, symlinks
    resolved and refused when it leaves ``root``.

    ``column``: the entries column the value came from, named in the refusal.
    """
    joined = os.path.join(root, relative)
    if not confine:
        return Path(joined)
    folder, name = os.path.split(joined)
    if name in ("", ".", "..") or os.path.islink(joined):
        path = Path(os.path.realpath(joined))
    else:  # one lstat per file: its folder's resolution is shared by its siblings
        path = Path(_real_folder(folder), name)
    if not path.is_relative_to(_real_folder(str(root))):
        raise SkipRow(
            f"{column} {relative!r} escapes the dataset root {root}; refused "
            "(dataset.confine: true): keep the files under the root, or set dataset.root"
        )
    return path


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


def forget_resolved_paths() -> None:
    """Drop the remembered folder resolutions: every run (and every pass of
    ``load_batches``) resolves its paths afresh, so a swapped symlink is seen."""
    _real_folder.cache_clear()


# Pillow's modes for one channel of more than 8 bits: 16-bit PNG/TIFF/PGM, 32-bit
# integers, 32-bit floats. Its convert() clips them to 0..255 (a 16-bit photo turns
# white), so they are scaled here instead.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class PixelBudget:
    """Bounds the pixels that threads decode at once: ``hold(n)`` waits until ``n``
    pixels of the budget are free; an image larger than the whole budget waits for all
    of it. (A waiting large image is not overtaken for ever: ``load_batches`` waits for
    its rows in order and submits no more meanwhile.)"""

    def __init__(self, pixels: int) -> None:
        self.pixels = pixels
        self._free = pixels
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.pixels)
        with self._changed:
            self._changed.wait_for(lambda: self._free >= pixels)
            self._free -= pixels
        try:
            yield
        finally:
            with self._changed:
                self._free += pixels
                self._changed.notify_all()


DECODING = PixelBudget(DECODE_PIXEL_BUDGET)

# Pillow allocates an image in blocks of 16 MiB. glibc's malloc keeps such blocks, once
# freed, in the arena of the thread that decoded them, so each decode thread could keep
# a large image's worth; blocks above 32 MiB are mapped and handed back to the system
# when freed. Small images take one block of their own size as before. PILLOW_BLOCK_SIZE
# set by the user wins.
if "PILLOW_BLOCK_SIZE" not in os.environ:
    Image.core.set_block_size(max(Image.core.get_block_size(), 64 * 2**20))


def _much_larger(image_size: tuple[int, int], size: tuple[int, int] | None) -> bool:
    """Whether an image of ``image_size`` (width, height) is shrunk while it is decoded
    for the model's input ``size`` (height, width): see ``REDUCING_GAP``."""
    if size is None:
        return False
    (width, height), (rows, cols) = image_size, size
    return min(width // cols, height // rows) >= 2 * REDUCING_GAP


def _shrunk(image: Image.Image, size: tuple[int, int], box=None) -> Image.Image:
    """Bilinear to ``size`` (height, width) as ``Preprocessor.image`` resizes, reduced
    first by an integer factor (``REDUCING_GAP``); ``box``: the part of ``image`` that
    is the whole picture (a JPEG decoded at a reduced scale may have a partial edge)."""
    height, width = size
    return image.resize((width, height), Image.BILINEAR, box=box, reducing_gap=REDUCING_GAP)


def _file_kind(mode: int) -> str:
    kinds = {
        stat.S_ISDIR: "a folder",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    return next((kind for test, kind in kinds.items() if test(mode)), "not a file")


@contextlib.contextmanager
def _opened(path: Path, what: str) -> Iterator[Image.Image]:
    """The image file at ``path`` with its header read (size, mode), or ``SkipRow``.

    Only a regular file is opened: reading a FIFO or a device would wait for ever.
    ``what``: "image" or "mask", named in the reasons.
    """
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise SkipRow(
                f"{what} {path} is not a regular file ({_file_kind(mode)}); only files "
                f"are read: point the row at the {what} file or remove the row"
            )
        image = Image.open(path)
    except FileNotFoundError:
        raise SkipRow(f"{what} file not found: {path}") from None
    except Image.DecompressionBombError:
        raise _too_large(what, path) from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise SkipRow(f"corrupt or unreadable {what} {path}: {error}") from None
    with image:
        yield image


def _grey_to_8bit(image: Image.Image, path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """A wide greyscale image as uint8 (h, w): 16-bit values / 257 (65535 -> 255),
    32-bit integers as 16-bit values (0..65535), floats as 0..1; other ranges are
    refused rather than guessed. With ``size``, shrunk to it (``_shrunk``); the range is
    the whole image's."""
    values = np.asarray(image)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    sixteen_bit = image.mode.startswith("I;16") or (
        image.mode == "I" and low >= 0 and high <= 65535
    )
    if not sixteen_bit and not (image.mode == "F" and low >= 0 and high <= 1):
        kind = "floating-point" if image.mode == "F" else "32-bit integer"
        accepted = "0..1" if image.mode == "F" else "0..65535"
        raise SkipRow(
            f"image {path} has {kind} pixels in [{low:g}, {high:g}], outside {accepted}; "
            "save it as an 8-bit or 16-bit image"
        )
    if size is not None:  # Pillow resizes 16-bit images only as 32-bit ones
        del values  # the full-size copy goes before the resize
        wide = image.convert("I") if image.mode.startswith("I;16") else image
        values = np.asarray(_shrunk(wide, size))
    values = values.astype("float64")
    values = values / 257 if sixteen_bit else values * 255
    return np.rint(values).astype("uint8")


def _too_large(what: str, path: Path) -> SkipRow:
    return SkipRow(
        f"{what} too large: {path} has more than {2 * Image.MAX_IMAGE_PIXELS} pixels, which "
        "Pillow refuses as a possible decompression bomb; downscale it or remove the row"
    )


def _image_pixels(
    image: Image.Image, path: Path, grey: bool, size: tuple[int, int] | None
) -> np.ndarray:
    """uint8 (h, w, 3), grey repeated over the channels, alpha dropped; with ``grey``
    uint8 (h, w), colour as Pillow's luma ("L": 0.299 R + 0.587 G + 0.114 B).

    An image much larger than the model's input ``size`` (height, width; see
    ``REDUCING_GAP``) comes at ``size``: a JPEG decoded at a reduced scale, any format
    reduced right after decoding. The decoded pixels count against ``DECODING``.
    """
    mode = "L" if grey else "RGB"
    shrink = _much_larger(image.size, size)
    box = None
    if shrink:
        rows, cols = size
        drafted = image.draft(None, (cols * REDUCING_GAP, rows * REDUCING_GAP))  # JPEG only
        box = drafted[1] if drafted is not None else None
    try:
        with DECODING.hold(image.width * image.height):
            if image.mode in WIDE_MODES:
                pixels = _grey_to_8bit(image, path, size if shrink else None)
                return pixels if grey else np.repeat(pixels[..., None], 3, axis=-1)
            if shrink:
                # A palette index cannot be averaged, and alpha is dropped, not
                # premultiplied as resize would: those convert first.
                converted = image if image.mode in ("L", "RGB") else image.convert(mode)
                image = _shrunk(converted, size, box)
            return np.asarray(image.convert(mode))
    except (OSError, ValueError) as error:
        raise SkipRow(f"corrupt or unreadable image {path}: {error}") from None


def _mask_pixels(image: Image.Image, path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """bool (h, w): every pixel > 0 is object. A mask much larger than the model's input
    ``size`` comes at ``size``, by the nearest neighbour as ``Preprocessor.mask`` resizes
    (it picks pixels, so the same ones are object)."""
    try:
        with DECODING.hold(image.width * image.height):
            if _much_larger(image.size, size):
                rows, cols = size
                image = image.resize((cols, rows), Image.NEAREST)
            if image.mode in WIDE_MODES:  # convert("L") would round 0.4 to 0
                return np.asarray(image) > 0
            if image.mode in ("1", "L", "LA"):
                return np.asarray(image.convert("L")) > 0
            # Colour (class-id or palette) masks: any channel, so that a dark colour such
            # as (0, 0, 1) is object too (its grey level rounds to 0).
            return np.asarray(image.convert("RGB")).any(axis=-1)
    except (OSError, ValueError) as error:
        raise SkipRow(f"corrupt or unreadable mask {path}: {error}") from None


def _read_image(path: Path, grey: bool = False, size: tuple[int, int] | None = None) -> np.ndarray:
    """One image file's pixels (``_image_pixels``)."""
    with _opened(path, "image") as image:
        return _image_pixels(image, path, grey, size)


def _read_mask(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """One mask file's object pixels (``_mask_pixels``)."""
    with _opened(path, "mask") as image:
        return _mask_pixels(image, path, size)


def _decode_rle(value: str) -> np.ndarray:
    from pycocotools import mask as coco_mask

    rle = json.loads(value)
    rle["counts"] = rle["counts"].encode() if isinstance(rle["counts"], str) else rle["counts"]
    return coco_mask.decode(rle).astype(bool)


@dataclass
class LoadedRow:
    image: np.ndarray
    regions: np.ndarray


def load_row(
    row: dict, entries: Entries, preprocessor: Preprocessor, regions: Sequence[RegionSection]
) -> LoadedRow:
    """Decode, check and preprocess one entry; raises ``SkipRow`` with the reason."""
    if not _present(row.get("path")):
        raise SkipRow(
            "the manifest row has no path; fill in the image file (relative to the "
            "manifest's folder) or remove the row"
        )
    # Pixels of a large image (and of its mask) come at the model's input size; its
    # full size places the mask check, the box and the face boxes.
    image_path = _inside(entries.root, row["path"], confine=entries.confine)
    with _opened(image_path, "image") as image:
        height, width = image.height, image.width
        pixels = _image_pixels(image, image_path, preprocessor.channels == 1, preprocessor.size)
    mask = None
    if _present(row.get("mask_path")):
        mask_path = _inside(
            entries.mask_base, row["mask_path"], "mask_path", confine=entries.confine
        )
        with _opened(mask_path, "mask") as image:
            _check_mask_size((image.height, image.width), (height, width))
            mask = _mask_pixels(image, mask_path, preprocessor.size)
    elif _present(row.get("mask_rle")):
        try:
            mask = _decode_rle(row["mask_rle"])
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise SkipRow(
                f"mask_rle is not a COCO RLE JSON object with size and counts: {error}"
            ) from None
        _check_mask_size(mask.shape, (height, width))
    sources = {region.source for region in regions}
    box = None  # checked only when a region uses it: an unused bad box skips nothing
    if "box" in sources and all(_present(row.get(c)) for c in BOX_COLUMNS):
        box = preprocessor.box(_box_values(row, BOX_COLUMNS, "box"), (height, width))
    faces = {}
    face_box, drawn_from = None, ""
    if "face" in sources and all(_present(row.get(c)) for c in FACE_COLUMNS):
        face_box = _box_values(row, FACE_COLUMNS, "face box")
    elif "face" in sources and all(_present(row.get(c)) for c in LANDMARK_COLUMNS):
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


def _present(value) -> bool:
    """A filled-in cell: not None, NaN, pandas' NA or blank text."""
    if isinstance(value, str):
        return value.strip() != ""
    return value is not None and not (pd.api.types.is_scalar(value) and pd.isna(value))


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
