"""The dataset audit end to end on generated data with known answers."""

import json
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import ink_model

from audit.cli.main import main as cli_main
from audit.config import ConfigError, build_config
from audit.measure.step import AuditStep
from audit.run import run_audit
from audit.runs.store import RunStore, run_state
from pipelines.demo import SHORTCUTS, write_dataset
from pipelines.demo_data import make_demo_set


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    manifest = write_dataset(make_demo_set(72, seed=3), root)
    model_path = root / "ink.keras"
    ink_model().save(model_path)
    return manifest, model_path


def config_for(manifest, model_path, store, **extra):
    data = {
        "model": {"path": str(model_path)},
        "dataset": {"manifest": str(manifest)},
        "output": {"store": str(store)},
        "batch_size": 8,
    }
    for section, values in extra.items():
        data[section] = values if not isinstance(values, dict) else data.get(section, {}) | values
    return build_config(data)


def test_a_model_that_looks_at_the_object_scores_high_object_mass(small_dataset, tmp_path):
    manifest, model_path = small_dataset
    result = run_audit(config_for(manifest, model_path, tmp_path), progress=False)
    images = result.images
    assert len(images) == 72 and (images["status"] == "ok").all()
    assert images["row"].tolist() == list(range(72))
    assert images["mass_object"].median() > 0.95
    assert images["lift_object"].median() > 5
    assert images["mass_background"].median() < 0.05
    assert (images["pointing_object"] == 1).mean() > 0.95
    np.testing.assert_allclose(images["mass_object"] + images["mass_background"], 1, atol=1e-5)
    # Slice columns from the manifest ride along; the true label is explained.
    assert set(images["background_type"]) <= {
        "stripes",
        "checker",
        "dots",
        "noise",
        "gradient",
        "waves",
    }
    assert (images["target"] == images["label_index"]).all()
    assert {"pred_mass_object", "pred_iou_background", "confidence", "cam_total"} <= set(images)
    # The store holds the manifest and one low-res fp16 CAM per audited row.
    manifest_json = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest_json["status"] == "complete" and manifest_json["counts"]["ok"] == 72
    assert manifest_json["model"]["layer"] == "ink" and manifest_json["model"]["softmax_bypassed"]
    rows, cams = RunStore(result.run_dir).cams()
    assert rows.tolist() == list(range(72)) and cams.dtype == np.float16
    assert cams.shape == (72, 16, 16)  # the 48x48 map, capped at metrics.cam_size
    # With only positive class weights nothing argues against the class: the
    # counterfactual maps are zero (their mass undefined).
    assert (images["cf_total"] == 0).all() and images["cf_mass_object"].isna().all()
    assert images["loc_iou"].between(0, 1).all()


def test_weak_localisation_finds_the_digit_box_from_a_coarse_map(small_dataset, tmp_path):
    """The paper's protocol on generated data with known boxes (the digit's mask box).

    The ink model's map pooled 4x (a 12x12 map, as coarse as a real network's) is one
    blob over the digit: its 15% box matches the digit's box. The ink model's own
    full-resolution map is fragmented strokes: its largest component is one stroke.
    """
    manifest, ink_path = small_dataset
    ink = keras.saving.load_model(ink_path)
    inputs = keras.Input((48, 48, 3))
    pooled = keras.layers.AveragePooling2D(4, name="coarse")(ink.get_layer("ink")(inputs))
    head = keras.layers.Dense(10, name="head")
    coarse = keras.Model(inputs, head(keras.layers.GlobalAveragePooling2D()(pooled)))
    head.set_weights(ink.get_layer("classes").get_weights())
    coarse_path = tmp_path / "coarse.keras"
    coarse.save(coarse_path)
    results = {
        name: run_audit(config_for(manifest, path, tmp_path / name), progress=False)
        for name, path in (("coarse", coarse_path), ("strokes", ink_path))
    }
    coarse_iou = results["coarse"].images["loc_iou"]
    assert coarse_iou.median() > 0.6
    assert coarse_iou.median() > results["strokes"].images["loc_iou"].median() + 0.2
    page = (results["coarse"].run_dir / "report.html").read_text()
    assert "Weak localisation: mean box IoU" in page
    classes = pd.read_parquet(results["coarse"].run_dir / "classes.parquet")
    assert {"loc_error", "top1_loc_error", "cf_mass_object", "loc_iou"} <= set(classes)
    true_groups = classes[classes["kind"] == "true"].dropna(subset=["loc_error"])
    rows = results["coarse"].images
    for group in true_groups.itertuples():
        mine = rows[(rows["label_index"] == group.class_index) & rows["correct"]]
        assert group.loc_error == pytest.approx((mine["loc_iou"] < 0.5).mean())


