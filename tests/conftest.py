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


@pytest.fixture(scope="session")
def trained_cnn(digits_images):
    """A small CNN trained for a few seconds on digits (about 80% training accuracy)."""
    keras.utils.set_random_seed(0)
    images, labels = digits_images
    model = small_cnn()
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(images, labels, epochs=15, batch_size=32, verbose=0)
    return model
