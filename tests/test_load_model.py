"""Loading models for an audit: formats, safe mode, clear errors."""

import keras
import numpy as np
import pytest
from conftest import small_cnn

from audit import GradCAM, ModelStructureError, load_model


@pytest.fixture
def model_and_images():
    keras.utils.set_random_seed(7)
    images = np.random.default_rng(7).uniform(size=(4, 24, 24, 3)).astype("float32")
    return small_cnn(), images


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_saved_models_load_and_explain_identically(tmp_path, model_and_images, suffix):
    model, images = model_and_images
    path = tmp_path / f"model{suffix}"
    model.save(path)
    loaded = load_model(path)
    np.testing.assert_allclose(
        GradCAM(loaded).explain(images), GradCAM(model).explain(images), rtol=1e-6
    )


def test_lambda_layers_are_refused_in_safe_mode(tmp_path):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    x = keras.layers.Conv2D(2, 3)(x)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(ModelStructureError, match="safe mode.*safe_mode=False"):
        load_model(path)
    assert load_model(path, safe_mode=False).count_params() > 0


def test_savedmodel_loads_for_prediction_but_cannot_be_explained(tmp_path, model_and_images):
    model, images = model_and_images
    path = tmp_path / "exported"
    model.export(path, verbose=False)
    loaded = load_model(path)
    (outputs,) = loaded(images).values()  # a SavedModel signature returns a dict
    np.testing.assert_allclose(outputs, model.predict(images, verbose=0), rtol=1e-5)
    with pytest.raises(ModelStructureError, match="SavedModel.*\\.keras"):
        GradCAM(loaded)


def test_bad_paths_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.keras"):
        load_model(tmp_path / "missing.keras")
    other = tmp_path / "model.pt"
    other.write_text("not a keras file")
    with pytest.raises(ModelStructureError, match="model.pt.*unsupported"):
        load_model(other)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelStructureError, match="not a TensorFlow SavedModel"):
        load_model(tmp_path / "folder")


def test_a_damaged_model_file_is_named_with_the_fix(tmp_path):
    import zipfile

    garbage = tmp_path / "garbage.keras"
    garbage.write_text("garbage\n")
    # Keras itself says "File not found" for a file that exists.
    with pytest.raises(
        ModelStructureError, match=r"cannot read model .*garbage\.keras: not a valid \.keras file"
    ):
        load_model(garbage)
    no_config = tmp_path / "no_config.keras"
    with zipfile.ZipFile(no_config, "w") as archive:
        archive.writestr("notes.txt", "not a model")
    with pytest.raises(ModelStructureError, match=r"no_config\.keras: not a valid \.keras file"):
        load_model(no_config)
    not_hdf5 = tmp_path / "model.h5"
    not_hdf5.write_text("garbage\n")
    with pytest.raises(ModelStructureError, match=r"model\.h5: not a valid \.h5 file"):
        load_model(not_hdf5)
