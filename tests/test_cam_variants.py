"""Which variant each CAM method is (docs/engine.md): the reference variants
``gradcam++-authors`` and ``scorecam-nobaseline`` against NumPy statements of the
reference formulas and against tf-keras-vis; ``gradcam++`` and ``scorecam`` keep their
own formulas; maps are upsampled half-pixel bilinear."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import small_cnn
from scipy.ndimage import zoom

from audit import GradCAM
from audit.engine.registry import canonical_name


def _relu(x):
    return np.maximum(x, 0.0)


def _normalised(maps):
    """Min-max per map, as the other tools show theirs (an all-zero map stays zero)."""
    maps = np.asarray(maps, "float64")
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1.0), 0.0)


def _half_pixel(source: int, target: int) -> np.ndarray:
    """(target, source) weights of half-pixel bilinear resizing: output pixel i samples
    the input at (i + 0.5) * source / target - 0.5, clamped to the edge pixels."""
    position = np.clip((np.arange(target) + 0.5) * source / target - 0.5, 0, source - 1)
    below = np.floor(position).astype(int)
    above = np.minimum(below + 1, source - 1)
    weights = np.zeros((target, source))
    np.add.at(weights, (np.arange(target), below), 1 - (position - below))
    np.add.at(weights, (np.arange(target), above), position - below)
    return weights


def _resized(maps, size):
    """``(B, h, w)`` maps resized half-pixel bilinear to ``size``, in NumPy."""
    rows, cols = _half_pixel(maps.shape[1], size[0]), _half_pixel(maps.shape[2], size[1])
    return np.einsum("ih,bhw,jw->bij", rows, maps, cols)


def _activations_and_gradients(model, layer, head, images, targets):
    """The layer's activations and the gradients of the target logits through ``head``
    (the layers after it, by name), by a tape: what the engine computes, found apart."""
    activations = keras.Model(model.input, model.get_layer(layer).output)(images)
    with tf.GradientTape() as tape:
        tape.watch(activations)
        scores = activations
        for name in head:
            scores = model.get_layer(name)(scores)
        score = tf.reduce_sum(tf.gather(scores, targets, axis=1, batch_dims=1))
    return activations.numpy(), tape.gradient(score, activations).numpy()


def _plus_plus_alphas(a, g):
    """The closed-form alphas G^2 / (2 G^2 + sum A * G^3) of one image, 0 where G = 0."""
    denominator = 2 * g**2 + a.sum(axis=(0, 1)) * g**3
    return np.where(denominator != 0, g**2 / np.where(denominator == 0, 1, denominator), 0)


def _gradcam_plus_plus_authors(activations, gradients):
    """The authors' code (adityac94/Grad_CAM_plus_plus, misc/utils.py) restated: the
    alphas normalised by their sum where the weight ReLU(G) is non-zero (1 where that
    sum is 0), w_k = sum_ij ReLU(G_k) a_k, L = ReLU(sum_k w_k A_k); exp(score) left out."""
    maps = []
    for a, g in zip(activations, gradients, strict=True):
        alphas = _plus_plus_alphas(a, g)
        positive = _relu(g)
        totals = np.where(positive != 0, alphas, 0).sum(axis=(0, 1))
        alphas = alphas / np.where(totals != 0, totals, 1)
        maps.append(_relu((a * (positive * alphas).sum(axis=(0, 1))).sum(-1)))
    return np.stack(maps)


def _gradcam_plus_plus_closed_form(activations, gradients):
    """pytorch-grad-cam's GradCAMPlusPlus without its eps: the alphas not normalised."""
    maps = []
    for a, g in zip(activations, gradients, strict=True):
        weights = (_plus_plus_alphas(a, g) * _relu(g)).sum(axis=(0, 1))
        maps.append(_relu((a * weights).sum(-1)))
    return np.stack(maps)


def _digit_cnn():
    """The conftest CNN, untrained, ending in logits. Its conv1 gradients come through
    max pooling and conv2, so most channels have gradients of both signs."""
    keras.utils.set_random_seed(11)
    return small_cnn(num_classes=4, softmax=False)


CONV1_HEAD = ("pool1", "conv2", "gap", "classifier")