def test_bad_inputs_are_recorded_and_the_audit_goes_on(small_dataset, tmp_path):
    manifest, model_path = small_dataset
    root = manifest.parent
    table = pd.read_csv(manifest).iloc[:10].copy()
    (root / "images" / "corrupt.png").write_bytes(b"not a png at all")
    (root / "masks" / "empty.png").write_bytes((root / "masks" / "00000.png").read_bytes())
    from PIL import Image

    Image.new("L", (48, 48)).save(root / "masks" / "empty.png")
    Image.new("L", (20, 20), 255).save(root / "masks" / "small.png")
    bad = [
        {"path": "images/corrupt.png", "label": "1", "mask_path": "masks/00001.png"},
        {"path": "images/missing.png", "label": "1", "mask_path": "masks/00001.png"},
        {"path": "images/00002.png", "label": "2", "mask_path": "masks/small.png"},
        {"path": "images/00003.png", "label": "3", "mask_path": "masks/empty.png"},
        {"path": "images/00004.png", "label": "cat", "mask_path": "masks/00004.png"},
        {"path": "../../etc/passwd", "label": "1", "mask_path": "masks/00001.png"},
        {"path": "images/00005.png", "label": "5"},
    ]
    table = pd.concat([table, pd.DataFrame(bad)], ignore_index=True)
    bad_manifest = root / "bad.csv"
    table.to_csv(bad_manifest, index=False)
    names = {"class_names": [str(digit) for digit in range(10)]}
    # On a shared server the manifest may come from someone else: dataset.confine.
    config = config_for(bad_manifest, model_path, tmp_path, model=names, dataset={"confine": True})
    result = run_audit(config, progress=False)
    images = result.images
    assert len(images) == 17 and images["row"].tolist() == list(range(17))
    assert (images["status"].iloc[:10] == "ok").all()
    reasons = images["skip_reason"].iloc[10:].tolist()
    expected = [
        "corrupt or unreadable image",
        "image file not found",
        "mask is 20x20 but the image is 48x48",
        "the 'object' region is empty",
        "label 'cat' is not one of the model's classes",
        "escapes the dataset root",
        "needs an object mask and the row has none",
    ]
    for reason, fragment in zip(reasons, expected, strict=True):
        assert fragment in reason
    assert (images["status"].iloc[10:] == "skipped").all()
    assert images["mass_object"].iloc[10:].isna().all()
    counts = result.manifest["counts"]
    assert (
        counts["ok"] == 10 and counts["skipped"] == 7 and sum(counts["skip_reasons"].values()) == 7
    )
    # Counted by kind of problem, without the particular file or value.
    assert counts["skip_reasons"]["label … is not one of the model's classes"] == 1
    assert not any("00001.png" in kind or "cat" in kind for kind in counts["skip_reasons"])
    # Every row skipped (no image exists) still ends in a complete run with its reports.
    missing = pd.DataFrame(bad[1:2] * 3)
    missing.to_csv(root / "missing.csv", index=False)
    config = config_for(root / "missing.csv", model_path, tmp_path / "none", model=names)
    empty = run_audit(config, progress=False)
    assert empty.manifest["status"] == "complete" and empty.manifest["counts"]["skipped"] == 3
    assert (empty.run_dir / "report.html").exists()
    report = json.loads((empty.run_dir / "report.json").read_text())
    assert report["outcome"] == "NO IMAGES AUDITED"  # never a PASS on nothing
    assert (
        cli_main(
            [
                "run",
                "--model",
                str(model_path),
                "--data",
                str(root / "missing.csv"),
                "--out",
                str(tmp_path / "cli"),
                "--no-progress",
            ]
        )
        == 2
    )


