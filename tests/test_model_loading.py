"""Models teams audit: Keras Hub classifiers (with or without their preprocessor),
custom layers imported on purpose, one output of a multi-output model; several
inputs refused. Each with the error that says what to do."""

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from zoo_models import hub_vit_backbone

from audit import GradCAM, ModelStructureError, load_model
from audit.cli.run import overrides_from, parser
from audit.config import AuditConfig, ConfigError, build_config
from audit.engine.models import load_for_config

ROOT = Path(__file__).resolve().parents[1]


def _child(script: str, *args: str, pythonpath: tuple[str, ...] = ()) -> str:
    """Run ``script`` in a fresh Python (nothing imported yet); its stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join((str(ROOT), *pythonpath)))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _config(model_path: Path, **sections) -> AuditConfig:
    model = {"path": str(model_path), **sections.pop("model", {})}
    return build_config({"model": model, "dataset": {"folders": "images"}, **sections})


# ---------------------------------------------------------------- Keras Hub classifiers


@pytest.fixture(scope="module")
def hub_models(tmp_path_factory):
    """A tiny ViT and a tiny ResNet Keras Hub classifier with random weights and an
    image converter each, saved as .keras; 0..255 pixels; what each task predicts for
    them and what its converter makes of them."""
    keras_hub = pytest.importorskip("keras_hub")
    folder = tmp_path_factory.mktemp("hub")
    keras.utils.set_random_seed(3)
    vit = keras_hub.models.ViTImageClassifier(
        backbone=hub_vit_backbone(keras_hub),
        num_classes=3,
        activation="softmax",
        preprocessor=keras_hub.models.ViTImageClassifierPreprocessor(
            image_converter=keras_hub.layers.ViTImageConverter(
                image_size=(32, 32), scale=1 / 127.5, offset=-1.0
            )
        ),
    )
    resnet = keras_hub.models.ResNetImageClassifier(
        backbone=keras_hub.models.ResNetBackbone(
            input_conv_filters=[64],
            input_conv_kernel_sizes=[3],
            stackwise_num_filters=[64],
            stackwise_num_blocks=[1],
            stackwise_num_strides=[1],
            block_type="basic_block",
            image_shape=(32, 32, 3),
        ),
        num_classes=3,
        preprocessor=keras_hub.models.ResNetImageClassifierPreprocessor(
            # ImageNet's mean and standard deviation, per channel.
            image_converter=keras_hub.layers.ResNetImageConverter(
                image_size=(32, 32),
                scale=[1 / (255 * 0.229), 1 / (255 * 0.224), 1 / (255 * 0.225)],
                offset=[-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225],
            )
        ),
    )
    pixels = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3)).astype("float32")
    np.save(folder / "pixels.npy", pixels)
    expected = {}
    for name, task in (("vit", vit), ("resnet", resnet)):
        task.save(folder / f"{name}.keras")
        converted = np.asarray(task.preprocessor.image_converter(pixels))
        np.save(folder / f"{name}_converted.npy", converted)
        expected[name] = task.predict(pixels, verbose=0)
    return folder, pixels, expected


def test_hub_classifiers_load_in_safe_mode_in_a_fresh_process(hub_models):
    folder, _, expected = hub_models
    _child(
        """
        import sys

        import numpy as np

        from audit import load_model

        assert "keras_hub" not in sys.modules
        folder = sys.argv[1]
        pixels = np.load(f"{folder}/pixels.npy")
        out = {}
        for name in ("vit", "resnet"):
            applied = load_model(f"{folder}/{name}.keras")  # safe mode, preprocessor applied
            skipped = load_model(f"{folder}/{name}.keras", preprocessor="skip")
            out[f"{name}_apply"] = applied.predict(pixels, verbose=0)
            converted = np.load(f"{folder}/{name}_converted.npy")
            out[f"{name}_skip"] = skipped.predict(converted, verbose=0)
            out[f"{name}_input"] = np.array(applied.input_shape[1:])
        np.savez(f"{folder}/loaded.npz", **out)
        """,
        str(folder),
    )
    loaded = np.load(folder / "loaded.npz")
    for name in ("vit", "resnet"):
        # apply: 0..255 pixels in, the task's own predictions (converter included) out.
        np.testing.assert_allclose(loaded[f"{name}_apply"], expected[name], rtol=1e-5, atol=1e-6)
        # skip: the classifier alone, fed what the converter makes of the pixels.
        np.testing.assert_allclose(loaded[f"{name}_skip"], expected[name], rtol=1e-5, atol=1e-6)
        assert loaded[f"{name}_input"].tolist() == [32, 32, 3]  # the converter's image size
    assert np.allclose(expected["vit"].sum(axis=1), 1)  # the ViT's softmax probabilities
    assert np.ptp(expected["resnet"], axis=0).max() > 1e-3  # images scored apart


def test_applied_preprocessor_is_a_graph_the_engine_cuts(hub_models):
    folder, pixels, _ = hub_models
    model = load_model(folder / "resnet.keras")
    cam = GradCAM(model)
    # Inside the nested backbone, behind the converter's scale and offset.
    # (names as Keras gave them: a "_1" suffix when the process made a model before)
    classifier, backbone, _ = cam.layer_path.split("/")
    assert classifier.startswith("res_net_image_classifier")
    assert backbone.startswith("res_net_backbone")
    maps = cam.explain(pixels)
    assert maps.shape[0] == len(pixels) and np.isfinite(maps).all()
    assert maps.reshape(len(pixels), -1).std(axis=1).min() > 0  # gradients reach the map
    # A task model would preprocess again in predict(): neither choice returns one.
    task = pytest.importorskip("keras_hub").models.Task
    skipped = load_model(folder / "resnet.keras", preprocessor="skip")
    assert not isinstance(model, task) and not isinstance(skipped, task)


def test_applied_preprocessor_sets_preprocess_scale_to_one(hub_models):
    folder = hub_models[0]
    model, config = load_for_config(_config(folder / "resnet.keras"))
    assert config.preprocess.scale == 1 and config.preprocess.mean is None
    assert model.input_shape == (None, 32, 32, 3)
    assert load_for_config(config)[1] == config  # the Ray workers load it once more
    # skip: the classifier alone, and the preprocess section as written.
    skip = _config(
        folder / "resnet.keras",
        model={"preprocessor": "skip"},
        preprocess={"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    )
    assert load_for_config(skip)[1] == skip


def test_applied_preprocessor_refuses_a_second_scaling(hub_models):
    folder = hub_models[0]
    config = _config(folder / "vit.keras", preprocess={"mean": [0.5, 0.5, 0.5]})
    with pytest.raises(ConfigError, match=r"remove preprocess\.mean.*model\.preprocessor: skip"):
        load_for_config(config)
    config = _config(folder / "vit.keras", preprocess={"keras_preprocess": "resnet50"})
    with pytest.raises(ConfigError, match=r"remove preprocess\.keras_preprocess"):
        load_for_config(config)


def test_hub_model_without_keras_hub_says_what_to_install(tmp_path, monkeypatch):
    # The file's config names a Keras Hub class (no weights needed to get that far).
    path = tmp_path / "hub.keras"
    config = {
        "module": "keras_hub.src.models.vit.vit_image_classifier",
        "class_name": "ViTImageClassifier",
        "config": {},
    }
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps(config))
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # import keras_hub fails
    with pytest.raises(ModelStructureError, match=r"hub\.keras is a Keras Hub model "):
        load_model(path)
    with pytest.raises(ModelStructureError, match=r"\(pip install keras-hub\)"):
        load_model(path)


# ---------------------------------------------------------------- plain Keras models


def _plain_model(path: Path) -> Path:
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(2, name="classes")(x)).save(path)
    return path


def test_plain_models_load_as_before_and_refuse_apply(tmp_path):
    path = _plain_model(tmp_path / "plain.keras")
    model, config = load_for_config(_config(path))
    assert config.preprocess.scale == pytest.approx(1 / 255)  # the section as written
    assert load_model(path, preprocessor="skip").output_names == ["classes"]
    with pytest.raises(ModelStructureError, match="carries no Keras Hub preprocessor"):
        load_model(path, preprocessor="apply")
    # Its one output may be named; any other name is a mistake (--output for --out).
    assert load_model(path, output="classes").output_names == ["classes"]
    with pytest.raises(ModelStructureError, match=r"'runs' names no output.*'classes'"):
        load_model(path, output="runs")


# ---------------------------------------------------------------- custom layers


CUSTOM_LAYERS = """
import keras


