"""The loader: sources, preprocessing, regions, class names."""

import os

import numpy as np
import pytest
from PIL import Image

from audit.config import ConfigError
from audit.config.sections import PreprocessSection, RegionSection
from audit.data.decode import SkipRow
from audit.data.loader import load_row
from audit.data.manifest import class_names_for, read_folders, read_manifest
from audit.data.preprocess import Preprocessor
from audit.data.regions import build_regions


def test_preprocessing_scale_mean_std_and_keras_preprocess():
    pixels = np.full((4, 6, 3), 255, "uint8")
    pixels[..., 1] = 0
    plain = Preprocessor((4, 6), PreprocessSection()).image(pixels)
    np.testing.assert_allclose(plain[0, 0], [1.0, 0.0, 1.0])
    normalised = Preprocessor(
        (4, 6), PreprocessSection(mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    ).image(pixels)
    np.testing.assert_allclose(normalised[0, 0], [2.0, -1.0, 0.5])
    mobilenet = Preprocessor((4, 6), PreprocessSection(keras_preprocess="mobilenet_v2"))
    np.testing.assert_allclose(mobilenet.image(pixels)[0, 0], [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="no module 'nonsense'"):
        PreprocessSection(keras_preprocess="nonsense")


def test_images_resize_bilinear_and_masks_nearest():
    preprocessor = Preprocessor((8, 8), PreprocessSection(scale=1.0))
    pixels = np.zeros((4, 4, 3), "uint8")
    pixels[:, 2:] = 200
    image = preprocessor.image(pixels)
    assert image.shape == (8, 8, 3)
    assert 0 < image[0, 3, 0] < 200  # bilinear blends at the edge
    mask = np.zeros((4, 4), bool)
    mask[:, 2:] = True
    resized = preprocessor.mask(mask)
    assert resized.dtype == bool and resized.shape == (8, 8)
    assert resized[:, 4:].all() and not resized[:, :4].any()  # nearest keeps it binary


def test_regions_background_border_dilation_and_boxes():
    mask = np.zeros((10, 10), bool)
    mask[4:6, 4:6] = True
    regions = [
        RegionSection(name="object", source="mask", dilate=1),
        RegionSection(name="box", source="mask", box_from_mask=True, role="spurious"),
        RegionSection(name="frame", source="border", width=2, role="spurious"),
        RegionSection(name="background", source="background", role="spurious"),
    ]
    stack = build_regions(regions, mask, None, (10, 10))
    assert stack.shape == (4, 10, 10)
    assert stack[0].sum() == 4 * 4 - 4  # 2x2 grown by one pixel (cross-shaped corners)
    assert stack[1].sum() == 4
    assert stack[2].sum() == 100 - 36
    # Background is the complement of the expected regions only (the dilated object).
    np.testing.assert_array_equal(stack[3], ~stack[0])
    with pytest.raises(SkipRow, match="box"):
        build_regions([RegionSection(name="b", source="box")], mask, None, (10, 10))


def test_class_names_from_integers_sorted_strings_or_config():
    import pandas as pd

    assert class_names_for(pd.Series(["2", "0", "1"]), 3, None) == ["0", "1", "2"]
    assert class_names_for(pd.Series(["10", "2"]), 11, None)[10] == "10"
    assert class_names_for(pd.Series(["dog", "cat"]), 2, None) == ["cat", "dog"]
    assert class_names_for(pd.Series(["x"]), 2, ["b", "a"]) == ["b", "a"]
    with pytest.raises(ConfigError, match="model.class_names"):
        class_names_for(pd.Series(["dog", "cat"]), 3, None)
    # Class folders number as Keras' image_dataset_from_directory does ("10" before
    # "2"), when there is one per output; a subset falls back to the labels' rule.
    folders = sorted(str(index) for index in range(11))
    assert class_names_for(pd.Series(folders), 11, None, folders)[2] == "10"
    with pytest.warns(UserWarning, match="sorted order"):
        assert class_names_for(pd.Series(["10", "2"]), 11, None, ["10", "2"])[2] == "2"


def test_csv_manifest_keeps_text_as_written(tmp_path):
    """Labels and slice values such as NA, None or 007 are text, not missing or numbers;
    only an empty cell is missing, and box columns are numbers."""
    (tmp_path / "m.csv").write_text(
        "path,label,site,region,x_min,y_min,x_max,y_max\n"
        "a.png,None,007,NA,1,2,3.5,4\n"
        "b.png,NA,7,EU,,,,\n"
    )
    table = read_manifest(tmp_path / "m.csv").table
    assert table["label"].tolist() == ["None", "NA"]
    assert table["site"].tolist() == ["007", "7"] and table["region"].tolist() == ["NA", "EU"]
    assert table["x_max"].iloc[0] == 3.5 and table["x_max"].isna().iloc[1]


def test_missing_label_names_the_csv_line_past_blank_and_multiline_rows(tmp_path):
    (tmp_path / "m.csv").write_text('path,label,note\n\na.png,c,"two\nlines"\n\nb.png,,x\n')
    with pytest.raises(ConfigError, match="row 1 .*line 6 of the CSV"):
        read_manifest(tmp_path / "m.csv")


def test_an_infinite_box_skips_its_row():
    from audit.data.loader import _box_values

    row = {"x_min": 2, "y_min": 2, "x_max": float("inf"), "y_max": 20}
    with pytest.raises(SkipRow, match="not four finite numbers"):
        _box_values(row, ["x_min", "y_min", "x_max", "y_max"], "box")


def test_class_folders_with_parallel_masks(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        (tmp_path / "masks" / label).mkdir(parents=True)
        for index in range(2):
            Image.new("RGB", (12, 10), (index * 100, 0, 0)).save(
                tmp_path / "images" / label / f"{index}.jpg"
            )
            Image.new("L", (12, 10), 255).save(tmp_path / "masks" / label / f"{index}.png")
    (tmp_path / "images" / "cat" / "notes.txt").write_text("not an image")
    # Images in sub-folders of a class folder count, as for Keras; masks mirror them.
    (tmp_path / "images" / "dog" / "batch2").mkdir()
    Image.new("RGB", (12, 10)).save(tmp_path / "images" / "dog" / "batch2" / "deep.jpg")
    (tmp_path / "images" / ".ipynb_checkpoints").mkdir()  # hidden: no class, as for Keras
    entries = read_folders(tmp_path / "images", tmp_path / "masks")
    assert entries.table["label"].tolist() == ["cat", "cat", "dog", "dog", "dog"]
    assert entries.table["path"].tolist()[0] == "cat/0.jpg"
    assert entries.table["path"].tolist()[4] == "dog/batch2/deep.jpg"
    assert entries.table["mask_path"].tolist()[4] == "dog/batch2/deep.png"
    assert entries.class_folders == ["cat", "dog"]
    loaded = load_row(
        entries.table.iloc[3].to_dict(),
        entries,
        Preprocessor((10, 12), PreprocessSection()),
        [RegionSection(name="object", source="mask")],
    )
    assert loaded.image.shape == (10, 12, 3) and loaded.regions[0].all()
    with pytest.raises(ConfigError, match="masks folder not found: .*maskz"):
        read_folders(tmp_path / "images", tmp_path / "maskz")  # a typo fails at once
    with pytest.raises(ConfigError, match="no images found"):
        read_folders(tmp_path / "masks" / "cat")


def test_colour_masks_count_every_non_black_pixel(tmp_path):
    from audit.data.decode import _read_mask

    pixels = np.zeros((2, 3, 3), "uint8")
    pixels[0, 0] = (0, 0, 1)  # a dark class-id colour: grey level 0
    pixels[1, 2] = (200, 0, 0)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    expected = np.array([[True, False, False], [False, False, True]])
    np.testing.assert_array_equal(_read_mask(tmp_path / "rgb.png"), expected)
    palette = Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(_read_mask(tmp_path / "palette.png"), expected)
    grey = Image.fromarray((expected * 7).astype("uint8"))
    grey.save(tmp_path / "grey.png")
    np.testing.assert_array_equal(_read_mask(tmp_path / "grey.png"), expected)


def test_manifest_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_manifest(tmp_path / "absent.csv")
    (tmp_path / "m.csv").write_text("file,class\na.png,1\n")
    with pytest.raises(ConfigError, match="m.csv lacks the column.*path, label.*'file', 'class'"):
        read_manifest(tmp_path / "m.csv")
    (tmp_path / "b.csv").write_text("path,label,x_min,y_min\na.png,1,0,0\n")
    with pytest.raises(ConfigError, match="x_max"):
        read_manifest(tmp_path / "b.csv")


def test_paths_that_leave_the_dataset_root_are_refused_symlinks_included(tmp_path):
    from audit.data.decode import SkipRow, _inside

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "images").mkdir(parents=True)
    outside.mkdir()
    (root / "images" / "a.png").write_bytes(b"x")
    (outside / "secret.png").write_bytes(b"x")
    (root / "linked_folder").symlink_to(outside, target_is_directory=True)
    (root / "images" / "linked_file.png").symlink_to(outside / "secret.png")
    (root / "images" / "inner_link.png").symlink_to(root / "images" / "a.png")
    assert _inside(root, "images/a.png") == (root / "images" / "a.png").resolve()
    assert _inside(root, "images/inner_link.png") == (root / "images" / "a.png").resolve()
    assert _inside(root, "images/../images/a.png") == (root / "images" / "a.png").resolve()
    for escaping in (
        "../outside/secret.png",
        str(outside / "secret.png"),
        "linked_folder/secret.png",
        "images/linked_file.png",
        "..",
    ):
        with pytest.raises(SkipRow, match="escapes the dataset root"):
            _inside(root, escaping)


def test_a_swapped_root_symlink_is_resolved_afresh_by_the_next_pass(tmp_path):
    from audit.data.decode import _inside, forget_resolved_paths

    for version in ("v1", "v2"):
        (tmp_path / version).mkdir()
        (tmp_path / version / "a.png").write_bytes(version.encode())
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "v1", target_is_directory=True)
    assert _inside(current, "a.png") == (tmp_path / "v1" / "a.png").resolve()
    current.unlink()
    current.symlink_to(tmp_path / "v2", target_is_directory=True)
    forget_resolved_paths()  # what run_audit and load_batches do first
    assert _inside(current, "a.png") == (tmp_path / "v2" / "a.png").resolve()


# ------------------------------------------------------------ bad input files


def _bomb_png(path, side=20000):
    """A PNG whose header claims side x side pixels (Pillow refuses it on open)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _load(table, root, regions=None):
    """load_entry for every row of a manifest table: (skip reason or None, loaded) each."""
    from audit.data.loader import load_entry
    from audit.data.manifest import Entries

    entries = Entries(table, root, "test", confine=True)
    regions = regions or [
        RegionSection(name="object", source="mask"),
        RegionSection(name="background", source="background", role="spurious"),
    ]
    preprocessor = Preprocessor((8, 8), PreprocessSection(scale=1.0))
    return [
        load_entry(entries, position, {"a": 0, "b": 1}, preprocessor, regions)
        for position in range(len(table))
    ]


def test_an_image_or_mask_too_large_to_open_is_a_skipped_row(tmp_path):
    import pandas as pd

    _bomb_png(tmp_path / "bomb.png")
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "ok.png")
    Image.new("L", (8, 8), 255).save(tmp_path / "mask.png")
    table = pd.DataFrame(
        {
            "path": ["bomb.png", "ok.png", "ok.png"],
            "label": ["a", "a", "b"],
            "mask_path": ["mask.png", "bomb.png", "mask.png"],
        }
    )
    (image_reason, _), (mask_reason, _), (fine, loaded) = _load(table, tmp_path)
    assert image_reason.startswith("image too large: ") and "bomb.png" in image_reason
    assert "decompression bomb" in image_reason and "downscale" in image_reason
    assert mask_reason.startswith("mask too large: ") and "bomb.png" in mask_reason
    assert fine is None and loaded[0] == 1  # the rows around it still load


def test_sixteen_bit_and_float_greyscale_images_keep_their_values(tmp_path):
    import pandas as pd

    from audit.data.decode import _read_image, _read_mask

    levels = np.array([[0, 10, 128, 255]], "uint16")
    Image.fromarray(levels * 257).save(tmp_path / "grey16.png")  # 0 .. 65535
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    pixels = _read_image(tmp_path / "grey16.png")
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 4, 3)
    np.testing.assert_array_equal(pixels[..., 0], levels)  # not clipped to white
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
    # 32-bit integers are 16-bit values; floats are 0..1.
    Image.fromarray((levels * 257).astype("int32")).save(tmp_path / "int32.tif")
    np.testing.assert_array_equal(_read_image(tmp_path / "int32.tif")[..., 1], levels)
    Image.fromarray((levels / 255).astype("float32")).save(tmp_path / "float.tif")
    np.testing.assert_array_equal(_read_image(tmp_path / "float.tif")[..., 1], levels)
    # A range that cannot be mapped to 8 bits is a skipped row, with the range.
    Image.fromarray(levels.astype("float32")).save(tmp_path / "float255.tif")
    with pytest.raises(SkipRow, match=r"floating-point pixels in \[0, 255\], outside 0\.\.1"):
        _read_image(tmp_path / "float255.tif")
    Image.fromarray(np.array([[0, 70000]], "int32")).save(tmp_path / "wide.tif")
    with pytest.raises(SkipRow, match=r"32-bit integer pixels in \[0, 70000\]"):
        _read_image(tmp_path / "wide.tif")
    # Masks: every value > 0 is object, 16-bit and float ones too (0.4 is not rounded away).
    Image.fromarray(np.array([[0, 1, 300]], "uint16")).save(tmp_path / "mask16.png")
    np.testing.assert_array_equal(_read_mask(tmp_path / "mask16.png"), [[False, True, True]])
    Image.fromarray(np.array([[0, 0.4]], "float32")).save(tmp_path / "maskf.tif")
    np.testing.assert_array_equal(_read_mask(tmp_path / "maskf.tif"), [[False, True]])
    # Through the loader: the model sees the 16-bit image's levels.
    Image.fromarray(np.full((8, 8), 100 * 257, "uint16")).save(tmp_path / "flat16.png")
    Image.new("L", (8, 8), 255).save(tmp_path / "mask.png")
    table = pd.DataFrame({"path": ["flat16.png"], "label": ["a"], "mask_path": ["mask.png"]})
    ((reason, (_, loaded)),) = _load(table, tmp_path)
    assert reason is None
    np.testing.assert_allclose(loaded.image, 100.0)


def test_empty_path_and_mask_path_cells_in_a_manifest(tmp_path):
    Image.new("RGB", (8, 8), (50, 50, 50)).save(tmp_path / "a.png")
    Image.new("L", (8, 8), 255).save(tmp_path / "m.png")
    (tmp_path / "manifest.csv").write_text(
        "path,label,mask_path,x_min,y_min,x_max,y_max\n"
        "a.png,a,m.png,0,0,4,4\n"
        ",a,m.png,0,0,4,4\n"  # no path: a skipped row, not a crash
        "a.png,b,,0,0,4,4\n"  # no mask: the row has no mask
    )
    entries = read_manifest(tmp_path / "manifest.csv")
    assert entries.table["path"].tolist() == ["a.png", "", "a.png"]
    results = _load(entries.table, entries.root)
    assert results[0][0] is None
    assert results[1][0].startswith("the manifest row has no path")
    assert results[2][0] == "region 'object' needs an object mask and the row has none"
    # With a box region, the row without a mask is audited.
    boxes = [
        RegionSection(name="object", source="box"),
        RegionSection(name="background", source="background", role="spurious"),
    ]
    reason, (label, loaded) = _load(entries.table, entries.root, boxes)[2]
    assert reason is None and label == 1 and loaded.regions[0].sum() == 16
    # The dataset fingerprint (read before any row) copes with the empty cells too.
    from audit.runs.open import dataset_fingerprint

    before, version = dataset_fingerprint(entries)
    assert len(before) == 64
    # A file rewritten in place, even at the same size, is new data (a new version,
    # so a new run key), and still the same dataset for a baseline.
    image = next(p for p in entries.root.rglob("*.png"))
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    identity, touched = dataset_fingerprint(entries)
    assert touched != version
    assert identity == before


def test_an_empty_label_stops_the_run_naming_the_row_and_the_csv_line(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\na.png,1\nb.png,\n")
    with pytest.raises(ConfigError) as error:
        read_manifest(tmp_path / "m.csv")
    message = str(error.value)
    assert "m.csv: row 1 (counted from 0" in message and "line 3 of the CSV" in message
    assert "fill it in or remove the row" in message


def test_malformed_rle_boxes_and_escaping_masks_are_skipped_rows_naming_the_column(tmp_path):
    import pandas as pd

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    table = pd.DataFrame(
        {
            "path": ["a.png", "a.png", "a.png", "../a.png"],
            "label": ["a"] * 4,
            "mask_path": ["../outside.png", None, None, None],
            "mask_rle": [None, "not json", '{"size": [8, 8], "counts": [64]}', None],
        }
    )
    reasons = [reason for reason, _ in _load(table, tmp_path)]
    assert reasons[0].startswith("mask_path '../outside.png' escapes the dataset root")
    assert reasons[1].startswith("mask_rle is not a COCO RLE JSON object")
    assert reasons[2].startswith("mask_rle is not a COCO RLE JSON object")  # uncompressed
    assert reasons[3].startswith("path '../a.png' escapes the dataset root")
    boxes = table.iloc[[0]].assign(mask_path=None, x_min="left", y_min=0, x_max=4, y_max=4)
    box_regions = [
        RegionSection(name="object", source="box"),
        RegionSection(name="background", source="background", role="spurious"),
    ]
    ((reason, _),) = _load(boxes.reset_index(drop=True), tmp_path, box_regions)
    assert reason == "box ['left', 0, 4, 4] is not four numbers"
