"""Inputs that must not crash, hang or blow up the loader: large images (decoded at a
reduced size, a bounded number of pixels at once), paths that are no regular files
(FIFOs, folders) and CSV manifests with trailing commas or extra fields."""

import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from audit.config import ConfigError
from audit.config.sections import PreprocessSection, RegionSection
from audit.data import decode, manifest
from audit.data.decode import PixelBudget
from audit.data.loader import load_batches, load_entry
from audit.data.manifest import Entries
from audit.data.preprocess import Preprocessor

OBJECT_REGIONS = [
    RegionSection(name="object", source="mask"),
    RegionSection(name="background", source="background", role="spurious"),
]


def _scene(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth colour field with a bright rectangle, and the rectangle as a mask."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 160, size=(9, 11, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR)).copy()
    mask = np.zeros((height, width), bool)
    mask[height // 4 : height // 2 + 7, width // 3 : width - width // 5] = True
    pixels[mask] = 250
    return pixels, mask


def _load_all(table: pd.DataFrame, root, size=(48, 48), regions=OBJECT_REGIONS, resize="keras"):
    """load_entry for every row: (skip reason or None, (label, loaded row) or None) each."""
    entries = Entries(table, root, "test")
    preprocessor = Preprocessor(size, PreprocessSection(scale=1.0, resize=resize))
    return [
        load_entry(entries, position, {"a": 0}, preprocessor, regions)
        for position in range(len(table))
    ]


# ------------------------------------------------------------------ large images


def _pillow(size: tuple[int, int]) -> Preprocessor:
    """Pillow's resize, the one that shrinks large images while they are decoded."""
    return Preprocessor(size, PreprocessSection(resize="pillow"))


@pytest.fixture
def held_pixels(monkeypatch):
    """The pixel counts the decoders hold the budget for: the size they decode at."""
    held = []
    hold = decode.DECODING.hold

    def recording(pixels):
        held.append(pixels)
        return hold(pixels)

    monkeypatch.setattr(decode.DECODING, "hold", recording)
    return held


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_and_stays_close(tmp_path, held_pixels):
    pixels, _ = _scene(1203, 1601)  # odd sides: the reduced scale leaves a partial edge
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=95)
    full = Image.open(tmp_path / "big.jpg").convert("RGB").resize((48, 48), Image.BILINEAR)
    shrunk = decode._read_image(tmp_path / "big.jpg", preprocessor=_pillow((48, 48)))
    # DCT scaling by 8 (the most JPEG offers; 1601 / 8 still >= 2 x 48): 201 x 151 pixels.
    assert held_pixels == [201 * 151]
    assert shrunk.shape == (48, 48, 3)
    difference = np.abs(shrunk.astype(float) - np.asarray(full))
    assert difference.mean() < 0.75 and difference.max() <= 16


def test_a_large_png_is_reduced_right_after_decoding(tmp_path, monkeypatch):
    pixels, _ = _scene(997, 1203)
    Image.fromarray(pixels).save(tmp_path / "big.png")
    Image.fromarray(pixels).convert("P").save(tmp_path / "palette.png")  # reduced as RGB
    reduced = []
    reduce = Image.Image.reduce

    def recording(image, factor, box=None):
        reduced.append((image.mode, image.size, factor))
        return reduce(image, factor, box)

    monkeypatch.setattr(Image.Image, "reduce", recording)
    shrunk = decode._read_image(tmp_path / "big.png", preprocessor=_pillow((48, 48)))
    # Per side, the largest factor that leaves at least twice the input: 1203 / 96 -> 12,
    # 997 / 96 -> 10.
    assert reduced == [("RGB", (1203, 997), (12, 10))]
    full = np.asarray(Image.fromarray(pixels).resize((48, 48), Image.BILINEAR))
    difference = np.abs(shrunk.astype(float) - full)
    assert difference.mean() < 0.75 and difference.max() <= 16
    palette = decode._read_image(tmp_path / "palette.png", preprocessor=_pillow((48, 48)))
    assert reduced[-1][0] == "RGB" and palette.shape == (48, 48, 3)
    grey = decode._read_image(tmp_path / "big.png", grey=True, preprocessor=_pillow((48, 48)))
    expected = np.asarray(Image.fromarray(pixels).convert("L").resize((48, 48), Image.BILINEAR))
    assert grey.shape == (48, 48) and np.abs(grey.astype(float) - expected).mean() < 1.0


def test_a_large_sixteen_bit_image_is_reduced_and_keeps_its_levels(tmp_path):
    levels = np.full((800, 600), 100 * 257, "uint16")
    levels[:, 300:] = 200 * 257
    Image.fromarray(levels).save(tmp_path / "grey16.png")
    shrunk = decode._read_image(tmp_path / "grey16.png", preprocessor=_pillow((40, 40)))
    assert shrunk.shape == (40, 40, 3)
    assert (shrunk[:, :19] == 100).all() and (shrunk[:, 21:] == 200).all()


def test_images_under_four_times_the_input_are_decoded_as_before(tmp_path, held_pixels):
    pixels, _ = _scene(191, 300)  # 191 // 48 == 3: not shrunk
    for name in ("ordinary.png", "ordinary.jpg"):
        Image.fromarray(pixels).save(tmp_path / name)
        before = Image.open(tmp_path / name).convert("RGB").resize((48, 48), Image.BILINEAR)
        decoded = decode._read_image(tmp_path / name, preprocessor=_pillow((48, 48)))
        np.testing.assert_array_equal(decoded, np.asarray(before))
    assert held_pixels == [191 * 300, 191 * 300]  # decoded at full size, JPEG included
    Image.fromarray(_scene(192, 300)[0]).save(tmp_path / "four_times.png")
    four_times = decode._read_image(tmp_path / "four_times.png", preprocessor=_pillow((48, 48)))
    assert four_times.shape == (48, 48, 3)


@pytest.mark.parametrize("resize", ["pillow", "keras"])  # keras: the image is not shrunk
def test_a_large_image_keeps_its_mask_and_box_aligned(tmp_path, resize):
    """The mask and the boxes of a shrunk image are the very pixels they were before
    (nearest neighbour from full size), and they lie on the image's bright object."""
    height, width = 803, 1001
    pixels, mask = _scene(height, width)
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(mask.astype("uint8") * 255).save(tmp_path / "mask.png")
    Image.fromarray(np.where(mask[..., None], [0, 0, 1], [0, 0, 0]).astype("uint8")).save(
        tmp_path / "class_ids.png"
    )
    rows, cols = np.nonzero(mask)
    box = {"x_min": cols.min(), "y_min": rows.min(), "x_max": cols.max() + 1}
    box["y_max"] = rows.max() + 1
    table = pd.DataFrame(
        {"path": ["big.jpg"] * 2, "label": ["a"] * 2, "mask_path": ["mask.png", "class_ids.png"]}
        | {key: [value] * 2 for key, value in box.items()}
    )
    regions = [
        RegionSection(name="object", source="mask"),
        RegionSection(name="box", source="box", role="spurious"),
        RegionSection(name="background", source="background", role="spurious"),
    ]
    preprocessor = Preprocessor((40, 50), PreprocessSection(scale=1.0))
    expected = preprocessor.mask(mask)  # what the full-size path gives
    for reason, (_, loaded) in _load_all(table, tmp_path, (40, 50), regions, resize):
        assert reason is None and loaded.image.shape == (40, 50, 3)
        object_, box_region, background = loaded.regions
        np.testing.assert_array_equal(object_, expected)
        np.testing.assert_array_equal(box_region, expected)  # the mask is its own box
        np.testing.assert_array_equal(background, ~expected)
        inside, outside = loaded.image[object_].mean(), loaded.image[background].mean()
        assert inside > 230 and outside < 170
    # A mask of another size is still refused, before it is decoded.
    Image.new("L", (1000, 803), 255).save(tmp_path / "mask.png")
    ((reason, _), _) = _load_all(table, tmp_path, (40, 50), regions)
    assert reason.startswith("mask is 1000x803 but the image is 1001x803")


def test_a_box_is_drawn_at_the_input_size_as_if_drawn_at_full_size_and_resized():
    from audit.data.regions import _box_mask

    rng = np.random.default_rng(0)
    for _ in range(300):
        height, width = (int(v) for v in rng.integers(1, 700, 2))
        size = tuple(int(v) for v in rng.integers(1, 120, 2))
        x_min, x_max = sorted(rng.uniform(-20, width + 20, 2))
        y_min, y_max = sorted(rng.uniform(-20, height + 20, 2))
        box = (x_min, y_min, x_max, y_max)
        preprocessor = Preprocessor(size, PreprocessSection())
        drawn = preprocessor.mask(_box_mask(box, (height, width)))
        np.testing.assert_array_equal(preprocessor.box(box, (height, width)), drawn)


class _Watched(PixelBudget):
    """A budget that counts the threads inside it at once."""

    def __init__(self, pixels: int) -> None:
        super().__init__(pixels)
        self.inside = self.most = 0
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, pixels: int):
        with super().hold(pixels):
            with self.lock:
                self.inside += 1
                self.most = max(self.most, self.inside)
            time.sleep(0.01)  # long enough for the other threads to try
            try:
                yield
            finally:
                with self.lock:
                    self.inside -= 1