def test_gradcam_plus_plus_authors_is_the_authors_formula_and_gradcam_plus_plus_is_kept():
    model = _digit_cnn()
    images = np.random.default_rng(12).random((4, 24, 24, 3)).astype("float32")
    targets = np.array([0, 3, 1, 2])
    activations, gradients = _activations_and_gradients(model, "conv1", CONV1_HEAD, images, targets)
    mixed = (gradients > 0).any(axis=(1, 2)) & (gradients < 0).any(axis=(1, 2))
    assert mixed.mean() > 0.5  # the normalisation's sign threshold matters here

    authors = GradCAM(model, layer="conv1", method="Grad-CAM++-authors").explain(images, targets)
    expected = _gradcam_plus_plus_authors(activations, gradients)
    assert expected.max() > 0
    np.testing.assert_allclose(authors, expected, rtol=1e-4, atol=1e-5 * expected.max())

    kept = GradCAM(model, layer="conv1", method="gradcam++").explain(images, targets)
    closed_form = _gradcam_plus_plus_closed_form(activations, gradients)
    np.testing.assert_allclose(kept, closed_form, rtol=1e-4, atol=1e-5 * closed_form.max())
    # Two variants, two maps: normalised, they differ by far more than rounding.
    assert np.abs(_normalised(authors) - _normalised(kept)).max() > 0.1


def _softplus_head_model():
    """conv -> softplus -> GAP -> Dense logits: a channel's gradient W_kc sigmoid(A_k)
    / hw keeps the sign of W_kc but varies in space, so the alphas vary too."""
    keras.utils.set_random_seed(13)
    inputs = keras.Input((16, 16, 3))
    features = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inputs)
    smooth = keras.layers.Activation("softplus", name="softplus")(features)
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(smooth)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(pooled))


def test_gradcam_plus_plus_authors_equals_tf_keras_vis_where_each_channel_has_one_sign():
    """tf-keras-vis divides the alphas by their sum over every position (a line the
    authors' code has commented out): the authors' weights wherever each channel's
    gradient has one sign, as here; not where the signs mix (conv1 of the CNN)."""
    pytest.importorskip("tf_keras_vis")
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
    from tf_keras_vis.utils.scores import CategoricalScore

    model = _softplus_head_model()
    # Bright inputs: large activation sums, so the alphas vary across positions.
    images = (10 * np.random.default_rng(14).random((4, 16, 16, 3))).astype("float32")
    targets = np.array([2, 0, 1, 2])
    _, gradients = _activations_and_gradients(
        model, "conv", ("softplus", "gap", "logits"), images, targets
    )
    assert not ((gradients > 0).any(axis=(1, 2)) & (gradients < 0).any(axis=(1, 2))).any()
    assert gradients.std(axis=(1, 2)).max() > 0  # not constant in space

    def tf_keras_vis(model, layer, targets, images):
        score = CategoricalScore(list(targets))
        cam = GradcamPlusPlus(model)(
            score, images, penultimate_layer=layer, expand_cam=False, normalize_cam=False
        )
        return _normalised(cam)  # theirs adds an eps to the span: 1e-4 off on small maps

    ours = GradCAM(model, layer="conv", method="gradcam++-authors").explain(images, targets)
    theirs = tf_keras_vis(model, "conv", targets, images)
    # Measured 2e-7: float32 rounding (theirs also multiplies by exp(score)).
    np.testing.assert_allclose(_normalised(ours), theirs, atol=1e-5)
    plain = GradCAM(model, layer="conv", method="gradcam++").explain(images, targets)
    assert np.abs(_normalised(plain) - theirs).max() > 0.05

    cnn = _digit_cnn()
    digits = np.random.default_rng(12).random((4, 24, 24, 3)).astype("float32")
    mixed_targets = np.array([0, 3, 1, 2])
    ours = GradCAM(cnn, layer="conv1", method="gradcam++-authors").explain(digits, mixed_targets)
    theirs = tf_keras_vis(cnn, "conv1", mixed_targets, digits)
    assert np.abs(_normalised(ours) - theirs).max() > 0.1  # measured 0.34


def _score_model():
    """12x12 input, a conv at half its resolution, GAP, Dense logits."""
    keras.utils.set_random_seed(15)
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(x)
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(pooled))