def test_a_region_the_dataset_has_no_data_for_fails_fast(small_dataset, tmp_path):
    manifest, model_path = small_dataset
    no_masks = manifest.parent / "no_masks.csv"
    pd.read_csv(manifest)[["path", "label"]].to_csv(no_masks, index=False)
    with pytest.raises(ConfigError, match="region 'object' .*needs object masks.*--masks DIR"):
        run_audit(config_for(no_masks, model_path, tmp_path), progress=False)
    assert not any(tmp_path.iterdir())  # failed before a run folder was made


HOLD_SCRIPT = """
import sys, time
from audit.runs.store import hold_run
with hold_run(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_killed_run_resumes_to_identical_results(small_dataset, tmp_path, monkeypatch):
    manifest, model_path = small_dataset
    reference = run_audit(config_for(manifest, model_path, tmp_path / "a"), progress=False)

    config = config_for(manifest, model_path, tmp_path / "b")
    original = RunStore.write_chunk
    calls = {"n": 0}

    def dies_after_one_chunk(self, *args, **kwargs):
        if calls["n"] == 1:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RunStore, "write_chunk", dies_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        run_audit(config, progress=False)
    monkeypatch.setattr(RunStore, "write_chunk", original)
    (run_dir,) = (tmp_path / "b").iterdir()
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "running"
    assert RunStore(run_dir).done_chunks() == {0}
    # Starting over without --resume says that --resume would continue it.
    from audit.runs.open import open_run

    key = json.loads((run_dir / "manifest.json").read_text())["run_key"]
    with pytest.warns(UserWarning, match="unfinished run .*--resume would have continued it"):
        assert open_run(config, key, resume=False)[0].root != run_dir

    # Cut short, the run is held by no process: it shows as interrupted.
    assert run_state(run_dir) == "interrupted"
    # While another process holds it, resuming is refused: two writers would interleave
    # their chunks.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_SCRIPT, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_state(run_dir) == "running"
        with pytest.raises(ConfigError, match="is being computed by another process"):
            run_audit(config, resume=True, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert run_state(run_dir) == "interrupted"

    resumed = run_audit(config, resume=True, progress=False)
    assert resumed.run_dir == run_dir
    pd.testing.assert_frame_equal(resumed.images, reference.images)
    assert resumed.images["row"].is_unique
    # Resuming a complete run recomputes nothing and returns it.
    again = run_audit(config, resume=True, progress=False)
    assert again.run_dir == run_dir


def test_a_named_run_is_never_overwritten_with_another_config(small_dataset, tmp_path):
    manifest, model_path = small_dataset
    named = {"store": str(tmp_path), "run_id": "nightly"}
    run_audit(config_for(manifest, model_path, tmp_path, output=named), progress=False)
    other = config_for(manifest, model_path, tmp_path, output=named, model={"method": "hirescam"})
    with pytest.raises(ConfigError, match="never overwritten"):
        run_audit(other, progress=False)


def test_predicted_target_and_box_regions(small_dataset, tmp_path):
    manifest, model_path = small_dataset
    config = config_for(
        manifest,
        model_path,
        tmp_path,
        model={"target": "predicted"},
        regions=[
            {"name": "box", "source": "mask", "box_from_mask": True},
            {"name": "frame", "source": "border", "role": "spurious", "width": 3},
            {"name": "rest", "source": "background", "role": "spurious"},
        ],
    )
    images = run_audit(config, progress=False).images
    assert (images["target"] == images["pred"]).all()
    assert {"true_mass_box", "mass_frame", "area_rest"} <= set(images)
    # The box contains the strokes, so it holds at least the strokes' mass.
    assert images["mass_box"].median() > 0.95
    np.testing.assert_allclose(images["area_frame"], 1 - (42 * 42) / (48 * 48))


def test_cli_quick_form_and_config_errors(small_dataset, tmp_path, capsys):
    manifest, model_path = small_dataset
    code = cli_main(
        [
            "run",
            "--model",
            str(model_path),
            "--data",
            str(manifest),
            "--out",
            str(tmp_path),
            "--batch-size",
            "16",
            "--limit",
            "20",
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "20 rows, 20 audited, 0 skipped" in out and "stored in" in out
    assert "maps: " in out and "randomisation " in out and "faithfulness " in out
    assert cli_main(["run", "--model", str(model_path)]) == 2
    assert "--data" in capsys.readouterr().err
    assert cli_main(["run", "--model", str(tmp_path / "nope.keras"), "--data", str(manifest)]) == 2
    assert "nope.keras" in capsys.readouterr().err


@pytest.mark.slow
def test_a_planted_background_shortcut_moves_mass_to_the_background(biased_demo):
    _, _, result = biased_demo
    images = result.images
    correct = images[images["correct"].astype(bool)]
    background = correct.groupby("label")["mass_background"].mean()
    clean = background.drop([str(c) for c in SHORTCUTS])
    for shortcut in SHORTCUTS:
        assert background[str(shortcut)] > clean.median()
    assert background[str(max(SHORTCUTS, key=lambda c: background[str(c)]))] > clean.max()


def test_a_coarser_measuring_grid_keeps_mass(small_dataset, tmp_path):
    manifest, _ = small_dataset
    # The ink model with its map pooled to 12x12: a grid of 24 is twice the map's side.
    model = ink_model()
    pooled = keras.layers.AveragePooling2D(4, name="pooled")(model.get_layer("ink").output)
    head = model.get_layer("classes")(keras.layers.GlobalAveragePooling2D()(pooled))
    keras.Model(model.inputs, head).save(tmp_path / "pooled.keras")
    path = tmp_path / "pooled.keras"
    fine = run_audit(config_for(manifest, path, tmp_path / "fine"), progress=False)
    coarse = run_audit(
        config_for(manifest, path, tmp_path / "coarse", metrics={"max_side": 8}), progress=False
    )
    for column in ("mass_object", "mass_background"):
        np.testing.assert_allclose(coarse.images[column], fine.images[column], atol=0.04)
    # lift = mass / area divides the small error by a small area (about 0.1 here).
    np.testing.assert_allclose(coarse.images["lift_object"], fine.images["lift_object"], rtol=0.06)
    np.testing.assert_allclose(coarse.images["area_object"], fine.images["area_object"], 1e-5)


def test_the_step_is_compiled_once_by_its_warm_up(small_dataset, tmp_path, monkeypatch):
    """The warm-up on zeros traces the very program the real (and padded) batches use, so
    the measuring loop's timings are steady state."""
    manifest, model_path = small_dataset
    steps = []
    original = AuditStep.warm_up

    def recorded(self):
        steps.append(self)
        return original(self)

    monkeypatch.setattr(AuditStep, "warm_up", recorded)
    config = config_for(manifest, model_path, tmp_path, batch_size=7)  # 72 rows: a padded batch
    result = run_audit(config, progress=False)
    (step,) = steps
    assert step.program.traces == 1
    timings = result.manifest["timings"]
    assert timings["measured_rows"] == 72 and timings["trace_seconds"] > 0
    assert 0 < timings["compute_seconds"] <= timings["measure_seconds"] <= timings["pass_seconds"]
    # Every compiled program is counted: the step once in the pass; after it, at least
    # the analysis's own engine (issue 28 removes that second compile). The run's
    # summary says so.
    assert timings["compiles"]["pass"] == 1
    assert timings["compiles"]["analysis"] >= 1
    from audit.report.summary import format_summary

    report = json.loads((result.run_dir / "report.json").read_text())
    assert "compiled programs: pass 1, analysis" in format_summary(report, result.manifest)