@pytest.mark.parametrize(("budget", "alone"), [(1000, True), (10**6, False)])
def test_the_loader_bounds_the_pixels_it_decodes_at_once(tmp_path, monkeypatch, budget, alone):
    for index in range(8):
        Image.new("RGB", (40, 40), (index * 20, 0, 0)).save(tmp_path / f"{index}.png")
    table = pd.DataFrame({"path": [f"{i}.png" for i in range(8)], "label": ["a"] * 8})
    watched = _Watched(budget)
    monkeypatch.setattr(decode, "DECODING", watched)
    with ThreadPoolExecutor(4) as pool:
        batches = list(
            load_batches(
                Entries(table, tmp_path, "test"),
                range(8),
                class_index={"a": 0},
                preprocessor=Preprocessor((8, 8), PreprocessSection(scale=1.0)),
                regions=[],
                batch_size=4,
                pool=pool,
            )
        )
    assert sum(len(batch.rows) for batch in batches) == 8  # a larger image still goes through
    assert (watched.most == 1) is alone  # 1600 pixels each: one at a time within 1000


def test_a_pixel_budget_makes_threads_wait_their_turn():
    budget = PixelBudget(100)
    first_in, release = threading.Event(), threading.Event()
    entered = []

    def first():
        with budget.hold(60):
            first_in.set()
            release.wait(10)

    def second():
        with budget.hold(60):
            entered.append("second")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert first_in.wait(10)
    threads[1].start()
    threads[1].join(0.2)
    assert entered == []  # 60 + 60 > 100: waits
    release.set()
    threads[1].join(10)
    threads[0].join(10)
    assert entered == ["second"]
    with budget.hold(500):  # larger than the budget: goes through once it is all free
        pass


