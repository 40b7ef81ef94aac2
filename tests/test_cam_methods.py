"""Each CAM method against an independent NumPy statement of its formula."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from audit import CAM_METHODS, GradCAM, get_cam_method
from audit.engine.cam_methods import ScoreCAM, needs_forward

GRADIENT_METHODS = [name for name, method in CAM_METHODS.items() if not needs_forward(method)]
# gradcam++-authors meets its authors' formula in test_cam_variants.py.
WITH_FORMULA_HERE = [name for name in GRADIENT_METHODS if name != "gradcam++-authors"]


def _relu(x):
    return np.maximum(x, 0.0)


def numpy_reference(name, a, g):
    """The formulas of the design notes, written out in NumPy loops over the batch."""
    out = []
    for activations, gradients in zip(a, g, strict=True):
        if name == "gradcam":
            weights = gradients.mean(axis=(0, 1))
            out.append(_relu((activations * weights).sum(-1)))
        elif name == "hirescam":
            out.append(_relu((gradients * activations).sum(-1)))
        elif name == "gradcam++":
            g2, g3 = gradients**2, gradients**3
            denominator = 2 * g2 + activations.sum(axis=(0, 1)) * g3
            alpha = np.where(denominator != 0, g2 / np.where(denominator == 0, 1, denominator), 0)
            weights = (alpha * _relu(gradients)).sum(axis=(0, 1))
            out.append(_relu((activations * weights).sum(-1)))
        elif name == "xgradcam":
            weights = (gradients * activations).sum(axis=(0, 1)) / (
                activations.sum(axis=(0, 1)) + 1e-7
            )
            out.append(_relu((activations * weights).sum(-1)))
        elif name == "layercam":
            out.append(_relu((_relu(gradients) * activations).sum(-1)))
        elif name == "eigencam":
            h, w, c = activations.shape
            flat = activations.reshape(h * w, c).astype("float64")
            centred = flat - flat.mean(axis=0)
            first = np.linalg.svd(centred, full_matrices=False)[2][0]
            projection = centred @ first
            total = flat.sum(-1) - flat.sum(-1).mean()
            if (projection * total).sum() < 0:
                projection = -projection
            out.append(_relu(projection).reshape(h, w))
    return np.stack(out)


@pytest.mark.parametrize("name", WITH_FORMULA_HERE)
def test_method_matches_numpy_formula(name):
    rng = np.random.default_rng(1)
    activations = rng.gamma(1.0, 1.0, size=(3, 5, 6, 4)).astype("float32")
    gradients = rng.normal(size=(3, 5, 6, 4)).astype("float32")
    got = CAM_METHODS[name](tf.constant(activations), tf.constant(gradients)).numpy()
    expected = numpy_reference(name, activations, gradients)
    assert got.shape == (3, 5, 6)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert (got >= 0).all()


def test_eigencam_recovers_a_planted_component_and_ignores_gradients():
    rng = np.random.default_rng(3)
    pattern = np.zeros((6, 6), "float32")
    pattern[1:3, 2:5] = 1.0
    direction = rng.uniform(0.5, 1.5, size=8).astype("float32")
    activations = pattern[None, :, :, None] * direction + 0.01 * rng.random((1, 6, 6, 8))
    activations = tf.constant(activations.astype("float32"))
    one = CAM_METHODS["eigencam"](
        activations, tf.constant(rng.normal(size=(1, 6, 6, 8)), "float32")
    )
    other = CAM_METHODS["eigencam"](activations, tf.zeros((1, 6, 6, 8)))
    np.testing.assert_allclose(one.numpy(), other.numpy())
    hot = one.numpy()[0] > 0.5 * one.numpy().max()
    np.testing.assert_array_equal(hot, pattern > 0)


def _score_model(activation=None):
    keras.utils.set_random_seed(4)
    inputs = keras.Input((12, 12, 3))
    features = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    return keras.Model(inputs, keras.layers.Dense(3, activation=activation)(pooled))


def _scorecam_by_hand(model, images, targets, probabilities=tf.nn.softmax):
    """Score-CAM written out: one eager forward per image and channel; ``probabilities``
    turns the model's outputs into its class probabilities."""
    features = keras.Model(model.inputs, model.get_layer("conv").output)
    maps = []
    for image, target in zip(images, targets, strict=True):
        activations = features(image[None]).numpy()[0]
        black = probabilities(model(np.zeros_like(image)[None])).numpy()[0, target]
        weights = []
        for k in range(activations.shape[-1]):
            channel = tf.image.resize(activations[None, :, :, k : k + 1], (12, 12)).numpy()[0]
            span = channel.max() - channel.min()
            mask = (channel - channel.min()) / span if span > 0 else np.zeros_like(channel)
            score = probabilities(model((image * mask)[None])).numpy()[0, target]
            weights.append(score - black)
        maps.append(_relu((activations * np.array(weights)).sum(-1)))
    return np.stack(maps)


