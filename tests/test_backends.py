"""The engine on the JAX and PyTorch backends equals the TensorFlow reference on the same
model and weights.

Keras picks its backend once per process, so each run is a child process with
``KERAS_BACKEND`` set that loads the ``.keras`` file this (TensorFlow) process saved.
JAX comes with the test extras; ``.ci/run`` also installs PyTorch's CPU build.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import small_cnn

from audit import GradCAM
from audit.runs.store import RunStore

OTHER_BACKENDS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            importlib.util.find_spec(name) is None, reason=f"{name} is not installed"
        ),
    )
    for name in ("jax", "torch")
]
METHODS = (
    "gradcam",
    "hirescam",
    "gradcam++",
    "gradcam++-authors",
    "xgradcam",
    "layercam",
    "eigencam",
    "scorecam",
    "scorecam-nobaseline",
)
ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import keras
    from audit import GradCAM, load_model

    model_path, images_path, out_path = sys.argv[1:4]
    model = load_model(model_path)
    images = np.load(images_path)
    targets = np.arange(len(images)) % 3
    out = {"backend": np.array(keras.backend.backend())}
    for method in METHODS:
        cam = GradCAM(model, method=method, batch_size=4)  # 10 images: a padded last batch
        out[method] = cam.explain(images, targets)
        out[method + "_up"] = cam.explain(images, targets, size=(20, 20))
    # Faster Score-CAM: the 8 of 32 channels of highest variance (top_k + gather).
    out["scorecam_top8"] = GradCAM(model, method="scorecam", score_channels=8).explain(
        images, targets
    )
    from audit.engine.guided import GuidedGradCAM
    out["guided"] = GuidedGradCAM(model, batch_size=4).explain(images, targets)
    details = GradCAM(model).explain_details(images)
    out["predicted_maps"], out["predictions"] = details.maps, details.predictions
    out["counterfactual"] = GradCAM(model, counterfactual=True).explain(images, targets)
    # Known answer: GAP + Dense head -> Grad-CAM = ReLU(sum_k w_kc / (h w) A_k).
    cut = GradCAM(model)._ensure_cut(None)
    activations = np.asarray(keras.ops.convert_to_numpy(cut.activations(images)))
    kernel = model.get_layer("classifier").get_weights()[0]
    h, w = activations.shape[1:3]
    closed = np.maximum(np.einsum("bhwc,cb->bhw", activations, kernel[:, targets]) / (h * w), 0)
    out["closed_form"] = closed
    # The on-device region metrics on hand-made arrays with many ties, a zero map and
    # an empty region (rank_acc needs the same stable sort on every backend).
    from audit.measure.metrics import region_metrics
    rng = np.random.default_rng(0)
    maps = rng.integers(0, 4, (6, 9, 9)).astype("float32")
    maps[0] = 0.0
    regions = (rng.random((6, 2, 9, 9)) > 0.6).astype("float32")
    regions[1, 1] = 0.0
    regions[2, 0] = 0.5 * (rng.random((9, 9)) > 0.5)  # coverage fractions
    for name, value in region_metrics(maps, regions, pointing_tolerance=1).items():
        out["metric_" + name] = keras.ops.convert_to_numpy(value)
    # The stored CAMs' area downscaling (maps larger than metrics.cam_size).
    from audit.engine.maps import area_downscale
    out["area"] = keras.ops.convert_to_numpy(area_downscale(maps, (5, 7)))
    np.savez(out_path, **out)
    """
).replace("METHODS", repr(METHODS))


def _normalised(maps):
    peak = np.abs(maps).reshape(len(maps), -1).max(axis=1)
    return maps / np.maximum(peak, 1e-12).reshape(-1, *[1] * (maps.ndim - 1))


def _explain_on(backend: str, model_path: Path, images_path: Path, out: Path) -> dict:
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(model_path), str(images_path), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(out))


@pytest.fixture(scope="module")
def models(tmp_path_factory, digits_images):
    root = tmp_path_factory.mktemp("backends")
    images, labels = digits_images
    keras.utils.set_random_seed(0)
    flat = small_cnn(num_classes=3)
    flat.compile("adam", "sparse_categorical_crossentropy")
    flat.fit(images[:300], labels[:300] % 3, epochs=3, verbose=0)
    # The same layers inside a nested base model (transfer-learning layout).
    base = keras.Model(flat.inputs, flat.get_layer("conv2").output, name="base")
    inputs = keras.Input(flat.input_shape[1:])
    pooled = keras.layers.GlobalAveragePooling2D()(base(inputs))
    classifier = keras.layers.Dense(3, activation="softmax", name="classifier")
    nested = keras.Model(inputs, classifier(pooled))
    classifier.set_weights(flat.get_layer("classifier").get_weights())
    paths = {"flat": root / "flat.keras", "nested": root / "nested.keras"}
    flat.save(paths["flat"])
    nested.save(paths["nested"])
    images_path = root / "images.npy"
    np.save(images_path, images[300:310])
    return paths, images_path, images[300:310]


