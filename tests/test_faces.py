"""Face regions: masks from boxes, manifest face columns, MTCNN on a real photo."""

import numpy as np
import pandas as pd
import pytest
from conftest import ink_model

from audit.config import ConfigError, build_config
from audit.config.sections import RegionSection
from audit.data.decode import SkipRow
from audit.data.faces import (
    FACE_COLUMNS,
    LANDMARK_COLUMNS,
    detect_faces,
    face_mask,
    landmark_box,
    with_detected_faces,
)
from audit.data.regions import build_regions
from audit.measure.localisation import box_iou
from audit.run import run_audit
from pipelines.demo import write_dataset
from pipelines.demo_data import make_demo_set


def test_face_boxes_ellipses_and_hair_band():
    box = face_mask((10, 20, 20, 40), (64, 64))
    assert box.sum() == 10 * 20 and box[20, 10] and not box[19, 10]
    ellipse = face_mask((10, 20, 20, 40), (64, 64), ellipse=True)
    assert abs(ellipse.sum() - np.pi * 5 * 10) < 12 and not ellipse[20, 10]
    band = face_mask((10, 20, 20, 40), (64, 64), hair_band=0.25)
    assert band.sum() == 10 * 25 and band[15, 12]


def test_missing_faces_skip_expected_regions_and_empty_spurious_ones():
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    spurious = [
        RegionSection(name="object", source="mask"),
        RegionSection(name="face", source="face", role="spurious"),
    ]
    stack = build_regions(spurious, mask, None, (8, 8), {"face": None})
    assert not stack[1].any()
    expected = [RegionSection(name="face", source="face", role="expected")]
    with pytest.raises(SkipRow, match="no face found"):
        build_regions(expected, None, None, (8, 8), {})


def test_manifest_face_columns_become_a_spurious_region(tmp_path):
    manifest = write_dataset(make_demo_set(24, seed=6), tmp_path / "data")
    table = pd.read_csv(manifest)
    table[list(FACE_COLUMNS)] = [0.0, 0.0, 16.0, 16.0]  # a "face" in the top-left corner
    table.loc[3, list(FACE_COLUMNS)] = np.nan  # no face in this image
    table[list(FACE_COLUMNS)] = table[list(FACE_COLUMNS)].astype(object)
    table.loc[5, "face_x_min"] = "abc"  # bad face boxes: skipped rows with their reason
    table.loc[6, list(FACE_COLUMNS)] = [16.0, 0.0, 0.0, 16.0]  # inverted
    table.loc[7, list(FACE_COLUMNS)] = [100.0, 100.0, 120.0, 120.0]  # off the 48x48 image
    # A bad object box that no region uses skips nothing.
    table[["x_min", "y_min", "x_max", "y_max"]] = [0.0, 0.0, 8.0, 8.0]
    table.loc[8, ["x_min", "x_max"]] = [9.0, 1.0]
    table.to_csv(manifest, index=False)
    ink_model().save(tmp_path / "ink.keras")
    config = build_config(
        {
            "model": {"path": str(tmp_path / "ink.keras"), "class_names": list("0123456789")},
            "dataset": {"manifest": str(manifest)},
            "output": {"store": str(tmp_path / "runs")},
            "regions": [
                {"name": "object", "source": "mask"},
                {"name": "face", "source": "face", "role": "spurious", "shape": "ellipse"},
                {"name": "background", "source": "background", "role": "spurious"},
            ],
            "policy": {"intervention_samples": 0},
        }
    )
    images = run_audit(config, progress=False).images
    reasons = images.set_index("row")["skip_reason"]
    assert reasons[5] == "face box ['abc', 0.0, 16.0, 16.0] is not four numbers"
    assert reasons[6].startswith("face box [16.0, 0.0, 0.0, 16.0] is empty or inverted")
    assert reasons[7].startswith("face box [100.0, 100.0, 120.0, 120.0] covers no pixel of the")
    ok = images.drop(index=[5, 6, 7])
    assert (ok["status"] == "ok").all()  # the image without a face is kept (row 3), row 8 too
    np.testing.assert_allclose(ok["area_face"].drop(index=3), np.pi * 8 * 8 / 48**2, rtol=0.1)
    assert images.loc[3, "area_face"] == 0 and np.isnan(images.loc[3, "lift_face"])
    # The background is the rest: the face is not background too.
    for region in ("object", "face"):  # (the two may overlap each other)
        assert (ok[f"area_{region}"] + ok["area_background"] <= 1.0 + 1e-6).all()
    assert (ok["area_background"] < 1 - ok["area_face"] - ok["area_object"] + 0.05).all()
    # Five landmarks per row (CelebA's columns) draw the face box instead: eyes 8 apart,
    # the mouth 8 below them, so a box 16 wide from 8 above the eyes to 6.8 below the mouth.
    marked = table.drop(columns=list(FACE_COLUMNS))
    marked[list(LANDMARK_COLUMNS)] = [4.0, 8.0, 12.0, 8.0, 8.0, 12.0, 4.0, 16.0, 12.0, 16.0]
    marked = marked.astype({column: object for column in LANDMARK_COLUMNS})
    marked.loc[3, list(LANDMARK_COLUMNS)] = np.nan  # no face
    marked.loc[5, "nose_x"] = "abc"
    marked.to_csv(manifest, index=False)
    result = run_audit(config, progress=False)
    images = result.images.set_index("row")
    assert images.loc[5, "skip_reason"].startswith("face landmarks [4.0, 8.0, 12.0, 8.0, 'abc'")
    assert images.loc[5, "skip_reason"].endswith("is not 10 numbers")
    ok = images.drop(index=[5])
    assert (ok["status"] == "ok").all() and images.loc[3, "area_face"] == 0
    np.testing.assert_allclose(ok["area_face"].drop(index=3), np.pi * 8 * 11.4 / 48**2, rtol=0.1)
    assert "lefteye_x" not in result.manifest["dataset"]["slice_columns"]  # inputs, not slices
    # Face regions and no face data at all (no columns, no detector): exit-2 error.
    table.drop(columns=list(FACE_COLUMNS)).to_csv(manifest, index=False)
    with pytest.raises(ConfigError, match="needs face boxes and the dataset"):
        run_audit(config, progress=False)


