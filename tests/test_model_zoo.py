"""The models teams audit: any layer a user can name (inside a residual branch too),
Vision Transformers on their patch grid, and every keras.applications family, flat and
nested. Each map equals a full-graph Grad-CAM of its layer computed the Keras example's
way (a model that outputs the layer and the logits, ``tf.GradientTape``)."""

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
import zoo_models
from zoo_models import residual_cnn, tiny_vit

from audit import GradCAM, load_model
from audit.engine.guided import GuidedGradCAM
from audit.engine.maps import area_downscale
from audit.engine.models import ModelStructureError
from audit.engine.tokens import token_grid

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def full_graph_gradcam(model, layer: str, images, targets, logits: str = "logits"):
    """Grad-CAM of ``layer`` as the Keras example computes it: a model that outputs the
    layer's activations and the logits, and the gradient of each image's target logit
    (token layers: the patch tokens on their grid, the class token dropped)."""
    exposing = keras.Model(
        model.inputs, [model.get_layer(layer).output, model.get_layer(logits).output]
    )
    with tf.GradientTape() as tape:
        activations, scores = exposing(images)
        score = tf.reduce_sum(tf.gather(scores, targets, axis=1, batch_dims=1))
    gradients = tape.gradient(score, activations)
    activations, gradients = activations.numpy(), gradients.numpy()
    if activations.ndim == 3:  # hand-written token Grad-CAM
        prefix, rows, columns = token_grid(activations.shape[1])
        activations, gradients = (
            v[:, prefix:].reshape(len(v), rows, columns, -1) for v in (activations, gradients)
        )
    weights = gradients.mean(axis=(1, 2))
    return np.maximum(np.einsum("bhwc,bc->bhw", activations, weights), 0)


def assert_maps_equal(got, expected):
    """Equal to float32 rounding: within 2e-5 of the map's maximum (the features/head
    cut sums in another order than the full graph: up to 1.2e-5 measured here)."""
    scale = max(float(np.abs(expected).max()), 1e-12)
    np.testing.assert_allclose(got / scale, expected / scale, atol=2e-5)


TARGETS = np.array([0, 1, 2, 0, 1])


# ------------------------------------------------------------ residual branches


@pytest.mark.parametrize("layer", ["branch_conv", "branch_relu", "stem", "out_relu"])
def test_any_layer_equals_the_keras_example_inside_a_residual_branch_too(layer):
    model = residual_cnn()
    cam = GradCAM(model, layer=layer)
    expected = full_graph_gradcam(model, layer, zoo_models.images(), TARGETS)
    assert_maps_equal(cam.explain(zoo_models.images(), TARGETS), expected)
    assert expected.max() > 0
    # The fast features/head cut where a head starts at the layer; the whole model with
    # the layer exposed where the skip connection bypasses it.
    assert (cam._cut.exposed is not None) == layer.startswith("branch")


def test_a_bypassed_layer_inside_a_nested_base_equals_the_flat_model():
    flat = residual_cnn()
    base = keras.Model(flat.inputs, flat.get_layer("out_relu").output, name="base")
    inputs = keras.Input((32, 32, 3))
    head = [flat.get_layer(name) for name in ("pool", "logits", "probs")]
    x = base(inputs)
    for layer in head:
        x = layer(x)
    nested = keras.Model(inputs, x)
    cam = GradCAM(nested, layer="branch_relu")
    assert cam.layer_path == "base/branch_relu" and cam._cut.exposed is not None
    expected = full_graph_gradcam(flat, "branch_relu", zoo_models.images(), TARGETS)
    assert_maps_equal(cam.explain(zoo_models.images(), TARGETS), expected)


def test_a_layer_called_twice_or_never_is_refused():
    inputs = keras.Input((16, 16, 3))
    shared = keras.layers.Conv2D(4, 3, padding="same", name="shared")
    x = shared(keras.layers.Conv2D(3, 1, name="first")(inputs))
    x = keras.layers.Add()([x, keras.layers.Conv2D(4, 1, name="side")(inputs)])
    pooled = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(pooled))
    assert GradCAM(model, layer="first").explain(zoo_models.images(2, 16)).shape == (2, 16, 16)
    with pytest.raises(ModelStructureError, match="no layer 'nope'"):
        GradCAM(model, layer="nope")


# ------------------------------------------------------------ Vision Transformers


