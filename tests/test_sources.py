"""COCO and TFDS sources: hand-made COCO files, mocked TFDS, hand-made tf.data datasets."""

import json

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image
from pycocotools import mask as coco_mask

from audit.config import ConfigError, build_config
from audit.config.sections import DatasetSection
from audit.data.coco import read_coco
from audit.data.decode import _decode_rle
from audit.data.manifest import class_names_for, read_manifest
from audit.data.sources import read_entries
from audit.data.tfds import export_tf_dataset, read_tfds, tfds_cache_folder
from audit.run import run_audit

HEIGHT, WIDTH = 24, 32


def _rect(y0, y1, x0, x1) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def _compressed(mask: np.ndarray) -> dict:
    rle = coco_mask.encode(np.asfortranarray(mask))
    return {"size": [HEIGHT, WIDTH], "counts": rle["counts"].decode()}


def _uncompressed(mask: np.ndarray) -> dict:
    """COCO's crowd format: run lengths over the column-major pixels, starting with zeros."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            counts.append(run)
            value, run = pixel, 1
    counts.append(run)
    return {"size": [HEIGHT, WIDTH], "counts": counts}


POLYGON = [4.0, 4.0, 12.0, 4.0, 12.0, 10.0, 4.0, 10.0]  # a rectangle, cat in image 1
CROWD = _rect(2, 8, 20, 30)  # 60 px, dog in image 2
SMALL_CAT = _rect(15, 18, 2, 5)  # 9 px, cat in image 2
CAT_A, CAT_B = _rect(0, 5, 0, 5), _rect(10, 20, 20, 30)  # 25 + 100 px, image 3
SMALL_DOG = _rect(20, 23, 8, 14)  # 18 px, image 3


def _polygon_mask() -> np.ndarray:
    return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects([POLYGON], HEIGHT, WIDTH)))


@pytest.fixture
def coco_dataset(tmp_path):
    """Four 32x24 images: polygon cat; crowd dog + small cat; two cats + small dog; none."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = {1: "a.png", 2: "b.png", 3: "sub/c.png", 4: "d.png"}
    for name in files.values():
        pixels = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / name)

    def annotation(id_, image_id, category_id, segmentation, iscrowd=0):
        return {
            "id": id_,
            "image_id": image_id,
            "category_id": category_id,
            "segmentation": segmentation,
            "iscrowd": iscrowd,
            "area": 0.0,  # deliberately wrong: read_coco measures the masks itself
            "bbox": [0, 0, 1, 1],
        }

    data = {
        "images": [  # listed out of id order on purpose
            {"id": i, "file_name": files[i], "height": HEIGHT, "width": WIDTH} for i in (3, 1, 4, 2)
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            annotation(10, 1, 1, [POLYGON]),
            annotation(20, 2, 2, _uncompressed(CROWD), iscrowd=1),
            annotation(21, 2, 1, _compressed(SMALL_CAT)),
            annotation(30, 3, 1, _compressed(CAT_A)),
            annotation(31, 3, 2, _compressed(SMALL_DOG)),
            annotation(32, 3, 1, _compressed(CAT_B)),
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, images


# ------------------------------------------------------------------- COCO


def test_read_coco_rows_labels_masks_and_boxes(coco_dataset):
    path, images = coco_dataset
    entries = read_coco(path, images)
    table = entries.table
    assert entries.root == images
    assert "1 unannotated" in entries.name
    assert table["coco_image_id"].tolist() == [1, 2, 3]  # image-id order, no empty image
    assert table["path"].tolist() == ["a.png", "b.png", "sub/c.png"]
    assert table["label"].tolist() == ["cat", "dog", "cat"]
    assert table["num_objects"].tolist() == [1, 1, 2]
    assert set(entries.slice_columns) == {"coco_image_id", "num_objects"}

    masks = [_decode_rle(value) for value in table["mask_rle"]]
    assert all(mask.shape == (HEIGHT, WIDTH) for mask in masks)
    np.testing.assert_array_equal(masks[0], _polygon_mask().astype(bool))
    np.testing.assert_array_equal(masks[1], CROWD.astype(bool))  # crowd RLE, no small cat
    np.testing.assert_array_equal(masks[2], (CAT_A | CAT_B).astype(bool))  # union, no dog
    assert [int(mask.sum()) for mask in masks[1:]] == [60, 125]

    boxes = table[["x_min", "y_min", "x_max", "y_max"]].to_numpy().tolist()
    ys, xs = np.nonzero(masks[0])
    assert boxes[0] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert boxes[1] == [20, 2, 30, 8]
    assert boxes[2] == [0, 0, 30, 20]


def test_read_coco_rle_string_matches_encode_of_the_union(coco_dataset):
    table = read_coco(*coco_dataset).table
    rle = json.loads(table["mask_rle"][2])
    expected = coco_mask.encode(np.asfortranarray(CAT_A | CAT_B))
    assert rle == {"size": [HEIGHT, WIDTH], "counts": expected["counts"].decode("ascii")}


def test_read_entries_dispatches_coco_and_applies_limit(coco_dataset):
    path, images = coco_dataset
    entries = read_entries(DatasetSection(coco=path, coco_images=images, limit=2))
    assert entries.table["path"].tolist() == ["a.png", "b.png"]


def test_read_coco_errors_name_the_file_and_fix(tmp_path, coco_dataset):
    path, images = coco_dataset
    with pytest.raises(ConfigError, match="not found.*missing.json.*dataset.coco"):
        read_coco(tmp_path / "missing.json", images)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json.*valid instances JSON"):
        read_coco(broken, images)
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ConfigError, match="captions.json.*not a COCO instances file"):
        read_coco(captions, images)
    with pytest.raises(ConfigError, match="coco_images"):
        read_coco(path, tmp_path / "no_images")


def test_read_coco_rejects_annotations_without_masks(tmp_path, coco_dataset):
    path, images = coco_dataset
    data = json.loads(path.read_text())
    del data["annotations"][0]["segmentation"]
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="annotation 10 .* no segmentation"):
        read_coco(path, images)
    # An unknown category on an annotation that is not the image's largest counts too.
    data = json.loads(path.read_text())
    data["annotations"] = data["annotations"][1:]
    next(a for a in data["annotations"] if a["id"] == 31)["category_id"] = 9  # a small dog
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="annotation 31 .* category_id 9, which is not listed"):
        read_coco(path, images)