def test_scorecam_matches_a_hand_written_loop_and_topk_with_all_channels_is_full():
    model = _score_model()
    images = np.random.default_rng(5).random((3, 12, 12, 3)).astype("float32")
    targets = np.array([0, 2, 1])
    full = GradCAM(model, method="scorecam", score_channels=None).explain(images, targets)
    np.testing.assert_allclose(full, _scorecam_by_hand(model, images, targets), atol=1e-5)
    every = GradCAM(model, method="scorecam", score_channels=6).explain(images, targets)
    np.testing.assert_allclose(every, full, atol=1e-6)
    fewer = GradCAM(model, method="scorecam", score_channels=2).explain(images, targets)
    assert fewer.shape == full.shape and not np.allclose(fewer, full)
    with pytest.raises(ValueError, match="score_channels"):
        ScoreCAM(0)


def test_scorecam_takes_float64_images():
    """NumPy's random images are float64; Score-CAM multiplies them by float32 masks."""
    model = _score_model()
    images = np.random.default_rng(7).random((2, 12, 12, 3))
    assert images.dtype == np.float64
    cam = GradCAM(model, method="scorecam", score_channels=None)
    np.testing.assert_allclose(
        cam.explain(images, np.array([0, 1])),
        cam.explain(images.astype("float32"), np.array([0, 1])),
    )


def test_scorecam_of_a_multi_label_model_scores_its_sigmoids():
    """A model ending in a sigmoid per class: the channel weights are gains in the
    class's own sigmoid, what the model outputs, not in a softmax over the classes."""
    model = _score_model(activation="sigmoid")
    images = np.random.default_rng(6).random((3, 12, 12, 3)).astype("float32")
    targets = np.array([1, 0, 2])
    cam = GradCAM(model, method="scorecam", score_channels=None)
    maps = cam.explain(images, targets)
    assert cam.multi_label
    expected = _scorecam_by_hand(model, images, targets, probabilities=tf.identity)
    assert expected.max() > 0
    np.testing.assert_allclose(maps, expected, atol=1e-5)
    softmax = _scorecam_by_hand(model, images, targets, probabilities=tf.nn.softmax)
    assert not np.allclose(expected, softmax, atol=1e-5)


def test_counterfactual_map_is_the_method_on_negated_gradients():
    model = _score_model()
    images = np.random.default_rng(6).random((4, 12, 12, 3)).astype("float32")
    targets = np.array([0, 1, 2, 0])
    features = keras.Model(model.inputs, model.get_layer("conv").output)
    activations = features(images)
    with tf.GradientTape() as tape:
        tape.watch(activations)
        head = model.layers[-1](model.layers[-2](activations))
        score = tf.reduce_sum(tf.gather(head, targets, axis=1, batch_dims=1))
    gradients = tape.gradient(score, activations)
    for name in ("gradcam", "layercam"):
        got = GradCAM(model, method=name, counterfactual=True).explain(images, targets)
        expected = CAM_METHODS[name](activations, -gradients).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    # Positive and counterfactual Grad-CAM split the signed map: they never overlap.
    plain = GradCAM(model).explain(images, targets)
    negative = GradCAM(model, counterfactual=True).explain(images, targets)
    assert not ((plain > 0) & (negative > 0)).any()
    with pytest.raises(ValueError, match="does not use gradients"):
        GradCAM(model, method="eigencam", counterfactual=True)


def test_methods_differ_when_gradients_vary_in_space():
    rng = np.random.default_rng(2)
    activations = tf.constant(rng.gamma(1.0, 1.0, size=(2, 4, 4, 3)).astype("float32"))
    gradients = tf.constant(rng.normal(size=(2, 4, 4, 3)).astype("float32"))
    maps = {name: CAM_METHODS[name](activations, gradients).numpy() for name in GRADIENT_METHODS}
    assert not np.allclose(maps["gradcam"], maps["hirescam"])
    assert not np.allclose(maps["gradcam"], maps["layercam"])


def test_lookup_is_forgiving_and_errors_name_the_choices():
    assert get_cam_method("GradCAM") is CAM_METHODS["gradcam"]
    assert get_cam_method("gradcam_pp") is CAM_METHODS["gradcam++"]
    assert get_cam_method("Layer-CAM") is CAM_METHODS["layercam"]
    assert get_cam_method("Score-CAM", score_channels=None).channels is None
    with pytest.raises(ValueError, match="hirescam"):
        get_cam_method("occlusion")