def _scorecam_in_numpy(model, layer, images, targets, *, baseline):
    """Score-CAM restated: H_k = A_k upsampled half-pixel bilinear, min-max scaled (0
    where constant); w_k = softmax(f(X * H_k))_c, less softmax(f(0))_c with the
    baseline; L = ReLU(sum_k w_k A_k). Every channel, one image at a time."""
    activations = keras.Model(model.input, model.get_layer(layer).output)(images).numpy()

    def probability(batch, target):
        return tf.nn.softmax(model(batch)).numpy()[:, target]

    maps = []
    for image, a, target in zip(images, activations, targets, strict=True):
        upsampled = _resized(np.moveaxis(a, -1, 0), image.shape[:2])  # (channels, H, W)
        low = upsampled.min(axis=(1, 2), keepdims=True)
        span = upsampled.max(axis=(1, 2), keepdims=True) - low
        masks = np.where(span > 0, (upsampled - low) / np.where(span > 0, span, 1), 0)
        weights = probability((image * masks[..., None]).astype("float32"), target)
        if baseline:
            weights = weights - probability(np.zeros_like(image)[None], target)
        maps.append(_relu((a * weights).sum(-1)))
    return np.stack(maps)


def test_scorecam_nobaseline_is_the_reference_formula_and_scorecam_is_kept():
    model = _score_model()
    images = np.random.default_rng(16).random((3, 12, 12, 3)).astype("float32")
    targets = np.array([1, 0, 2])
    for method, baseline in (("scorecam-nobaseline", False), ("scorecam", True)):
        maps = GradCAM(model, layer="conv", method=method, score_channels=None).explain(
            images, targets
        )
        expected = _scorecam_in_numpy(model, "conv", images, targets, baseline=baseline)
        assert expected.max() > 0, method
        np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-6, err_msg=method)


def test_scorecam_nobaseline_equals_tf_keras_vis_at_the_input_resolution():
    """tf-keras-vis upsamples its masks with scipy's zoom (corners aligned); at a layer
    of the input's resolution neither tool resamples, and the maps agree."""
    pytest.importorskip("tf_keras_vis")
    from tf_keras_vis.scorecam import Scorecam
    from tf_keras_vis.utils.scores import CategoricalScore

    model = _score_model()
    images = np.random.default_rng(17).random((4, 12, 12, 3)).astype("float32")
    targets = np.array([0, 2, 1, 0])
    ours = GradCAM(model, layer="conv1", method="scorecam-nobaseline", score_channels=None)
    score = CategoricalScore(list(targets))
    theirs = _normalised(
        Scorecam(model)(
            score, images, penultimate_layer="conv1", expand_cam=False, normalize_cam=False
        )
    )
    # Measured 6e-8 (they add 1e-7 to the masks' span; rounding).
    np.testing.assert_allclose(_normalised(ours.explain(images, targets)), theirs, atol=1e-5)
    with_baseline = GradCAM(model, layer="conv1", method="scorecam", score_channels=None)
    assert np.abs(_normalised(with_baseline.explain(images, targets)) - theirs).max() > 0.05


def test_the_black_image_baseline_zeroes_maps_the_reference_keeps(trained_cnn, digits_images):
    """On the trained digit CNN (conv2, every channel) the baseline leaves some maps all
    zero (5 of the first 48 measured); without it none is."""
    images, labels = digits_images[0][:48], digits_images[1][:48]

    def zero_maps(method):
        cam = GradCAM(trained_cnn, layer="conv2", method=method, score_channels=None)
        return int((cam.explain(images, labels).max(axis=(1, 2)) == 0).sum())

    assert zero_maps("scorecam") >= 2
    assert zero_maps("scorecam-nobaseline") == 0


def test_maps_are_upsampled_half_pixel_bilinear_not_with_corners_aligned():
    model = _score_model()
    images = np.random.default_rng(18).random((3, 12, 12, 3)).astype("float32")
    cam = GradCAM(model, layer="conv")
    small = cam.explain(images, np.array([0, 1, 2]))
    large = cam.explain(images, np.array([0, 1, 2]), size=(12, 12))
    np.testing.assert_allclose(large, _resized(small, (12, 12)), rtol=1e-5, atol=1e-6)
    corners = np.stack([zoom(one, 2.0, order=1) for one in small])  # tf-keras-vis's
    assert np.abs(_normalised(large) - _normalised(corners)).max() > 0.05


def test_the_variants_have_names_of_their_own():
    assert canonical_name("Grad-CAM++-Authors") == "gradcam++-authors"
    assert canonical_name("gradcam_pp") == canonical_name("Grad-CAM++") == "gradcam++"
    assert canonical_name("Score-CAM-NoBaseline") == "scorecam-nobaseline"
    assert canonical_name("Score-CAM") == "scorecam"