def test_a_run_is_never_resumed_on_another_keras_backend(small_dataset, tmp_path, monkeypatch):
    manifest, model_path = small_dataset
    config = config_for(manifest, model_path, tmp_path)
    original = RunStore.write_chunk

    def dies_after_one_chunk(self, chunk, *args, **kwargs):
        if chunk > 0:
            raise KeyboardInterrupt("killed")
        return original(self, chunk, *args, **kwargs)

    monkeypatch.setattr(RunStore, "write_chunk", dies_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        run_audit(config, progress=False)
    monkeypatch.setattr(RunStore, "write_chunk", original)
    (run_dir,) = tmp_path.iterdir()
    store = RunStore(run_dir)
    versions = store.manifest()["versions"]
    assert versions["keras_backend"] == keras.backend.backend()
    store.update_manifest(versions=versions | {"keras_backend": "jax"})  # as if started on JAX
    with pytest.raises(ConfigError, match="KERAS_BACKEND=jax"):
        run_audit(config, resume=True, progress=False)
    assert store.done_chunks() == {0}  # nothing was added to the run
    # A finished run of another backend is returned, and says so.
    store.update_manifest(versions=versions)
    run_audit(config, resume=True, progress=False)  # finished on this backend
    store.update_manifest(versions=versions | {"keras_backend": "jax"})
    with pytest.warns(UserWarning, match="computed on Keras' 'jax' backend"):
        assert run_audit(config, resume=True, progress=False).reused


def test_the_pointing_tolerance_is_counted_in_grid_cells_per_axis(tmp_path):
    from audit.engine.explain import GradCAM

    inputs = keras.Input((224, 112, 3))
    x = keras.layers.Conv2D(4, 3, strides=16, activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))

    def step(tolerance):
        config = config_for("m.csv", "m.keras", tmp_path, metrics={"pointing_tolerance": tolerance})
        return AuditStep(GradCAM(model), config, (224, 112))

    # A 64x32 measuring grid for 224x112 images: 3.5 pixels a cell on both axes.
    assert step(7).metric_size == (64, 32) and step(7).pointing_cells == (2, 2)
    with pytest.warns(UserWarning, match="under half a cell .* has no effect; use at least 2 px"):
        assert step(1).pointing_cells == (0, 0)
    assert step(2).pointing_cells == (1, 1)  # the suggestion works
    # Exactly half a cell (2 px a cell at 128x64) rounds up, so the suggestion holds.
    config = config_for("m.csv", "m.keras", tmp_path, metrics={"pointing_tolerance": 1})
    half = AuditStep(GradCAM(model), config, (128, 64))
    assert half.metric_size == (64, 32) and half.pointing_cells == (1, 1)