@keras.saving.register_keras_serializable(package="audit_test_layers")
class Doubled(keras.layers.Layer):
    def call(self, inputs):
        return inputs * 2.0
"""


def test_custom_layers_load_in_safe_mode_from_the_named_module(tmp_path, monkeypatch):
    package = tmp_path / "code" / "audit_test_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "layers.py").write_text(CUSTOM_LAYERS)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    from audit_test_pkg.layers import Doubled

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(2, 3, name="conv")(Doubled(name="doubled")(inputs))
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    model.save(tmp_path / "custom.keras")
    images = np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype("float32")
    np.save(tmp_path / "images.npy", images)
    out = _child(
        """
        import json
        import sys

        import numpy as np

        from audit import ModelStructureError, load_model

        path, images = sys.argv[1], np.load(sys.argv[2])
        errors = {}
        for name, modules in (("none", ()), ("missing", "audit_test_missing.layers")):
            try:
                load_model(path, custom_objects=modules)
            except ModelStructureError as error:
                errors[name] = str(error)
        model = load_model(path, custom_objects=["audit_test_pkg.layers"])  # safe mode
        errors["scores"] = model.predict(images, verbose=0).tolist()
        print(json.dumps(errors))
        """,
        str(tmp_path / "custom.keras"),
        str(tmp_path / "images.npy"),
        pythonpath=(str(tmp_path / "code"),),
    )
    result = json.loads(out.strip().splitlines()[-1])
    # Not imported: the class, the module the file names, and the key to set.
    assert "class 'Doubled'" in result["none"] and "'audit_test_pkg.layers'" in result["none"]
    assert "model.custom_objects" in result["none"]
    assert "cannot import the module 'audit_test_missing.layers'" in result["missing"]
    assert "PYTHONPATH" in result["missing"]
    np.testing.assert_allclose(result["scores"], model.predict(images, verbose=0), rtol=1e-6)


def test_custom_objects_config_takes_a_module_or_a_list():
    path = Path("m.keras")
    assert _config(path, model={"custom_objects": "a.b"}).model.custom_objects == ("a.b",)
    listed = _config(path, model={"custom_objects": ["a", "b.c"]}).model.custom_objects
    assert listed == ("a", "b.c")
    with pytest.raises(ConfigError, match=r"model\.custom_objects: 'my-pkg' is not a Python"):
        _config(path, model={"custom_objects": "my-pkg"})
    with pytest.raises(ConfigError, match=r"model\.preprocessor"):
        _config(path, model={"preprocessor": "always"})


# ---------------------------------------------------------------- outputs and inputs


def _two_outputs(as_dict: bool) -> keras.Model:
    keras.utils.set_random_seed(5)
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    classes = keras.layers.Dense(3, activation="softmax", name="classes")(x)
    box = keras.layers.Dense(4, name="box")(x)
    return keras.Model(inputs, {"label": classes, "bbox": box} if as_dict else [classes, box])


@pytest.mark.parametrize(("as_dict", "name"), [(False, "classes"), (True, "label")])
def test_multi_output_models_audit_the_named_output(tmp_path, as_dict, name):
    model = _two_outputs(as_dict)
    path = tmp_path / "two.keras"
    model.save(path)
    with pytest.raises(ModelStructureError, match=r"has 2 outputs .*model\.output") as error:
        load_model(path)
    names = ["classes", "box", "label", "bbox"] if as_dict else ["classes", "box"]
    assert all(f"'{output}'" in str(error.value) for output in names)
    with pytest.raises(ModelStructureError, match=r"'scores' names no output.*'classes'"):
        load_model(path, output="scores")
    chosen = load_model(path, output=name)
    images = np.random.default_rng(5).uniform(size=(3, 8, 8, 3)).astype("float32")
    everything = model.predict(images, verbose=0)
    classes = everything["label"] if as_dict else everything[0]
    np.testing.assert_allclose(chosen.predict(images, verbose=0), classes, rtol=1e-6)
    cam = GradCAM(chosen)
    assert cam.layer_path == "conv" and cam.num_classes == 3 and cam.softmax_bypassed


def test_output_flag_sets_model_output():
    args = parser().parse_args(["--model", "m.keras", "--data", "d.csv", "--output", "classes"])
    assert overrides_from(args)["model"]["output"] == "classes"


def test_multi_input_models_are_refused_with_the_reason(tmp_path):
    image = keras.Input((8, 8, 3), name="image")
    meta = keras.Input((2,), name="meta")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(image))
    outputs = keras.layers.Dense(2)(keras.layers.Concatenate()([x, meta]))
    keras.Model([image, meta], outputs).save(tmp_path / "two_inputs.keras")
    with pytest.raises(
        ModelStructureError,
        match=r"takes 2 inputs \('image', 'meta'\).*one image.*single-input",
    ):
        load_model(tmp_path / "two_inputs.keras")