@pytest.fixture(scope="module")
def tensorflow_maps(models, tmp_path_factory):
    paths, images_path, _ = models
    root = tmp_path_factory.mktemp("tensorflow_maps")
    return {
        layout: _explain_on("tensorflow", paths[layout], images_path, root / f"{layout}.npz")
        for layout in paths
    }


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_maps_equal_tensorflow_maps(models, tensorflow_maps, backend, layout, tmp_path):
    paths, images_path, images = models
    tf_maps = tensorflow_maps[layout]
    other = _explain_on(backend, paths[layout], images_path, tmp_path / f"{backend}.npz")
    assert str(other["backend"]) == backend and str(tf_maps["backend"]) == "tensorflow"
    keys = [*METHODS, *(m + "_up" for m in METHODS), "scorecam_top8", "counterfactual"]
    keys.append("guided")  # Guided Grad-CAM: a guided backward pass to the input
    for key in keys:
        assert tf_maps[key].shape == other[key].shape
        assert np.abs(tf_maps[key]).max() > 0, key  # a real comparison, not of zeros
        np.testing.assert_allclose(
            _normalised(other[key]), _normalised(tf_maps[key]), atol=1e-4, err_msg=key
        )
    np.testing.assert_array_equal(other["predictions"], tf_maps["predictions"])
    np.testing.assert_allclose(
        _normalised(other["predicted_maps"]), _normalised(tf_maps["predicted_maps"]), atol=1e-4
    )
    metrics = [key for key in tf_maps if key.startswith("metric_")]
    assert len(metrics) == 8  # six metrics, zero_map, empty
    for key in metrics:
        np.testing.assert_allclose(other[key], tf_maps[key], rtol=1e-6, err_msg=key)
    assert np.isnan(tf_maps["metric_mass"][0]).all() and tf_maps["metric_empty"][1, 1]
    np.testing.assert_allclose(other["area"], tf_maps["area"], rtol=1e-5, atol=1e-6)
    # The known-answer test of the engine holds on each backend.
    for maps in (tf_maps, other):
        np.testing.assert_allclose(maps["gradcam"], maps["closed_form"], rtol=1e-4, atol=1e-6)
    # And this process's own (TensorFlow) engine agrees with its child.
    model = keras.saving.load_model(paths[layout])
    here = GradCAM(model).explain(images, np.arange(len(images)) % 3)
    np.testing.assert_allclose(here, tf_maps["gradcam"], rtol=1e-5, atol=1e-7)


