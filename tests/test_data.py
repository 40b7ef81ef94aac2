"""The loader: sources, preprocessing, regions, class names."""

import numpy as np
import pytest
from PIL import Image

from audit.config import ConfigError, PreprocessSection, RegionSection
from audit.data import (
    Preprocessor,
    SkipRow,
    build_regions,
    class_names_for,
    load_row,
    read_folders,
    read_manifest,
)


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
    entries = read_folders(tmp_path / "images", tmp_path / "masks")
    assert entries.table["label"].tolist() == ["cat", "cat", "dog", "dog"]
    assert entries.table["path"].tolist()[0] == "cat/0.jpg"
    loaded = load_row(
        entries.table.iloc[3].to_dict(),
        entries,
        Preprocessor((10, 12), PreprocessSection()),
        [RegionSection(name="object", source="mask")],
    )
    assert loaded.image.shape == (10, 12, 3) and loaded.regions[0].all()
    with pytest.raises(ConfigError, match="no images found"):
        read_folders(tmp_path / "masks" / "cat")


def test_manifest_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_manifest(tmp_path / "absent.csv")
    (tmp_path / "m.csv").write_text("file,class\na.png,1\n")
    with pytest.raises(ConfigError, match="m.csv lacks the column.*path, label"):
        read_manifest(tmp_path / "m.csv")
    (tmp_path / "b.csv").write_text("path,label,x_min,y_min\na.png,1,0,0\n")
    with pytest.raises(ConfigError, match="x_max"):
        read_manifest(tmp_path / "b.csv")


def test_paths_that_leave_the_dataset_root_are_refused_symlinks_included(tmp_path):
    from audit.data import SkipRow, _inside

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
    from audit.data import _inside, forget_resolved_paths

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