def _tiny_model(path):
    """Positive conv and head weights: every Grad-CAM map is positive, so metrics are finite."""
    model = keras.Sequential(
        [
            keras.Input((HEIGHT, WIDTH, 3)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ]
    )
    conv, _, dense = model.layers
    conv.set_weights([np.full((3, 3, 3, 4), 0.1, "float32"), np.full(4, 0.1, "float32")])
    dense.set_weights([np.ones((4, 2), "float32"), np.zeros(2, "float32")])
    model.save(path)
    return path


def test_run_audit_on_coco_end_to_end(tmp_path, coco_dataset):
    path, images = coco_dataset
    config = build_config(
        {
            "model": {"path": str(_tiny_model(tmp_path / "m.keras"))},
            "dataset": {"coco": str(path), "coco_images": str(images)},
            "output": {"store": str(tmp_path / "runs")},
            "batch_size": 2,
        }
    )
    result = run_audit(config, progress=False)
    stored = pd.read_parquet(result.run_dir / "images.parquet")
    assert len(stored) == 3
    assert stored["status"].tolist() == ["ok"] * 3
    assert stored["coco_image_id"].tolist() == [1, 2, 3]
    assert np.isfinite(stored["mass_object"]).all()
    assert ((stored["mass_object"] > 0) & (stored["mass_object"] < 1)).all()
    assert result.manifest["class_names"] == ["cat", "dog"]


# ------------------------------------------------------------------- TFDS


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BIAS_AUDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_read_tfds_exports_once_then_reuses_the_cache(tmp_path, cache, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    dataset = DatasetSection(tfds="oxford_iiit_pet", mask_key="segmentation_mask")
    with tfds.testing.mock_data(
        num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE, data_dir=str(tmp_path / "meta")
    ):
        entries = read_tfds(dataset)
    folder = tfds_cache_folder("oxford_iiit_pet", "test")
    assert folder == cache / "tfds" / "oxford_iiit_pet" / "test"
    assert entries.root == folder and entries.name == "tfds:oxford_iiit_pet/test"
    assert sorted(p.name for p in (folder / "images").iterdir()) == [
        f"{i:06d}.png" for i in range(6)
    ]
    assert len(list((folder / "masks").iterdir())) == 6
    assert (folder / "manifest.csv").exists() and (folder / "complete").exists()
    table = entries.table
    assert table["path"].tolist() == [f"images/{i:06d}.png" for i in range(6)]
    assert table["mask_path"].tolist() == [f"masks/{i:06d}.png" for i in range(6)]
    names = tfds.builder("oxford_iiit_pet").info.features["label"].names
    assert set(table["label"]) <= set(names)  # class names, not indices
    with Image.open(folder / "masks" / "000000.png") as mask:
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}

    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}

    def no_load(*args, **kwargs):
        raise AssertionError("the cached export should be reused, not loaded again")

    monkeypatch.setattr(tfds, "load", no_load)
    again = read_tfds(dataset.model_copy(update={"limit": 4}))
    assert again.table["path"].tolist() == table["path"].tolist()[:4]
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == stamps