SHAPES_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import keras
    from audit import GradCAM, load_model

    folder, names = sys.argv[1], sys.argv[2:]
    images = np.load(f"{folder}/images.npy")
    targets = np.arange(len(images)) % 2
    out = {}
    for name in names:
        model = load_model(f"{folder}/{name}.keras")
        engines = {name: GradCAM(model, batch_size=4)}
        if name == "multilabel":  # Score-CAM's forward passes score the model's sigmoids
            engines["scorecam"] = GradCAM(
                model, method="scorecam", score_channels=None, batch_size=4
            )
        for stage in ("before", "after"):
            for key, cam in engines.items():
                details = cam.explain_details(images, targets)
                out[f"{key}_{stage}_maps"] = details.maps
                out[f"{key}_{stage}_probabilities"] = details.probabilities
            out[f"{name}_{stage}_outputs"] = keras.ops.convert_to_numpy(model(images))
            model.set_weights([w * 1.5 for w in model.get_weights()])  # as load_weights does
    np.savez(f"{folder}/{keras.backend.backend()}.npz", **out)
    """
)


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_binary_and_nested_softmax_models_on_other_backends(backend, tmp_path):
    """A one-output sigmoid classifier (two logits), a softmax inside a nested model and a
    multi-label model (a sigmoid per class; its Grad-CAM and Score-CAM maps) give
    TensorFlow's maps, and probabilities equal to the model's own outputs, also after
    the weights change under a reused engine."""
    keras.utils.set_random_seed(8)
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(pooled)).save(
        tmp_path / "binary.keras"
    )
    classifier = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(pooled))
    wrapped = keras.Sequential([keras.Input((12, 12, 3)), keras.layers.Rescaling(2.0), classifier])
    wrapped.save(tmp_path / "wrapped.keras")
    keras.Model(inputs, keras.ops.sigmoid(keras.layers.Dense(3)(pooled))).save(
        tmp_path / "multilabel.keras"
    )
    np.save(tmp_path / "images.npy", np.random.default_rng(8).uniform(size=(6, 12, 12, 3)))
    results = {}
    for name in ("tensorflow", backend):
        env = dict(os.environ, KERAS_BACKEND=name, PYTHONPATH=str(ROOT))
        command = [
            sys.executable,
            "-c",
            SHAPES_CHILD,
            str(tmp_path),
            "binary",
            "wrapped",
            "multilabel",
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        results[name] = dict(np.load(tmp_path / f"{name}.npz"))
    for out in results.values():
        for stage in ("before", "after"):
            probabilities = out[f"binary_{stage}_probabilities"]
            np.testing.assert_allclose(
                probabilities[:, 1], out[f"binary_{stage}_outputs"][:, 0], rtol=1e-5
            )
            for name in ("wrapped", "multilabel"):
                np.testing.assert_allclose(
                    out[f"{name}_{stage}_probabilities"], out[f"{name}_{stage}_outputs"], rtol=1e-5
                )
        changed = out["wrapped_after_probabilities"] - out["wrapped_before_probabilities"]
        assert np.abs(changed).max() > 1e-3
    for key, maps in results["tensorflow"].items():
        if key.endswith("_maps"):
            assert np.abs(maps).max() > 0, key
            np.testing.assert_allclose(
                _normalised(results[backend][key]), _normalised(maps), atol=1e-4, err_msg=key
            )


AUDIT_CHILD = textwrap.dedent(
    """
    import json, sys
    from audit.config import build_config
    from audit.run import run_audit

    result = run_audit(build_config(json.loads(sys.argv[1])), progress=False)
    print("RUN", result.run_dir)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_the_whole_audit_on_other_backends_equals_tensorflows(biased_demo, backend, tmp_path):
    """``run_audit`` (the step's region metrics, interventions, trust checks, flags) on
    JAX and PyTorch gives TensorFlow's records for the same model and data."""
    _, config, reference = biased_demo
    settings = config.model_dump(mode="json") | {"output": {"store": str(tmp_path / "runs")}}
    # Guided Grad-CAM's backward pass to the input too, though 48 px is under the size
    # where the report shows it.
    settings["trust"]["guided_min_side"] = 0
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", AUDIT_CHILD, json.dumps(settings)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    run = RunStore(Path(lines["RUN"]))
    assert run.manifest()["versions"]["keras_backend"] == backend
    guided = {int(path.stem) for path in (run.root / "guided").glob("*.png")}
    report = json.loads((run.root / "report.json").read_text())
    examples = {e["row"] for entry in report["classes"] for e in entry["examples"]}
    assert examples and guided == examples  # the report's example images, on this backend
    ours, theirs = reference.images, run.images()
    assert len(ours) == len(theirs) == run.manifest()["counts"]["rows"]
    assert (ours["row"].to_numpy() == theirs["row"].to_numpy()).all()
    assert (ours["status"] == theirs["status"]).all() and (ours["status"] == "ok").all()
    assert (ours["pred"] == theirs["pred"]).all()
    continuous = [
        c
        for c in ours.columns
        if c.split("_")[0] in ("confidence", "mass", "lift", "area", "cf", "cam")
        or c.startswith(("pred_mass", "true_mass", "target_score"))
    ]
    assert {"mass_background", "cf_mass_background", "confidence"} <= set(continuous)
    for column in continuous:
        np.testing.assert_allclose(
            theirs[column], ours[column], rtol=1e-3, atol=1e-3, err_msg=column
        )
    # Thresholded metrics may flip where a pixel sits at the threshold up to float noise.
    for column in ("pointing_object", "rank_acc_object", "iou_object", "loc_iou"):
        agree = np.isclose(theirs[column], ours[column], atol=1e-3, equal_nan=True)
        assert agree.mean() >= 0.98, column
    # The same flags, verdicts and trust verdict.
    key = ["kind", "class_index", "attribute", "value", "region", "statistic", "flagged"]
    pd.testing.assert_frame_equal(
        pd.read_parquet(run.root / "flags.parquet")[key],
        pd.read_parquet(reference.run_dir / "flags.parquet")[key],
    )
    reports = [json.loads((r / "report.json").read_text()) for r in (run.root, reference.run_dir)]
    verdicts = [{c["class_name"]: c["status"] for c in report["classes"]} for report in reports]
    assert verdicts[0] == verdicts[1] and "bias-driven" in verdicts[0].values()
    assert reports[0]["trust"]["verdict"] == reports[1]["trust"]["verdict"] == "trusted"


@pytest.mark.slow
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_the_ray_engine_on_other_backends_matches_the_local_engine(backend):
    """The Ray engine's equality test, run whole in a process on ``backend`` (the actors
    get the driver's backend through their runtime_env and refuse any other)."""
    pytest.importorskip("ray")
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_ray_engine.py::test_ray_engine_matches_the_local_engine",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-3000:]
