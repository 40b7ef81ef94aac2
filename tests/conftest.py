"""Shared fixtures: small models built or trained in seconds on data packages ship."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402


@pytest.fixture(scope="session")
def digits_images():
    """scikit-learn's 8x8 digits upsampled to 24x24 RGB in [0, 1], with labels."""
    digits = load_digits()
    images = digits.images.astype("float32") / 16.0
    images = np.kron(images, np.ones((3, 3), dtype="float32"))  # 8x8 -> 24x24, nearest
    images = np.repeat(images[..., None], 3, axis=-1)
    return images, digits.target.astype("int32")


def small_cnn(num_classes: int = 10, softmax: bool = True) -> keras.Model:
    inputs = keras.Input((24, 24, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(
        num_classes, activation="softmax" if softmax else None, name="classifier"
    )(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def ink_model() -> keras.Model:
    """Looks only at the bright digit strokes: a 1x1 conv firing on near-white pixels."""
    inputs = keras.Input((48, 48, 3))
    ink = keras.layers.Conv2D(1, 1, activation="relu", name="ink")
    pooled = keras.layers.GlobalAveragePooling2D()(ink(inputs))
    dense = keras.layers.Dense(10, activation="softmax", name="classes")
    model = keras.Model(inputs, dense(pooled))
    ink.set_weights([np.full((1, 1, 3, 1), 1 / 3, "float32"), np.array([-0.75], "float32")])
    dense.set_weights([np.linspace(1, 2, 10, dtype="float32")[None], np.zeros(10, "float32")])
    return model


@pytest.fixture(scope="session")
def trained_cnn(digits_images):
    """A small CNN trained for a few seconds on digits (about 80% training accuracy)."""
    keras.utils.set_random_seed(0)
    images, labels = digits_images
    model = small_cnn()
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(images, labels, epochs=15, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="session")
def biased_demo(tmp_path_factory):
    """The demo's biased model and audit set, audited once (about 25 s)."""
    from audit.config import build_config
    from audit.run import run_audit
    from pipelines.demo import CLASS_NAMES, prepare_demo

    root = tmp_path_factory.mktemp("biased_demo")
    files = prepare_demo(root)
    config = build_config(
        {
            "model": {"path": str(files.model), "class_names": CLASS_NAMES},
            "dataset": {"manifest": str(files.manifest)},
            "output": {"store": str(root / "runs")},
        }
    )
    return files, config, run_audit(config, progress=False)
