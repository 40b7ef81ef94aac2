"""A face/background audit end to end on generated portraits (the doctor/nurse case)."""

import json

import keras
import pytest

from audit.config import build_config
from audit.run import run_audit
from pipelines.demo import demo_model
from pipelines.face_data import CLASS_NAMES, make_portraits, write_portraits

REGIONS = [
    {"name": "badge", "source": "mask", "dilate": 1},
    {"name": "face", "source": "face", "role": "spurious", "shape": "ellipse"},
    {"name": "background", "source": "background", "role": "spurious"},
]


def audited(tmp_path, manifest, shortcut_rate, name):
    keras.utils.set_random_seed(0)
    train = make_portraits(3000, seed=1, shortcut_rate=shortcut_rate)
    model = demo_model(len(CLASS_NAMES))
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(train.images, train.labels, epochs=6, batch_size=64, verbose=0)
    model.save(tmp_path / f"{name}.keras")
    config = build_config(
        {
            "model": {"path": str(tmp_path / f"{name}.keras"), "class_names": CLASS_NAMES},
            "dataset": {"manifest": str(manifest)},
            "output": {"store": str(tmp_path / "runs")},
            "regions": REGIONS,
        }
    )
    result = run_audit(config, progress=False)
    return result, json.loads((result.run_dir / "report.json").read_text())


@pytest.mark.slow
def test_a_face_shortcut_is_found_and_a_clean_model_is_cleared(tmp_path):
    manifest = write_portraits(make_portraits(600, seed=2), tmp_path / "audit")
    biased, biased_report = audited(tmp_path, manifest, 0.95, "biased")
    clean, clean_report = audited(tmp_path, manifest, 0.0, "clean")
    # Face regions measured on every image: the ellipse inscribed in the 14x18 face box.
    assert biased.images["area_face"].between(0.07, 0.10).all()
    # Training tied face tone to the class; swapping everything but the badge (the
    # face included) flips the biased model's decisions: a bias-driven class.
    biased_status = {c["class_name"]: c["status"] for c in biased_report["classes"]}
    assert "bias-driven" in biased_status.values(), biased_status
    assert biased_report["outcome"] == "FAIL"
    clean_status = {c["class_name"]: c["status"] for c in clean_report["classes"]}
    assert "bias-driven" not in clean_status.values(), clean_status
    # Slicing by face tone shows the damage as worst-group accuracy.

    def worst(report):
        groups = [g for g in report["slices"]["groups"] if g["attribute"] == "face_tone"]
        return min(g["accuracy"] for g in groups if g["kind"] == "slice")

    assert worst(biased_report) < worst(clean_report) - 0.1