def one_conv_model(channels: int, outputs: int, activation: str | None) -> keras.Model:
    """A 1x1 conv on the input's mean brightness (the digit's white strokes), pooled,
    then ``outputs`` scores whose weights rise with the class index."""
    inputs = keras.Input((48, 48, channels))
    ink = keras.layers.Conv2D(1, 1, activation="relu", name="ink")
    dense = keras.layers.Dense(outputs, activation=activation)
    model = keras.Model(inputs, dense(keras.layers.GlobalAveragePooling2D()(ink(inputs))))
    ink.set_weights([np.full((1, 1, channels, 1), 1 / channels, "float32"), np.array([-0.5])])
    dense.set_weights([np.linspace(-4, 4, outputs, dtype="float32")[None] * 40, np.zeros(outputs)])
    return model


def _decoded(manifest, rows: int, mode: str) -> np.ndarray:
    from PIL import Image

    paths = pd.read_csv(manifest)["path"].iloc[:rows]
    pixels = [np.asarray(Image.open(manifest.parent / p).convert(mode), "float32") for p in paths]
    return np.stack(pixels).reshape(rows, 48, 48, -1) / 255


def test_a_greyscale_model_is_audited_on_grey_images(small_dataset, tmp_path):
    manifest, _ = small_dataset
    model = one_conv_model(channels=1, outputs=10, activation="softmax")
    model.save(tmp_path / "grey.keras")
    config = config_for(
        manifest,
        tmp_path / "grey.keras",
        tmp_path / "runs",
        dataset={"limit": 16},
        preprocess={
            "resize": "pillow"
        },  # Pillow's decoder: its luma (Keras' is tests/test_resize.py)
    )
    images = run_audit(config, progress=False).images
    assert (images["status"] == "ok").all() and images["mass_object"].median() > 0.9
    # The model saw Pillow's luma ("L") of each image, scaled by 1/255.
    expected = model.predict(_decoded(manifest, 16, "L"), verbose=0)
    np.testing.assert_allclose(images["confidence"], expected.max(axis=1), rtol=1e-4)
    assert (images["pred"] == expected.argmax(axis=1)).all()


