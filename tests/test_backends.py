"""The engine on the JAX and PyTorch backends equals the TensorFlow reference on the same
model and weights.

Keras picks its backend once per process, so each run is a child process with
``KERAS_BACKEND`` set that loads the ``.keras`` file this (TensorFlow) process saved.
JAX comes with the test extras; ``.ci/run`` also installs PyTorch's CPU build.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import small_cnn

from audit import GradCAM

OTHER_BACKENDS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            importlib.util.find_spec(name) is None, reason=f"{name} is not installed"
        ),
    )
    for name in ("jax", "torch")
]
ONE_PASS_METHODS = ("gradcam", "hirescam", "gradcam++", "xgradcam", "layercam")
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
    np.savez(out_path, **out)
    """
).replace("METHODS", repr(ONE_PASS_METHODS))


def _normalised(maps):
    peak = np.abs(maps).reshape(len(maps), -1).max(axis=1)
    return maps / np.maximum(peak, 1e-12)[:, None, None]


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
    for key in [*ONE_PASS_METHODS, *(m + "_up" for m in ONE_PASS_METHODS), "counterfactual"]:
        assert tf_maps[key].shape == other[key].shape
        assert np.abs(tf_maps[key]).max() > 0, key  # a real comparison, not of zeros
        np.testing.assert_allclose(
            _normalised(other[key]), _normalised(tf_maps[key]), atol=1e-4, err_msg=key
        )
    np.testing.assert_array_equal(other["predictions"], tf_maps["predictions"])
    np.testing.assert_allclose(
        _normalised(other["predicted_maps"]), _normalised(tf_maps["predicted_maps"]), atol=1e-4
    )
    # The known-answer test of the engine holds on each backend.
    for maps in (tf_maps, other):
        np.testing.assert_allclose(maps["gradcam"], maps["closed_form"], rtol=1e-4, atol=1e-6)
    # And this process's own (TensorFlow) engine agrees with its child.
    model = keras.saving.load_model(paths[layout])
    here = GradCAM(model).explain(images, np.arange(len(images)) % 3)
    np.testing.assert_allclose(here, tf_maps["gradcam"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_the_audit_pipeline_asks_for_tensorflow_on_other_backends(models, backend, tmp_path):
    paths, _, _ = models
    script = textwrap.dedent(
        f"""
        from audit.config import ConfigError, build_config
        from audit.pipeline import run_audit
        config = build_config({{"model": {{"path": {str(paths["flat"])!r}}},
                               "dataset": {{"manifest": "missing.csv"}}}})
        try:
            run_audit(config, progress=False)
        except ConfigError as error:
            print("REFUSED", error)
        """
    )
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert "REFUSED" in done.stdout and "KERAS_BACKEND=tensorflow" in done.stdout, done.stderr
