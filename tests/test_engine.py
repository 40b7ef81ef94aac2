"""Known-answer tests for the Grad-CAM engine."""

import keras
import numpy as np
import pytest
from conftest import small_cnn

from audit import GradCAM, ModelStructureError, zero_maps
from benchmarks.references import keras_example_heatmap, logit_clone

# ---------------------------------------------------------------- closed forms


def linear_cam_model(head_weights, spatial_head="gap", softmax=True, size=4):
    """Input (size, size, 1) -> 1x1 conv with channels (x, 2x) -> GAP/Flatten -> Dense.

    With fixed weights every Grad-CAM quantity has a closed form.
    """
    inputs = keras.Input((size, size, 1))
    conv = keras.layers.Conv2D(2, 1, use_bias=False, name="conv")
    features = conv(inputs)
    pooled = (
        keras.layers.GlobalAveragePooling2D()(features)
        if spatial_head == "gap"
        else keras.layers.Flatten()(features)
    )
    dense = keras.layers.Dense(
        head_weights.shape[1], activation="softmax" if softmax else None, name="dense"
    )
    model = keras.Model(inputs, dense(pooled))
    conv.set_weights([np.array([[[[1.0, 2.0]]]], dtype="float32")])
    dense.set_weights([head_weights.astype("float32"), np.zeros(head_weights.shape[1], "float32")])
    return model


def test_gradcam_equals_closed_form_on_gap_dense():
    weights = np.array([[1.0, -1.0, 0.5], [0.5, 2.0, -1.0]])  # (channels, classes)
    model = linear_cam_model(weights)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, size=(5, 4, 4, 1)).astype("float32")
    targets = np.array([0, 1, 2, 1, 0])
    maps = GradCAM(model, method="gradcam").explain(images, targets=targets)
    activations = np.concatenate([images, 2 * images], axis=-1)  # channels x, 2x
    # d logit_c / d A_k[i, j] = W[k, c] / (h * w), so alpha_k = W[k, c] / 16.
    alpha = weights[:, targets].T / 16.0
    expected = np.maximum(np.einsum("bhwk,bk->bhw", activations, alpha), 0)
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-7)
    # Class 2 weighs the map by 0.5 * x - 2 * x < 0: no positive evidence at all.
    assert zero_maps(maps)[2] and not zero_maps(maps)[0]