def test_a_models_input_channels_are_checked_before_a_run_folder_is_made(small_dataset, tmp_path):
    data, _ = small_dataset
    grey, four = tmp_path / "grey.keras", tmp_path / "rgba.keras"
    one_conv_model(channels=1, outputs=10, activation=None).save(grey)
    one_conv_model(channels=4, outputs=10, activation=None).save(four)
    store = tmp_path / "runs"
    cases = [
        (grey, {"mean": [0.5, 0.5, 0.5]}, r"preprocess\.mean has 3 values.*1 channel;"),
        (grey, {"keras_preprocess": "mobilenet_v2"}, "expects RGB.*one channel"),
        (four, {}, "4 channels.*RGB.*or grey"),
    ]
    for model_path, preprocess, message in cases:
        config = config_for(data, model_path, store, preprocess=preprocess)
        with pytest.raises(ConfigError, match=message):
            run_audit(config, progress=False)
    assert not store.exists()
    with pytest.raises(ConfigError, match="preprocess.std: one value per channel"):
        config_for(data, grey, store, preprocess={"std": [0.5, 0.5]})


def test_a_one_output_binary_classifier_is_audited_as_two_classes(small_dataset, tmp_path):
    """Dense(1, sigmoid), labels 0 and 1: p = sigmoid(z) is class 1's probability; class
    1's map is z's Grad-CAM, class 0's that of -z."""
    manifest, _ = small_dataset
    binary = manifest.parent / "binary.csv"
    table = pd.read_csv(manifest)
    table[table["label"].isin([0, 1])].to_csv(binary, index=False)
    pixels = _decoded(binary, int(table["label"].isin([0, 1]).sum()), "RGB")
    model = one_conv_model(channels=3, outputs=1, activation="sigmoid")
    # z = 160 (ink - its mean): more ink, more class 1; both classes predicted.
    ink = keras.Model(model.inputs, model.layers[-2].output).predict(pixels, verbose=0)
    model.layers[-1].set_weights([np.array([[160.0]]), np.array([-160 * ink.mean()])])
    model.save(tmp_path / "binary.keras")
    result = run_audit(config_for(binary, tmp_path / "binary.keras", tmp_path), progress=False)
    images = result.images
    assert result.manifest["class_names"] == ["0", "1"]
    assert result.manifest["model"]["softmax_bypassed"]
    assert (images["status"] == "ok").all() and len(images) == len(pixels)
    probability = model.predict(pixels, verbose=0)[:, 0]
    assert 0 < (probability > 0.5).mean() < 1  # both classes are predicted
    np.testing.assert_allclose(
        images["confidence"], np.maximum(probability, 1 - probability), rtol=1e-4
    )
    assert (images["pred"] == (probability > 0.5)).all()
    ones = images["label_index"] == 1
    assert images.loc[ones, "mass_object"].min() > 0.9  # z rises with the strokes' ink
    assert (images.loc[~ones, "cam_total"] == 0).all()  # -z has no positive evidence


