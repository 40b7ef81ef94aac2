"""Decode image and mask files: regular files only, wide greyscale as 8-bit, as Keras'
image_dataset_from_directory decodes them or as Pillow does, very large images shrunk
while decoded (Pillow's resize), resized to the model's input while the decoded pixels
are held, and those pixels in flight bounded. A file that cannot be read is a
``SkipRow`` with its reason; nothing is dropped silently.
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
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    from audit.data.preprocess import Frame, Preprocessor


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
# With ``preprocess.resize: pillow``, an image whose kept part (all of it unless cropped
# to the aspect ratio) is at least twice this many times the size it is resized to, on
# both sides, is shrunk while it is decoded: JPEG's DCT scaling (Pillow's draft), then
# reduce() by an integer factor that leaves at least this many times that size for the
# bilinear resize, which keeps the result close to resizing from full size (Pillow's
# reducing_gap). Smaller images are decoded and resized exactly as before. With
# ``keras`` no image is shrunk: its bilinear resize reads the two nearest pixels of
# each output pixel, and any shrinking first (an average) would change what they are;
# a large image is decoded whole under DECODING and only those pixels leave it.
REDUCING_GAP = 2
# The formats image_dataset_from_directory reads (its ALLOWLIST_FORMATS: bmp, gif,
# jpeg, png), by Pillow's names (MPO: a camera JPEG with a preview image).
KERAS_FORMATS = ("BMP", "GIF", "JPEG", "MPO", "PNG")


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


def _much_larger(frame: Frame) -> bool:
    """Whether an image placed by ``frame`` is shrunk while it is decoded (Pillow's
    resize; see ``REDUCING_GAP``)."""
    _, _, height, width = frame.window
    rows, cols = frame.inner
    return min(width // cols, height // rows) >= 2 * REDUCING_GAP


def _drafted_box(image: Image.Image, frame: Frame) -> tuple[float, float, float, float]:
    """Decode a JPEG at the smallest DCT scale that leaves the frame's window at least
    ``REDUCING_GAP`` times its resized size (Pillow's draft; other formats: nothing to
    do), and return the window in the pixels it will be decoded at."""
    _, _, height, width = frame.window
    rows, cols = frame.inner
    full_width = image.width
    # draft() keeps the whole image at least this large, so the window keeps its share.
    wanted = (
        -(-image.width * cols * REDUCING_GAP // width),
        -(-image.height * rows * REDUCING_GAP // height),
    )
    drafted = image.draft(None, wanted)  # JPEG only
    if drafted is None:
        return frame.box
    factor = drafted[1][2] / full_width  # 1/2, 1/4 or 1/8: exact
    return tuple(value * factor for value in frame.box)


def _shrunk(image: Image.Image, size: tuple[int, int], box) -> Image.Image:
    """Bilinear to ``size`` (height, width) as ``Preprocessor.resize`` resizes with
    ``pillow``, reduced first by an integer factor (``REDUCING_GAP``); ``box``: the part
    of ``image`` that is kept (a JPEG decoded at a reduced scale may have a partial
    edge)."""
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


def _grey_to_8bit(image: Image.Image, path: Path, frame: Frame | None = None) -> np.ndarray:
    """A wide greyscale image as uint8 (h, w): 16-bit values / 257 (65535 -> 255),
    32-bit integers as 16-bit values (0..65535), floats as 0..1; other ranges are
    refused rather than guessed. With ``frame``, its window shrunk to its ``inner`` size
    (``_shrunk``); the range is the whole image's."""
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
    if frame is not None:  # Pillow resizes 16-bit images only as 32-bit ones
        del values  # the full-size copy goes before the resize
        wide = image.convert("I") if image.mode.startswith("I;16") else image
        values = np.asarray(_shrunk(wide, frame.inner, frame.box))
    values = values.astype("float64")
    values = values / 257 if sixteen_bit else values * 255
    return np.rint(values).astype("uint8")


def _too_large(what: str, path: Path) -> SkipRow:
    return SkipRow(
        f"{what} too large: {path} has more than {2 * Image.MAX_IMAGE_PIXELS} pixels, which "
        "Pillow refuses as a possible decompression bomb; downscale it or remove the row"
    )


def _image_pixels(
    image: Image.Image, path: Path, grey: bool, preprocessor: Preprocessor | None = None
) -> np.ndarray:
    """uint8 (h, w, 3), grey repeated over the channels, alpha dropped; with ``grey``
    uint8 (h, w), colour as Pillow's luma ("L": 0.299 R + 0.587 G + 0.114 B).

    With ``preprocessor``: the pixels at its input size (``Preprocessor.resize``; float32
    with ``resize: keras``), resized while the decoded pixels count against
    ``DECODING``, so that no full-size copy outlives them. ``resize: keras`` decodes as
    image_dataset_from_directory does (``_keras_decoded``); ``pillow`` shrinks an image
    much larger than its resized size while it is decoded (see ``REDUCING_GAP``): a JPEG
    at a reduced scale, any format reduced right after decoding.
    """
    keras = preprocessor is not None and preprocessor.settings.resize == "keras"
    frame = None if preprocessor is None else preprocessor.frame((image.height, image.width))
    shrink = frame is not None and not keras and _much_larger(frame)
    box = _drafted_box(image, frame) if shrink else None
    try:
        with DECODING.hold(image.width * image.height):
            if shrink:
                return _shrunk_pixels(image, path, grey, frame, box)
            pixels = _keras_decoded(image, path, grey) if keras else None
            if pixels is None:
                pixels = _pillow_pixels(image, path, grey)
            return pixels if preprocessor is None else preprocessor.resize(pixels)
    except (OSError, ValueError) as error:
        raise SkipRow(f"corrupt or unreadable image {path}: {error}") from None