def test_a_vit_is_explained_on_its_patch_grid_at_its_last_attention_input():
    model = tiny_vit()
    cam = GradCAM(model)
    # The input of the last attention layer (pytorch-grad-cam's blocks[-1].norm1).
    assert cam.layer_path == "block2_ln1"
    maps = cam.explain(zoo_models.images(), TARGETS)
    assert maps.shape == (5, 4, 4) and maps.max() > 0
    assert_maps_equal(maps, full_graph_gradcam(model, "block2_ln1", zoo_models.images(), TARGETS))
    # A class-token head sees no patch token after the last attention layer: the
    # documented reason for the automatic choice.
    assert GradCAM(model, layer="encoder_norm").explain(zoo_models.images()).max() == 0


@pytest.mark.parametrize("layer", ["encoder_norm", "block1_add2", "block2_mha"])
def test_token_layers_equal_a_hand_written_token_gradcam(layer):
    model = tiny_vit(pooling="gap")
    maps = GradCAM(model, layer=layer).explain(zoo_models.images(), TARGETS)
    expected = full_graph_gradcam(model, layer, zoo_models.images(), TARGETS)
    assert expected.max() > 0
    assert_maps_equal(maps, expected)


def test_token_grids():
    assert token_grid(197) == (1, 14, 14)  # ViT-B/16 at 224: a class token
    assert token_grid(201) == (5, 14, 14)  # and four register tokens
    assert token_grid(196) == (0, 14, 14)  # no class token (mean pooling)
    assert token_grid(129, aspect=0.5) == (1, 8, 16)
    with pytest.raises(ModelStructureError, match="no patch grid"):
        token_grid(99)


def test_a_token_model_saves_loads_in_safe_mode_and_runs_the_audit(tmp_path, capsys):
    """Through `bias-audit run`: the automatic layer of a ViT, the maps the engine gives."""
    from audit.cli.main import main
    from pipelines.demo import write_dataset
    from pipelines.demo_data import make_demo_set

    model = tiny_vit(size=48, patch=8, classes=10)
    model.save(tmp_path / "vit.keras")
    loaded = load_model(tmp_path / "vit.keras")  # safe mode: a registered layer loads
    demo = make_demo_set(24, seed=4)
    np.testing.assert_allclose(
        GradCAM(loaded).explain(demo.images), GradCAM(model).explain(demo.images), atol=1e-6
    )
    manifest = write_dataset(demo, tmp_path / "data")
    argv = ["run", "--model", str(tmp_path / "vit.keras"), "--data", str(manifest)]
    argv += ["--out", str(tmp_path / "runs"), "--no-progress"]
    assert main(argv) in (0, 1)
    [run] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert json.loads((run / "manifest.json").read_text())["model"]["layer"] == "block2_ln1"
    images = pd.read_parquet(run / "images.parquet")
    assert (images["status"] == "ok").all() and images["mass_object"].notna().any()


# ------------------------------------------------------------ on every backend

CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[3])
    import zoo_models  # registers ClassToken
    from audit import GradCAM, load_model

    out = {}
    for name, layer in [("residual", "branch_relu"), ("residual", "stem"), ("vit", None)]:
        model = load_model(f"{sys.argv[1]}/{name}.keras")
        cam = GradCAM(model, layer=layer, batch_size=4)  # 5 images: a padded last batch
        out[f"{name}_{layer}"] = cam.explain(zoo_models.images(), np.array([0, 1, 2, 0, 1]))
        out[f"{name}_{layer}_gradcam++"] = GradCAM(model, layer=layer, method="gradcam++").explain(
            zoo_models.images()
        )
    np.savez(sys.argv[2], **out)
    """
)


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(
            name,
            marks=pytest.mark.skipif(
                importlib.util.find_spec(name) is None, reason=f"{name} is not installed"
            ),
        )
        for name in ("tensorflow", "jax", "torch")
    ],
)
def test_exposed_and_token_layers_on_every_backend(backend, tmp_path):
    residual_cnn().save(tmp_path / "residual.keras")
    tiny_vit().save(tmp_path / "vit.keras")
    expected = {}
    for name, layer in [("residual", "branch_relu"), ("residual", "stem"), ("vit", "block2_ln1")]:
        model = load_model(tmp_path / f"{name}.keras")
        key = f"{name}_{None if name == 'vit' else layer}"
        expected[key] = full_graph_gradcam(model, layer, zoo_models.images(), TARGETS)
    env = {"KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), str(tmp_path / "out.npz"), str(TESTS)],
        env={**__import__("os").environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    for key, maps in expected.items():
        assert_maps_equal(got[key], maps)
        assert np.isfinite(got[f"{key}_gradcam++"]).all()


# ------------------------------------------------------------ keras.applications

FAMILIES = {
    "ResNet50": (keras.applications.ResNet50, {}, "conv5_block3_2_relu"),
    "ResNet50V2": (keras.applications.ResNet50V2, {}, "conv5_block3_2_relu"),
    "VGG16": (keras.applications.VGG16, {}, "block4_conv3"),
    "EfficientNetB0": (keras.applications.EfficientNetB0, {}, "block6a_expand_activation"),
    "EfficientNetV2B0": (keras.applications.EfficientNetV2B0, {}, "block5a_expand_activation"),
    "ConvNeXtTiny": (
        keras.applications.ConvNeXtTiny,
        {},
        "convnext_tiny_stage_3_block_2_depthwise_conv",
    ),
    "MobileNetV2": (keras.applications.MobileNetV2, {"alpha": 0.35}, "block_15_project_BN"),
    "MobileNetV3Small": (
        keras.applications.MobileNetV3Small,
        {"minimalistic": True},
        "expanded_conv_6_project_bn",
    ),
    "DenseNet121": (keras.applications.DenseNet121, {}, "conv5_block16_1_relu"),
    "Xception": (keras.applications.Xception, {}, "block13_sepconv2_bn"),
    "InceptionV3": (keras.applications.InceptionV3, {}, "mixed2"),
    "InceptionResNetV2": (keras.applications.InceptionResNetV2, {}, "block35_5_conv"),
    "NASNetMobile": (keras.applications.NASNetMobile, {}, "normal_conv_1_6"),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_keras_applications_family_flat_nested_and_saved(family, tmp_path):
    build, options, inside = FAMILIES[family]
    # The smallest input each family takes, but 64 where a deep block would be 1x1.
    size = 75 if family.startswith("Inception") or family == "Xception" else 32
    size = 64 if family in ("MobileNetV3Small", "NASNetMobile") else size
    keras.utils.set_random_seed(0)
    base = build(include_top=False, weights=None, input_shape=(size, size, 3), **options)
    head = [
        keras.layers.GlobalAveragePooling2D(name="pool"),
        keras.layers.Dense(3, name="logits"),
        keras.layers.Activation("softmax", name="probs"),
    ]
    x = base.output
    for layer in head:
        x = layer(x)
    flat = keras.Model(base.inputs, x)  # the reference's: every layer in one graph
    inputs = keras.Input((size, size, 3))
    x = base(inputs)
    for layer in head:
        x = layer(x)
    nested = keras.Model(inputs, x)  # a transfer-learning model: the base nested
    images = np.random.default_rng(1).uniform(0, 255, (2, size, size, 3)).astype("float32")
    targets = np.array([0, 2])
    # The automatic layer: the last feature map, what the pooling reads.
    cam = GradCAM(nested)
    automatic = cam.layer_path.split("/", 1)[1]
    assert cam.layer_path == f"{base.name}/{automatic}"
    expected = full_graph_gradcam(flat, automatic, images, targets)
    assert_maps_equal(cam.explain(images, targets), expected)
    # A layer deep inside a block (a skip connection bypasses it where the family has
    # one), after a save/load round trip in safe mode.
    nested.save(tmp_path / "model.keras")
    loaded = GradCAM(load_model(tmp_path / "model.keras"), layer=inside)
    # Random weights: explain each image's class whose map there is not all zero.
    per_class = [full_graph_gradcam(flat, inside, images, np.full(2, k)) for k in range(3)]
    targets = np.argmax([maps.max(axis=(1, 2)) for maps in per_class], axis=0)
    expected = full_graph_gradcam(flat, inside, images, targets)
    assert (expected.max(axis=(1, 2)) > 0).all()
    assert_maps_equal(loaded.explain(images, targets), expected)


def test_the_audit_pass_stores_the_maps_of_a_layer_inside_a_residual_branch(tmp_path):
    from audit.cli.main import main
    from pipelines.demo import write_dataset
    from pipelines.demo_data import make_demo_set

    model = residual_cnn(size=48, classes=10)
    model.save(tmp_path / "residual.keras")
    demo = make_demo_set(16, seed=5)
    manifest = write_dataset(demo, tmp_path / "data")
    argv = ["run", "--model", str(tmp_path / "residual.keras"), "--data", str(manifest)]
    argv += ["--out", str(tmp_path / "runs"), "--layer", "branch_relu", "--no-progress"]
    assert main(argv) in (0, 1)
    [run] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    stored = np.load(next((run / "cams").glob("part-*.npz")))
    labels = pd.read_csv(manifest)["label"].to_numpy()
    maps = GradCAM(model, layer="branch_relu").explain(
        demo.images[stored["rows"]], labels[stored["rows"]]
    )
    expected = keras.ops.convert_to_numpy(area_downscale(maps, stored["maps"].shape[1:]))
    assert expected.max() > 0
    np.testing.assert_allclose(stored["maps"].astype("float32"), expected, rtol=2e-3, atol=1e-6)


# ------------------------------------------------------------ Keras Hub


def _hub_vit(keras_hub):
    keras.utils.set_random_seed(0)
    backbone = zoo_models.hub_vit_backbone(keras_hub)
    return keras_hub.models.ViTImageClassifier(backbone=backbone, num_classes=3, preprocessor=None)


def test_a_keras_hub_vit_equals_a_hand_written_token_gradcam(tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    model = _hub_vit(keras_hub)
    cam = GradCAM(model)
    # (the backbone named as Keras gave it: a "_1" suffix after an earlier ViT)
    assert cam.layer_path == f"{model.backbone.name}/vit_encoder/transformer_block_2/ln_1"
    images = zoo_models.images()
    # By hand: the encoder's steps up to the last block's first norm, then the rest of
    # the model from there (keras_hub 0.32's ViTEncoder and ViTEncoderBlock).
    encoder = model.backbone.get_layer("vit_encoder")
    first, last = encoder.encoder_layers
    x = first(encoder.dropout(model.backbone.get_layer("vit_patching_and_embedding")(images)))
    with tf.GradientTape() as tape:
        normed = last.layer_norm_1(x)
        tape.watch(normed)
        y = last.dropout(last.mha(normed, normed)) + x
        tokens = encoder.layer_norm(y + last.mlp(last.layer_norm_2(y)))
        logits = model.output_dense(tokens[:, 0])
        score = tf.reduce_sum(tf.gather(logits, TARGETS, axis=1, batch_dims=1))
    gradients = tape.gradient(score, normed).numpy()[:, 1:].reshape(5, 4, 4, 16)
    activations = normed.numpy()[:, 1:].reshape(5, 4, 4, 16)
    expected = np.maximum(np.einsum("bhwc,bc->bhw", activations, gradients.mean(axis=(1, 2))), 0)
    assert expected.max() > 0
    assert_maps_equal(cam.explain(images, TARGETS), expected)
    # Guided Grad-CAM clones the model (its patch embedding's config does not rebuild
    # it in keras_hub 0.32: that layer is called as it is, its weights untouched).
    weights = [w.copy() for w in model.get_weights()]
    guided = GuidedGradCAM(model).explain(images, TARGETS)
    assert guided.shape == images.shape and np.abs(guided).max() > 0
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights(), strict=True))
    # Saved and loaded in safe mode (keras_hub registers its classes when imported).
    model.save(tmp_path / "vit.keras")
    assert_maps_equal(
        GradCAM(load_model(tmp_path / "vit.keras")).explain(images, TARGETS), expected
    )


def test_a_keras_hub_resnet_is_cut_at_its_last_feature_map():
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 64],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        image_shape=(32, 32, 3),
    )
    model = keras_hub.models.ResNetImageClassifier(
        backbone=backbone, num_classes=3, preprocessor=None
    )
    cam = GradCAM(model)
    assert cam._cut.exposed is None and cam.layer_path.startswith(backbone.name)
    images = zoo_models.images()
    with tf.GradientTape() as tape:
        activations = backbone(images)  # the last feature map is the backbone's output
        tape.watch(activations)
        logits = model.output_dense(model.pooler(activations))
        score = tf.reduce_sum(tf.gather(logits, TARGETS, axis=1, batch_dims=1))
    gradients = tape.gradient(score, activations).numpy()
    weights = gradients.mean(axis=(1, 2))
    expected = np.maximum(np.einsum("bhwc,bc->bhw", activations.numpy(), weights), 0)
    assert expected.max() > 0
    assert_maps_equal(cam.explain(images, TARGETS), expected)