def test_a_multi_label_model_records_its_own_sigmoids(small_dataset, tmp_path):
    """Dense(10, sigmoid): the recorded confidence is the model's own output for the
    predicted class, not a softmax over its logits."""
    manifest, _ = small_dataset
    model = one_conv_model(channels=3, outputs=10, activation="sigmoid")
    model.save(tmp_path / "multi.keras")
    result = run_audit(config_for(manifest, tmp_path / "multi.keras", tmp_path), progress=False)
    images = result.images
    assert result.manifest["model"]["multi_label"]
    assert result.manifest["model"]["softmax_bypassed"]
    assert (images["status"] == "ok").all()
    outputs = model.predict(_decoded(manifest, len(images), "RGB"), verbose=0)
    assert 0 < outputs.max(axis=1).min() < 0.99  # some rows are unsure under sigmoids
    np.testing.assert_allclose(images["confidence"], outputs.max(axis=1), rtol=1e-4, atol=1e-6)
    assert (images["pred"] == outputs.argmax(axis=1)).all()


def test_an_audit_warns_when_the_scores_look_like_probabilities(small_dataset, tmp_path):
    """A model ending in a softmax written out as exp / sum: the audit goes on, and says
    that it explains probabilities."""
    manifest, _ = small_dataset
    inputs = keras.Input((48, 48, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    exp = keras.ops.exp(keras.layers.Dense(10)(pooled))
    model = keras.Model(inputs, exp / keras.ops.sum(exp, axis=-1, keepdims=True))
    model.save(tmp_path / "written_out.keras")
    config = config_for(manifest, tmp_path / "written_out.keras", tmp_path)
    with pytest.warns(UserWarning, match="look like probabilities") as caught:
        result = run_audit(config, progress=False)
    assert (result.images["status"] == "ok").all()
    assert not result.manifest["model"]["softmax_bypassed"]
    # Once: the pass's engine and the analysis's share the model's one check.
    assert sum("look like probabilities" in str(w.message) for w in caught) == 1


def test_classes_too_small_for_any_test_are_shown_untested(small_dataset, tmp_path):
    """Every class below min_support: ok is no evidence of health, and the reports and
    the gate say so."""
    import json

    from audit.cli.run import format_gate
    from audit.report.markdown import render_markdown

    manifest, model_path = small_dataset
    config = config_for(manifest, model_path, tmp_path, dataset={"limit": 24})
    result = run_audit(config, progress=False)
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["outcome"] == "INCONCLUSIVE"  # no PASS without evidence
    assert all(entry["tested"] is False for entry in report["classes"])
    assert "| ok (untested) |" in render_markdown(report)
    # Class 8 has no image among the first 24 rows: not one of the audited classes.
    note = "9 of the 9 audited classes untested: 0, 1, 2"
    assert note in (result.run_dir / "report.html").read_text()
    gate = format_gate(report)
    assert gate.startswith(f"INCONCLUSIVE: 0 bias-driven, 0 suspected, 10 ok; {note}")
    assert "fewer than 20 measured" in gate and "1 class(es) with no audited image: 8" in gate
    # Enough images and tests: no class is untested.
    report["classes"][0]["tested"] = True
    assert "8 of the 9 audited classes untested: 1, 2" in format_gate(report)