# ------------------------------------------------------------ not regular files


def _in_a_thread(seconds: float, function, fifos=()):
    """``function()`` in a thread; fails the test if it is still running after ``seconds``
    (a reader blocked on a FIFO is released by opening it for writing)."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=function()), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"reading the rows still ran after {seconds} s (a FIFO opened?)")
    return result["value"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_or_folder_as_image_or_mask_is_a_skipped_row(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "folder.png").mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "ok.png")
    Image.new("L", (8, 8), 255).save(tmp_path / "mask.png")
    os.symlink(tmp_path / "pipe.png", tmp_path / "link.png")
    table = pd.DataFrame(
        {
            "path": ["pipe.png", "ok.png", "folder.png", "link.png", "ok.png"],
            "label": ["a"] * 5,
            "mask_path": ["mask.png", "pipe.png", "mask.png", "mask.png", "mask.png"],
        }
    )
    results = _in_a_thread(20, lambda: _load_all(table, tmp_path), [tmp_path / "pipe.png"])
    reasons = [reason for reason, _ in results]
    assert reasons[0] == (
        f"image {tmp_path / 'pipe.png'} is not a regular file (a FIFO); only files are "
        "read: point the row at the image file or remove the row"
    )
    assert reasons[1].startswith(f"mask {tmp_path / 'pipe.png'} is not a regular file (a FIFO)")
    assert "is not a regular file (a folder)" in reasons[2]
    assert "is not a regular file (a FIFO)" in reasons[3]  # through a symlink too
    assert reasons[4] is None  # the audit goes on


# ------------------------------------------------------------------ CSV manifests


def _manifest(tmp_path, text: str, name: str = "m.csv"):
    (tmp_path / name).write_text(text)
    return manifest.read_manifest(tmp_path / name).table


def test_a_trailing_comma_reads_the_same_rows_as_without(tmp_path):
    plain = _manifest(tmp_path, "path,label,site\na.png,cat,A\nb.png,dog,\n", "plain.csv")
    assert plain["path"].tolist() == ["a.png", "b.png"]
    for text in (
        "path,label,site\na.png,cat,A,\nb.png,dog,,\n",  # every data line
        "path,label,site,\na.png,cat,A,\nb.png,dog,,\n",  # the header line too
        "path,label,site\na.png,cat,A,,\nb.png,dog,,,\n",  # two of them
        "path,label,site\na.png,cat,A\nb.png,dog,,\n",  # only some lines
    ):
        pd.testing.assert_frame_equal(_manifest(tmp_path, text), plain)


def test_an_extra_value_past_the_header_names_the_file_and_line(tmp_path):
    for text, line in (
        ("path,label\na.png,cat,extra\n", 2),
        ("path,label\na.png,cat,\nb.png,dog,extra\n", 3),
        ("path,label\na.png,cat\n\nb.png,dog,,x\n", 4),
    ):
        with pytest.raises(ConfigError) as raised:
            _manifest(tmp_path, text)
        message = str(raised.value)
        assert message.startswith(f"manifest {tmp_path / 'm.csv'}: line {line} has ")
        assert "but the header has 2 (path, label)" in message
        assert "remove them, quote a value that contains a comma" in message
