"""The pixels the model saw in training: ``preprocess.resize: keras`` gives exactly what
keras.utils.image_dataset_from_directory gives for the same files (plain, cropped or
padded to the aspect ratio), masks and boxes follow the same crop or padding, and
``resize: pillow`` stays Pillow's resize."""

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from audit.config import ConfigError, build_config
from audit.config.sections import PreprocessSection, RegionSection
from audit.data import decode
from audit.data.loader import load_entry
from audit.data.manifest import Entries, read_folders
from audit.data.preprocess import Preprocessor

ASPECT = {
    "plain": {},
    "crop": {"crop_to_aspect_ratio": True},
    "pad": {"pad_to_aspect_ratio": True},
}


def _smooth(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 (height, width, 3): a smooth colour field with some noise (JPEG-like)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
    noise = rng.integers(-20, 21, size=field.shape)
    return np.clip(field.astype(int) + noise, 0, 255).astype("uint8")


def _class_folders(root) -> None:
    """Two class folders of PNG and JPEG files of odd sizes and modes: wide, tall, tiny,
    square, and one much larger than the input (which Pillow's resize shrinks while
    decoding and Keras' does not)."""
    files = {
        "a/wide.png": ("RGB", (37, 91)),
        "a/tall.jpg": ("RGB", (120, 53)),
        "a/grey.png": ("L", (64, 64)),
        "a/strip.png": ("RGBA", (9, 200)),
        "b/thin.jpg": ("RGB", (301, 25)),
        "b/large.jpg": ("RGB", (250, 333)),
        "b/palette.png": ("P", (41, 29)),
        "b/levels16.png": ("I;16", (33, 45)),
    }
    for seed, (name, (mode, shape)) in enumerate(files.items()):
        pixels = _smooth(*shape, seed)
        if mode == "RGBA":
            image = Image.fromarray(np.dstack([pixels, pixels[..., :1]]))
        elif mode == "I;16":
            image = Image.fromarray(pixels[..., 0].astype("uint16") * 257 + seed)
        else:
            image = Image.fromarray(pixels).convert(mode)
        (root / name).parent.mkdir(exist_ok=True)
        image.save(root / name, quality=90)  # PNG ignores the quality


def _keras_pixels(root, size, aspect, grey=False) -> dict[str, np.ndarray]:
    """image_dataset_from_directory's float32 images, by file path."""
    dataset = keras.utils.image_dataset_from_directory(
        root,
        image_size=size,
        batch_size=None,
        shuffle=False,
        color_mode="grayscale" if grey else "rgb",
        interpolation="bilinear",
        verbose=False,
        **ASPECT[aspect],
    )
    return {
        path: image.numpy() for path, (image, _) in zip(dataset.file_paths, dataset, strict=True)
    }


def _loaded_images(root, preprocessor) -> dict[str, np.ndarray]:
    """The loader's images (scale 1: the 0..255 pixels), by file path."""
    entries = read_folders(root)
    images = {}
    for position, path in enumerate(entries.table["path"]):
        reason, loaded = load_entry(entries, position, {"a": 0, "b": 1}, preprocessor, [])
        assert reason is None, reason
        images[str(root / path)] = loaded[1].image
    return images


@pytest.mark.parametrize("aspect", ["plain", "crop", "pad"])
@pytest.mark.parametrize("size", [(32, 48), (17, 23)])
def test_keras_resize_gives_image_dataset_from_directorys_pixels(tmp_path, aspect, size):
    _class_folders(tmp_path)
    settings = PreprocessSection(scale=1.0, **ASPECT[aspect])
    assert settings.resize == "keras"  # the default
    expected = _keras_pixels(tmp_path, size, aspect)
    loaded = _loaded_images(tmp_path, Preprocessor(size, settings))
    assert sorted(loaded) == sorted(expected) and len(loaded) == 8
    for path, image in loaded.items():
        assert image.dtype == np.float32 and image.shape == (*size, 3)
        np.testing.assert_array_equal(image, expected[path], err_msg=path)


@pytest.mark.parametrize("aspect", ["plain", "crop", "pad"])
def test_keras_resize_gives_the_grayscale_pixels_too(tmp_path, aspect):
    """color_mode="grayscale" for a grey model: TensorFlow's grey conversion and 16-bit
    scaling, which differ from Pillow's by a level."""
    _class_folders(tmp_path)
    settings = PreprocessSection(scale=1.0, **ASPECT[aspect])
    expected = _keras_pixels(tmp_path, (32, 48), aspect, grey=True)
    loaded = _loaded_images(tmp_path, Preprocessor((32, 48), settings, channels=1))
    for path, image in loaded.items():
        assert image.shape == (32, 48, 1)
        np.testing.assert_array_equal(image, expected[path], err_msg=path)


def test_the_numpy_bilinear_is_tensorflows_to_the_bit():
    rng = np.random.default_rng(0)
    for case in range(60):
        height, width = (int(v) for v in rng.integers(1, 300, 2))
        size = tuple(int(v) for v in rng.integers(1, 200, 2))
        channels = (1, 3, 4)[case % 3]
        pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
        expected = tf.image.resize(pixels, size).numpy()
        if channels == 1:  # Pillow's grey pixels come without a channel axis
            pixels, expected = pixels[..., 0], expected[..., 0]
        resized = Preprocessor(size, PreprocessSection()).resize(pixels)
        np.testing.assert_array_equal(resized, expected)


def test_keras_resize_decodes_a_large_image_whole_and_unshrunk(tmp_path, monkeypatch):
    """No DCT scaling or reduce() (they would change the pixels the bilinear reads); the
    image is decoded whole under the decode budget."""
    held = []
    hold = decode.DECODING.hold
    monkeypatch.setattr(decode.DECODING, "hold", lambda pixels: held.append(pixels) or hold(pixels))
    Image.fromarray(_smooth(803, 1001, 3)).save(tmp_path / "big.jpg", quality=90)
    keras_mode = Preprocessor((40, 50), PreprocessSection())
    pixels = decode._read_image(tmp_path / "big.jpg", preprocessor=keras_mode)
    assert held == [803 * 1001]
    data = tf.io.read_file(str(tmp_path / "big.jpg"))
    expected = tf.image.resize(tf.image.decode_image(data, channels=3), (40, 50)).numpy()
    np.testing.assert_array_equal(pixels, expected)
    pillow_mode = Preprocessor((40, 50), PreprocessSection(resize="pillow"))
    decode._read_image(tmp_path / "big.jpg", preprocessor=pillow_mode)
    assert held[-1] < 803 * 1001 / 4  # Pillow's resize still decodes it at a reduced scale


# ------------------------------------------------------------ masks and boxes


REGIONS = [
    RegionSection(name="object", source="mask"),
    RegionSection(name="box", source="box", role="spurious"),
    RegionSection(name="background", source="background", role="spurious"),
]


def _load_framed(tmp_path, scale: int, resize: str, aspect: str, expected) -> np.ndarray:
    """Load an image 60k x 120k (k = ``scale``) into a 30 x 30 input, cropped or padded:
    bright in columns 30k..60k, dark elsewhere, with that part as its mask and its box.
    Asserts that the object and box regions are ``expected`` and the background the
    rest; returns the image."""
    height, width = 60 * scale, 120 * scale
    inside = np.zeros((height, width), bool)
    inside[:, 30 * scale : 60 * scale] = True
    pixels = np.where(inside[..., None], 250, 20).astype("uint8").repeat(3, axis=-1)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    Image.fromarray(inside.astype("uint8") * 255).save(tmp_path / "mask.png")
    box = {"x_min": 30 * scale, "y_min": 0, "x_max": 60 * scale, "y_max": height}
    table = pd.DataFrame([{"path": "image.png", "label": "a", "mask_path": "mask.png", **box}])
    settings = PreprocessSection(scale=1.0, resize=resize, **ASPECT[aspect])
    preprocessor = Preprocessor((30, 30), settings)
    entries = Entries(table, tmp_path, "t")
    reason, (_, loaded) = load_entry(entries, 0, {"a": 0}, preprocessor, REGIONS)
    assert reason is None
    object_, box_region, background = loaded.regions
    np.testing.assert_array_equal(object_, expected)
    np.testing.assert_array_equal(box_region, expected)
    np.testing.assert_array_equal(background, ~expected)
    return loaded.image


@pytest.mark.parametrize("resize", ["keras", "pillow"])
@pytest.mark.parametrize("scale", [1, 4])  # 4: the mask (and Pillow's image) shrunk in decoding
def test_masks_and_boxes_follow_the_crop(tmp_path, resize, scale):
    """Cropped to the square input, the kept part is columns 30k..90k: the object is its
    left half, the first 15 of the input's 30 columns (nearest neighbour)."""
    expected = np.zeros((30, 30), bool)
    expected[:, :15] = True
    image = _load_framed(tmp_path, scale, resize, "crop", expected)
    # The image is cropped the same way: bright on the object, dark beside it. Keras'
    # bilinear reads the two nearest pixels, here on the same side of the object's edges;
    # Pillow's antialiasing filter blends a few pixels at the edges, and at the window's
    # edge it reads the pixels just outside (Pillow's resize with a box).
    if resize == "keras":
        np.testing.assert_array_equal(image[..., 0], np.where(expected, 250, 20))
    assert image[:, 1:12].min() > 240 and image[:, 18:].max() < 30


@pytest.mark.parametrize("resize", ["keras", "pillow"])
@pytest.mark.parametrize("scale", [1, 4])
def test_masks_and_boxes_follow_the_padding_which_is_background(tmp_path, resize, scale):
    """Padded to the square input, the image is fitted to 15 x 30 pixels at rows 7..21
    (tf.image.resize_with_pad's placement); the object is columns 7..14 of those rows,
    and the zero padding above and below belongs to the background."""
    expected = np.zeros((30, 30), bool)
    expected[7:22, 7:15] = True  # columns 30k..60k of 120k: 7.5..15 of 30
    image = _load_framed(tmp_path, scale, resize, "pad", expected)
    padding = np.ones(30, bool)
    padding[7:22] = False
    assert (image[padding] == 0).all()  # zeros, as Keras pads
    assert image[~padding].min() > 0
    assert image[expected].mean() > 200 and image[7:22, 17:].max() < 30


@pytest.mark.parametrize("aspect", ["crop", "pad"])
def test_boxes_and_large_masks_are_the_pixels_of_the_full_size_mask(aspect):
    """A box drawn at the input size, and a mask shrunk while decoded, are the very
    pixels that the full-size mask gives, cropped or padded and resized."""
    from audit.data.regions import _box_mask

    rng = np.random.default_rng(1)
    for _ in range(150):
        height, width = (int(v) for v in rng.integers(1, 600, 2))
        size = tuple(int(v) for v in rng.integers(1, 100, 2))
        preprocessor = Preprocessor(size, PreprocessSection(**ASPECT[aspect]))
        x_min, x_max = sorted(rng.uniform(-20, width + 20, 2))
        y_min, y_max = sorted(rng.uniform(-20, height + 20, 2))
        box = (x_min, y_min, x_max, y_max)
        drawn = preprocessor.mask(_box_mask(box, (height, width)))
        np.testing.assert_array_equal(preprocessor.box(box, (height, width)), drawn)
        mask = rng.random((height, width)) > 0.5
        image = Image.fromarray(mask.astype("uint8") * 255)
        decoded = decode._mask_pixels(image, "mask.png", preprocessor)
        np.testing.assert_array_equal(decoded, preprocessor.mask(mask))


# ------------------------------------------------------------ Pillow and the config


def test_pillow_resize_is_pillows_bilinear_and_decoder(tmp_path):
    pixels = _smooth(37, 91, 0)
    Image.fromarray(pixels).save(tmp_path / "image.jpg", quality=90)
    pillow = Preprocessor((32, 48), PreprocessSection(scale=1.0, resize="pillow"))
    decoded = np.asarray(Image.open(tmp_path / "image.jpg").convert("RGB"))
    expected = np.asarray(Image.fromarray(decoded).resize((48, 32), Image.BILINEAR))
    loaded = pillow.image(decode._read_image(tmp_path / "image.jpg", preprocessor=pillow))
    np.testing.assert_array_equal(loaded, expected.astype("float32"))
    # Keras' pixels are others: no antialiasing, and TensorFlow's JPEG decoder.
    keras_mode = Preprocessor((32, 48), PreprocessSection(scale=1.0))
    keras_pixels = keras_mode.image(
        decode._read_image(tmp_path / "image.jpg", preprocessor=keras_mode)
    )
    assert np.abs(keras_pixels - loaded).max() > 5


def test_both_aspect_ratio_options_at_once_are_a_config_error():
    data = {"model": {"path": "m.keras"}, "dataset": {"manifest": "d.csv"}}
    both = {"crop_to_aspect_ratio": True, "pad_to_aspect_ratio": True}
    with pytest.raises(ConfigError, match=r"preprocess: crop_to_aspect_ratio and pad_to_aspect_ra"):
        build_config({**data, "preprocess": both})
    with pytest.raises(ConfigError, match=r"preprocess\.resize"):
        build_config({**data, "preprocess": {"resize": "opencv"}})
    assert build_config({**data, "preprocess": {"resize": "pillow"}}).preprocess.resize == "pillow"