def _pillow_pixels(image: Image.Image, path: Path, grey: bool) -> np.ndarray:
    """The whole image, decoded by Pillow (``_image_pixels``)."""
    if image.mode in WIDE_MODES:
        pixels = _grey_to_8bit(image, path)
        return pixels if grey else np.repeat(pixels[..., None], 3, axis=-1)
    return np.asarray(image.convert("L" if grey else "RGB"))


def _shrunk_pixels(
    image: Image.Image, path: Path, grey: bool, frame: Frame, box: tuple
) -> np.ndarray:
    """The image shrunk while it is decoded and placed by ``frame`` (``_image_pixels``);
    ``box``: the frame's window in the pixels it is decoded at (``_drafted_box``)."""
    if image.mode in WIDE_MODES:
        pixels = frame.place(_grey_to_8bit(image, path, frame))
        return pixels if grey else np.repeat(pixels[..., None], 3, axis=-1)
    # A palette index cannot be averaged, and alpha is dropped, not premultiplied as
    # resize would: those convert first.
    mode = "L" if grey else "RGB"
    converted = image if image.mode in ("L", "RGB") else image.convert(mode)
    return frame.place(np.asarray(_shrunk(converted, frame.inner, box).convert(mode)))


def _keras_decoded(image: Image.Image, path: Path, grey: bool) -> np.ndarray | None:
    """The file's pixels as image_dataset_from_directory decodes them: TensorFlow's
    decode_image, uint8 (h, w, 3), or (h, w) for ``grey`` (its color_mode="grayscale").
    Pillow's differ: its JPEG decoder uses another DCT (pixels several levels apart),
    and its grey conversion and 16-bit scaling round differently (one level).

    None for a file that Keras' loader does not read (another format, or one TensorFlow
    refuses, such as a grey model's BMP): it is decoded by Pillow instead, as with
    ``resize: pillow``.
    """
    if image.format not in KERAS_FORMATS:
        return None
    tf = _tensorflow()
    contents = path.read_bytes()
    try:
        with tf.device("/CPU:0"):
            decoded = tf.io.decode_image(
                contents, channels=1 if grey else 3, expand_animations=False
            ).numpy()
    except tf.errors.OpError:
        return None
    if decoded.shape[:2] != (image.height, image.width):  # masks and boxes use the header's
        return None
    return decoded[..., 0] if grey else decoded


@functools.cache
def _tensorflow():
    """TensorFlow, for ``_keras_decoded``. On Keras' JAX and torch backends, the GPUs are
    hidden from it first: it decodes on the CPU, and would otherwise reserve the GPU
    memory that those backends need."""
    import keras
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        with contextlib.suppress(RuntimeError):  # TensorFlow already started: too late
            tf.config.set_visible_devices([], "GPU")
    return tf


def _mask_pixels(
    image: Image.Image, path: Path, preprocessor: Preprocessor | None = None
) -> np.ndarray:
    """bool (h, w): every pixel > 0 is object. With ``preprocessor``, at its input size as
    ``Preprocessor.mask`` gives it; a mask much larger than that (``_much_larger``) is
    resized by Pillow's nearest neighbour before it is converted (it picks pixels, so the
    same ones are object)."""
    frame = None if preprocessor is None else preprocessor.frame((image.height, image.width))
    shrink = frame is not None and _much_larger(frame)
    try:
        with DECODING.hold(image.width * image.height):
            if shrink:
                if frame.box != (0, 0, image.width, image.height):
                    # Cropped first: resize()'s own box picks other pixels at times.
                    image = image.crop(frame.box)
                rows, cols = frame.inner
                image = image.resize((cols, rows), Image.NEAREST)
            mask = _object_pixels(image)
            if preprocessor is None:
                return mask
            return frame.place(mask) if shrink else preprocessor.mask(mask)
    except (OSError, ValueError) as error:
        raise SkipRow(f"corrupt or unreadable mask {path}: {error}") from None


def _object_pixels(image: Image.Image) -> np.ndarray:
    """A mask image's object pixels (``_mask_pixels``)."""
    if image.mode in WIDE_MODES:  # convert("L") would round 0.4 to 0
        return np.asarray(image) > 0
    if image.mode in ("1", "L", "LA"):
        return np.asarray(image.convert("L")) > 0
    # Colour (class-id or palette) masks: any channel, so that a dark colour such as
    # (0, 0, 1) is object too (its grey level rounds to 0).
    return np.asarray(image.convert("RGB")).any(axis=-1)


def _read_image(
    path: Path, grey: bool = False, preprocessor: Preprocessor | None = None
) -> np.ndarray:
    """One image file's pixels (``_image_pixels``)."""
    with _opened(path, "image") as image:
        return _image_pixels(image, path, grey, preprocessor)


def _read_mask(path: Path, preprocessor: Preprocessor | None = None) -> np.ndarray:
    """One mask file's object pixels (``_mask_pixels``)."""
    with _opened(path, "mask") as image:
        return _mask_pixels(image, path, preprocessor)


def _decode_rle(value: str) -> np.ndarray:
    from pycocotools import mask as coco_mask

    rle = json.loads(value)
    rle["counts"] = rle["counts"].encode() if isinstance(rle["counts"], str) else rle["counts"]
    return coco_mask.decode(rle).astype(bool)
