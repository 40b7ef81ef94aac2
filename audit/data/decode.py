"""Decode image and mask files: regular files only, wide greyscale as 8-bit, very large
images shrunk while decoded, and the decoded pixels in flight bounded. A file that
cannot be read is a ``SkipRow`` with its reason; nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


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