@pytest.mark.slow
def test_mtcnn_finds_the_astronauts_face_and_detections_are_cached(tmp_path, monkeypatch):
    skimage_data = pytest.importorskip("skimage.data")  # a test extra; installed in CI
    photo = skimage_data.astronaut()  # 512x512, Eileen Collins' face near x 170-230, y 40-130
    (box,) = detect_faces([photo])
    x_min, y_min, x_max, y_max = box
    assert x_min < 200 < x_max and y_min < 90 < y_max
    assert 30 < x_max - x_min < 150 and 40 < y_max - y_min < 180
    assert detect_faces([np.full((120, 120, 3), 128, "uint8")]) == [None]  # no face
    # The box drawn around MTCNN's five keypoints is the box MTCNN draws.
    from mtcnn import MTCNN

    (face,) = MTCNN(device="CPU:0").detect_faces(photo)
    points = face["keypoints"]
    names = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
    drawn = landmark_box([float(v) for name in names for v in points[name]])
    assert box_iou(np.array(drawn), np.array(box)) > 0.9

    from PIL import Image

    from audit.data.manifest import Entries

    (tmp_path / "photos").mkdir()
    Image.fromarray(photo).save(tmp_path / "photos" / "astronaut.png")
    Image.fromarray(np.full((64, 64, 3), 200, "uint8")).save(tmp_path / "photos" / "wall.png")
    Image.fromarray(photo).save(tmp_path / "outside.png")
    # Batched by size: two sizes, and a path outside the root that is never read (the
    # dataset confines its files to the root, dataset.confine).
    names = ["astronaut.png", "wall.png", "../outside.png", "astronaut.png"]
    entries = Entries(
        pd.DataFrame({"path": names, "label": ["a", "b", "a", "a"]}),
        tmp_path / "photos",
        "photos",
        confine=True,
    )
    found = with_detected_faces(entries, tmp_path / "cache", "abc123")
    assert found.table.loc[0, "face_x_min"] == pytest.approx(x_min)
    assert found.table.loc[3, "face_x_min"] == pytest.approx(x_min)
    assert found.table.loc[[1, 2], list(FACE_COLUMNS)].isna().all(axis=None)  # kept, no face

    def no_detector(images, **kwargs):
        raise AssertionError("the cache should answer")

    monkeypatch.setattr("audit.data.faces.detect_faces", no_detector)
    again = with_detected_faces(entries, tmp_path / "cache", "abc123")
    pd.testing.assert_frame_equal(again.table, found.table)


def test_the_detector_pass_records_an_oversized_image_as_faceless(tmp_path):
    from PIL import Image

    from audit.data.manifest import Entries

    Image.new("1", (20000, 10000)).save(tmp_path / "bomb.png")  # a decompression bomb
    entries = Entries(pd.DataFrame({"path": ["bomb.png"], "label": ["a"]}), tmp_path, "test")
    found = with_detected_faces(entries, tmp_path / "cache", "f" * 16)
    assert found.table[list(FACE_COLUMNS)].isna().all(axis=None)  # the audit skips the row