def test_hirescam_and_gradcam_closed_forms_on_flatten_dense():
    rng = np.random.default_rng(1)
    weights = rng.normal(size=(4 * 4 * 2, 2))  # gradients now differ per pixel
    model = linear_cam_model(weights, spatial_head="flatten")
    images = rng.uniform(0, 1, size=(3, 4, 4, 1)).astype("float32")
    targets = np.array([1, 0, 1])
    activations = np.concatenate([images, 2 * images], axis=-1)
    gradients = weights[:, targets].T.reshape(3, 4, 4, 2)  # Flatten is row-major (h, w, c)
    hires = GradCAM(model, method="hirescam").explain(images, targets=targets)
    np.testing.assert_allclose(
        hires, np.maximum((gradients * activations).sum(-1), 0), rtol=1e-5, atol=1e-6
    )
    grad = GradCAM(model, method="gradcam").explain(images, targets=targets)
    alpha = gradients.mean(axis=(1, 2))
    np.testing.assert_allclose(
        grad,
        np.maximum(np.einsum("bhwk,bk->bhw", activations, alpha), 0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_scores_are_logits_and_the_model_is_not_mutated():
    weights = np.array([[1.0, -1.0], [0.5, 2.0]])
    with_softmax = linear_cam_model(weights, softmax=True)
    without = linear_cam_model(weights, softmax=False)
    images = np.random.default_rng(2).uniform(0, 1, (4, 4, 4, 1)).astype("float32")
    cam = GradCAM(with_softmax)
    assert cam.softmax_bypassed
    details = cam.explain_details(images, targets=np.array([0, 1, 0, 1]))
    reference = GradCAM(without).explain(images, targets=np.array([0, 1, 0, 1]))
    np.testing.assert_allclose(details.maps, reference, rtol=1e-6)
    np.testing.assert_allclose(details.logits, without.predict(images, verbose=0), rtol=1e-5)
    # The user's model still ends in softmax and predicts probabilities.
    assert with_softmax.get_layer("dense").activation.__name__ == "softmax"
    probabilities = with_softmax.predict(images, verbose=0)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(details.probabilities, probabilities, rtol=1e-5)


def test_separate_softmax_layer_is_bypassed():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    logits = keras.layers.Dense(3, name="logits")(x)
    model = keras.Model(inputs, keras.layers.Softmax()(logits))
    logit_model = keras.Model(inputs, logits)
    images = np.random.default_rng(3).uniform(size=(2, 8, 8, 3)).astype("float32")
    details = GradCAM(model).explain_details(images)
    np.testing.assert_allclose(details.logits, logit_model.predict(images, verbose=0), rtol=1e-5)


def test_targets_change_the_map():
    """Class 0 reads channel relu(x), class 1 channel relu(-x): left vs right halves."""
    inputs = keras.Input((6, 6, 1))
    conv = keras.layers.Conv2D(2, 1, use_bias=False, activation="relu", name="conv")
    dense = keras.layers.Dense(2, name="dense")
    model = keras.Model(inputs, dense(keras.layers.GlobalAveragePooling2D()(conv(inputs))))
    conv.set_weights([np.array([[[[1.0, -1.0]]]], dtype="float32")])
    dense.set_weights([np.eye(2, dtype="float32"), np.zeros(2, "float32")])
    image = np.ones((1, 6, 6, 1), "float32")
    image[:, :, 3:] = -1.0  # left half positive, right half negative
    cam = GradCAM(model)
    left = cam.explain(image, targets=np.array([0]))[0]
    right = cam.explain(image, targets=np.array([1]))[0]
    assert left[:, :3].min() > 0 and left[:, 3:].max() == 0
    assert right[:, 3:].min() > 0 and right[:, :3].max() == 0


# ------------------------------------------------- against the reference algorithms


def test_gradcam_equals_the_keras_example_at_batch_one(trained_cnn, digits_images):
    images, labels = digits_images
    reference_model = logit_clone(trained_cnn)
    cam = GradCAM(trained_cnn, layer="conv2", batch_size=1)
    chosen = images[:12]
    ours = cam.explain(chosen)
    for index, image in enumerate(chosen):
        expected = keras_example_heatmap(image[None], reference_model, "conv2")
        assert expected.max() > 0
        np.testing.assert_allclose(ours[index], expected, rtol=1e-5, atol=1e-5 * expected.max())
        # The example's min-max normalisation of both agrees too.
        np.testing.assert_allclose(
            ours[index] / ours[index].max(), expected / expected.max(), atol=1e-5
        )
    # With a given class index as well.
    ours = cam.explain(chosen[:3], targets=labels[5:8])
    for index in range(3):
        expected = keras_example_heatmap(
            chosen[index : index + 1], reference_model, "conv2", int(labels[5 + index])
        )
        np.testing.assert_allclose(ours[index], expected, rtol=1e-5, atol=1e-5 * expected.max())


def test_gradcam_equals_tf_keras_vis(trained_cnn, digits_images):
    tf_keras_vis = pytest.importorskip("tf_keras_vis")  # a test extra; installed in CI
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
    from tf_keras_vis.utils.scores import CategoricalScore

    assert tf_keras_vis.__version__
    images, labels = digits_images
    chosen, targets = images[:16], labels[:16]
    reference = Gradcam(trained_cnn, model_modifier=ReplaceToLinear(), clone=True)
    expected = reference(
        CategoricalScore(list(targets)),
        chosen,
        penultimate_layer="conv2",
        normalize_cam=False,
        expand_cam=False,
    )
    ours = GradCAM(trained_cnn, layer="conv2").explain(chosen, targets=targets)
    np.testing.assert_allclose(ours, np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_batched_equals_per_image(trained_cnn, digits_images):
    images, labels = digits_images
    chosen, targets = images[:37], labels[:37]
    batched = GradCAM(trained_cnn, batch_size=16).explain_details(chosen, targets=targets)
    single = GradCAM(trained_cnn, batch_size=1).explain_details(chosen, targets=targets)
    np.testing.assert_allclose(batched.maps, single.maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched.logits, single.logits, rtol=1e-5, atol=1e-5)
    assert (batched.targets == targets).all()


def test_one_trace_for_many_batches_including_the_padded_last(trained_cnn, digits_images):
    images, _ = digits_images
    cam = GradCAM(trained_cnn, batch_size=32)
    maps = cam.explain(images[:100], size=(24, 24))  # 3 full batches and a padded one
    assert maps.shape == (100, 24, 24)
    assert cam.compiled_step().traces == 1
    cam.explain(images[100:150], size=(24, 24))
    assert cam.compiled_step().traces == 1
    # Another output size, native maps and predictions share the same compiled step.
    native = cam.explain(images[:40])
    assert cam.explain(images[:40], size=(12, 12)).shape == (40, 12, 12)
    probabilities = cam.probabilities(images[:40])
    assert cam.compiled_step().traces == 1
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    expected = keras.ops.convert_to_numpy(trained_cnn(images[:40]))  # a softmax output
    np.testing.assert_allclose(probabilities, expected, rtol=1e-4, atol=1e-6)
    upsampled = keras.ops.image.resize(native[..., None], (24, 24), interpolation="bilinear")
    np.testing.assert_allclose(maps[:40], keras.ops.convert_to_numpy(upsampled)[..., 0], atol=1e-6)


def test_an_engine_that_pads_to_its_batch_compiles_once_for_any_number_of_images(
    trained_cnn, digits_images
):
    """The audit's engines (``pad_to_batch``): the trust checks' 16 images and the
    guided examples' 8 run through the shape the 32-image batches compiled."""
    images, labels = digits_images
    padded = GradCAM(trained_cnn, batch_size=8, pad_to_batch=True)
    plain = GradCAM(trained_cnn, batch_size=8)
    for count in (3, 5, 11):
        np.testing.assert_allclose(
            padded.explain(images[:count], labels[:count]),
            plain.explain(images[:count], labels[:count]),
            rtol=1e-5,
            atol=1e-6,
        )
    assert padded.compiled_step().traces == 1
    assert plain.compiled_step().traces == 3  # shapes 3, 5 and 8


def test_predicted_targets_and_upsampling(trained_cnn, digits_images):
    images, labels = digits_images
    cam = GradCAM(trained_cnn)
    details = cam.explain_details(images[:64], size=(24, 24))
    predictions = trained_cnn.predict(images[:64], verbose=0).argmax(-1)
    assert (details.targets == predictions).all()
    assert (details.predictions == predictions).all()
    assert (predictions == labels[:64]).mean() > 0.7  # the fixture model really learned
    low = cam.explain(images[:64])
    assert low.shape == (64, 12, 12) and details.maps.shape == (64, 24, 24)
    assert details.maps.dtype == np.float32 and (details.maps >= 0).all()
    assert details.finite.all()
    # Upsampling is bilinear from the layer's map: total evidence is preserved roughly.
    np.testing.assert_allclose(details.maps.mean(axis=(1, 2)), low.mean(axis=(1, 2)), rtol=0.15)


# ------------------------------------------------------------- model shapes


def conv_layers():
    return [
        keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1"),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c2"),
    ]


def test_nested_sequential_and_flat_models_give_the_same_maps():
    keras.utils.set_random_seed(4)
    images = np.random.default_rng(4).uniform(size=(6, 16, 16, 3)).astype("float32")
    inputs = keras.Input((16, 16, 3))
    x = inputs
    for layer in conv_layers():
        x = layer(x)
    flat = keras.Model(
        inputs,
        keras.layers.Dense(5, activation="softmax", name="out")(
            keras.layers.GlobalAveragePooling2D()(x)
        ),
    )

    # Transfer-learning shape: Sequential([base_model, GAP, Dense]).
    base_in = keras.Input((16, 16, 3))
    y = base_in
    for layer in conv_layers():
        y = layer(y)
    base = keras.Model(base_in, y, name="base")
    nested = keras.Sequential(
        [base, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(5, activation="softmax")]
    )
    nested.build((None, 16, 16, 3))
    nested.set_weights(flat.get_weights())

    # The same base inside a Functional model, with pooling inside the base.
    pooled_base = keras.Model(base_in, keras.layers.GlobalAveragePooling2D()(y), name="pooled")
    outer_in = keras.Input((16, 16, 3))
    functional = keras.Model(
        outer_in, keras.layers.Dense(5, activation="softmax")(pooled_base(outer_in))
    )
    functional.set_weights(flat.get_weights())

    # A plain Sequential, never given an input shape.
    sequential = keras.Sequential(
        [*conv_layers(), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(5)]
    )

    targets = np.array([0, 1, 2, 3, 4, 0])
    expected = GradCAM(flat).explain(images, targets=targets)
    assert expected.max() > 0
    for model, path in [(nested, "base/c2"), (functional, "pooled/c2")]:
        cam = GradCAM(model)
        assert cam.layer_path == path
        np.testing.assert_allclose(cam.explain(images, targets=targets), expected, rtol=1e-5)
        # Named by its inner name alone, or by its full path.
        named = GradCAM(model, layer="c2").explain(images, targets=targets)
        np.testing.assert_allclose(named, expected, rtol=1e-5)
        inner = GradCAM(model, layer=f"{path.split('/')[0]}/c1").explain(images, targets=targets)
        flat_inner = GradCAM(flat, layer="c1").explain(images, targets=targets)
        np.testing.assert_allclose(inner, flat_inner, rtol=1e-5)
    sequential_cam = GradCAM(sequential)
    sequential_maps = sequential_cam.explain(images, targets=targets)
    sequential.set_weights(flat.get_weights())
    np.testing.assert_allclose(sequential_cam.explain(images, targets=targets), expected, rtol=1e-5)
    assert sequential_maps.shape == expected.shape
    assert sequential_cam.layer_path == sequential.layers[1].name


def test_keras_application_nested_transfer_model():
    base = keras.applications.MobileNetV2(
        input_shape=(64, 64, 3), include_top=False, weights=None, alpha=0.35
    )
    model = keras.Sequential(
        [base, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax")]
    )
    model.build((None, 64, 64, 3))
    images = np.random.default_rng(5).uniform(-1, 1, size=(4, 64, 64, 3)).astype("float32")
    cam = GradCAM(model)
    assert cam.layer_path == f"{base.name}/out_relu"
    maps = cam.explain(images, size=(64, 64))
    assert maps.shape == (4, 64, 64) and np.isfinite(maps).all()
    # A residual block's output is a cut; a layer inside the block, which the skip
    # connection bypasses, is exposed in the whole model (tests/test_model_zoo.py).
    assert GradCAM(model, layer="block_2_add").explain(images).shape == (4, 16, 16)
    inside = GradCAM(model, layer="block_2_project_BN")
    assert inside.explain(images).shape == (4, 16, 16) and inside._cut.exposed is not None


# ------------------------------------------------------------------- errors


def test_clear_errors():
    dense_only = keras.Sequential([keras.Input((10,)), keras.layers.Dense(3)])
    with pytest.raises(ModelStructureError, match="4-D"):
        GradCAM(dense_only)
    model = small_cnn()
    cam = GradCAM(model)
    images = np.zeros((3, 24, 24, 3), "float32")
    with pytest.raises(ValueError, match="3 images"):
        cam.explain(images, targets=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"targets\[1\] = 10"):
        cam.explain(images, targets=np.array([0, 10, 1]))
    with pytest.raises(ValueError, match="batch axis"):
        cam.explain(images[0])
    with pytest.raises(ValueError, match="no layer 'nope'.*conv2"):
        GradCAM(model, layer="nope")
    with pytest.raises(ModelStructureError, match="2-D"):
        GradCAM(model, layer="gap")
    with pytest.raises(ValueError, match="unknown CAM method"):
        GradCAM(model, method="magic")


def test_non_finite_activations_are_flagged_and_zeroed():
    model = linear_cam_model(np.array([[1.0, -1.0], [0.5, 2.0]]))  # no ReLU to absorb NaN
    images = np.random.default_rng(6).uniform(size=(3, 4, 4, 1)).astype("float32")
    images[1, 0, 0, 0] = np.nan
    details = GradCAM(model).explain_details(images)
    assert details.finite.tolist() == [True, False, True]
    assert not np.isnan(details.maps).any()
    assert details.zero[1]


def test_mixed_precision_models_give_float32_maps_close_to_full_precision(
    trained_cnn, digits_images
):
    """A bfloat16 forward (mixed precision) with float32 CAM arithmetic."""
    images, labels = digits_images
    mixed = keras.models.clone_model(
        trained_cnn,
        clone_function=lambda layer: layer.__class__.from_config(
            layer.get_config() | {"dtype": "mixed_bfloat16"}
        ),
    )
    mixed.set_weights(trained_cnn.get_weights())
    targets = labels[:16].astype("int32")
    full = GradCAM(trained_cnn).explain(images[:16], targets)
    low = GradCAM(mixed).explain(images[:16], targets)
    assert low.dtype == np.float32 and np.isfinite(low).all()
    assert mixed.get_layer("conv2").compute_dtype == "bfloat16"
    peak = full.reshape(16, -1).max(axis=1)[:, None, None]
    assert np.abs(low / peak - full / peak).max() < 0.1
    assert np.corrcoef(low.ravel(), full.ravel())[0, 1] > 0.99


def test_maps_do_not_depend_on_the_global_image_data_format(trained_cnn, digits_images):
    """The engine's resizes are channels-last whatever keras.config says (a channels-last
    model loads fine under a channels_first setting)."""
    images, labels = digits_images
    expected = GradCAM(trained_cnn).explain(images[:8], labels[:8], size=(24, 24))
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        maps = GradCAM(trained_cnn).explain(images[:8], labels[:8], size=(24, 24))
    finally:
        keras.config.set_image_data_format(previous)
    assert maps.shape == (8, 24, 24)
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-7)