def test_read_tfds_redoes_an_unfinished_export_and_explains_missing_data(tmp_path, cache):
    tfds = pytest.importorskip("tensorflow_datasets")
    dataset = DatasetSection(tfds="oxford_iiit_pet", tfds_split="train")
    folder = tfds_cache_folder("oxford_iiit_pet", "train")
    folder.mkdir(parents=True)
    (folder / "manifest.csv").write_text("path,label\nhalf.png,0\n")  # no complete marker
    with tfds.testing.mock_data(
        num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE, data_dir=str(tmp_path / "meta")
    ):
        entries = read_tfds(dataset)
    assert len(entries.table) == 3 and "mask_path" not in entries.table
    with pytest.raises(ConfigError, match="no_such_dataset_xyz.*check the name.*tfds build"):
        read_tfds(DatasetSection(tfds="no_such_dataset_xyz"))


def test_export_tf_dataset_from_tensor_slices(tmp_path):
    images = np.arange(3 * 4 * 5 * 3, dtype=np.uint8).reshape(3, 4, 5, 3)
    trimap = np.full((3, 4, 5, 1), 2, dtype=np.uint8)  # background everywhere ...
    trimap[:, 1:3, 1:4] = 1  # ... a 2x3 pet ...
    trimap[:, 0, :] = 3  # ... and a border row
    binary = np.zeros((3, 4, 5), dtype=np.int32)
    binary[:, 2:, :2] = 7  # non-trimap values: anything > 0 is object
    ds = tf.data.Dataset.from_tensor_slices(
        {"img": images, "y": np.array([2, 0, 1]), "trimap": trimap, "binary": binary}
    )
    manifest = export_tf_dataset(
        ds, tmp_path / "out", image_key="img", label_key="y", mask_key="trimap",
        label_names=["a", "b", "c"],
    )  # fmt: skip
    table = pd.read_csv(manifest)
    assert table["label"].tolist() == ["c", "a", "b"]
    with Image.open(tmp_path / "out" / table["path"][1]) as image:
        np.testing.assert_array_equal(np.asarray(image), images[1])
    with Image.open(tmp_path / "out" / table["mask_path"][0]) as mask:
        assert (np.asarray(mask) > 0).sum() == 6 and np.asarray(mask)[1:3, 1:4].all()
    assert not list((tmp_path / "out").glob("*.tmp"))  # the manifest was written atomically
    assert json.loads((tmp_path / "out" / "complete").read_text())["rows"] == 3
    # Read back as a plain manifest, it keeps the label names' order (the model's
    # output order), not the alphabet's.
    names = ["zero", "one", "two"]
    exported = read_manifest(
        export_tf_dataset(ds, tmp_path / "named", image_key="img", label_key="y", label_names=names)
    )
    assert class_names_for(exported.table["label"], 3, exported.class_names) == names

    export_tf_dataset(ds, tmp_path / "bin", image_key="img", label_key="y", mask_key="binary")
    table = pd.read_csv(tmp_path / "bin" / "manifest.csv")
    assert table["label"].tolist() == [2, 0, 1]  # no names: the index as text
    with Image.open(tmp_path / "bin" / table["mask_path"][0]) as mask:
        np.testing.assert_array_equal(np.asarray(mask) > 0, binary[0] > 0)


def test_export_tf_dataset_string_labels_and_bad_inputs(tmp_path):
    gray = np.zeros((2, 6, 6, 1), dtype=np.uint8)
    ds = tf.data.Dataset.from_tensor_slices({"image": gray, "label": [b"cat", b"dog"]})
    manifest = export_tf_dataset(ds, tmp_path / "s", image_key="image", label_key="label")
    assert pd.read_csv(manifest)["label"].tolist() == ["cat", "dog"]
    with pytest.raises(ConfigError, match="no key.*mask.*image, label"):
        export_tf_dataset(ds, tmp_path / "k", image_key="image", label_key="label", mask_key="mask")
    floats = tf.data.Dataset.from_tensor_slices(
        {"image": gray.astype("float32") + 0.5, "label": [0, 1]}
    )
    with pytest.raises(ConfigError, match="uint8"):
        export_tf_dataset(floats, tmp_path / "f", image_key="image", label_key="label")
    tuples = tf.data.Dataset.from_tensor_slices((gray, [0, 1]))
    with pytest.raises(ConfigError, match="dicts"):
        export_tf_dataset(tuples, tmp_path / "t", image_key="image", label_key="label")
