"""Each CAM method against an independent NumPy statement of its formula."""

import numpy as np
import pytest
import tensorflow as tf

from audit import CAM_METHODS, get_cam_method


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
    return np.stack(out)


@pytest.mark.parametrize("name", list(CAM_METHODS))
def test_method_matches_numpy_formula(name):
    rng = np.random.default_rng(1)
    activations = rng.gamma(1.0, 1.0, size=(3, 5, 6, 4)).astype("float32")
    gradients = rng.normal(size=(3, 5, 6, 4)).astype("float32")
    got = CAM_METHODS[name](tf.constant(activations), tf.constant(gradients)).numpy()
    expected = numpy_reference(name, activations, gradients)
    assert got.shape == (3, 5, 6)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert (got >= 0).all()


def test_methods_differ_when_gradients_vary_in_space():
    rng = np.random.default_rng(2)
    activations = tf.constant(rng.gamma(1.0, 1.0, size=(2, 4, 4, 3)).astype("float32"))
    gradients = tf.constant(rng.normal(size=(2, 4, 4, 3)).astype("float32"))
    maps = {name: fn(activations, gradients).numpy() for name, fn in CAM_METHODS.items()}
    assert not np.allclose(maps["gradcam"], maps["hirescam"])
    assert not np.allclose(maps["gradcam"], maps["layercam"])


def test_lookup_is_forgiving_and_errors_name_the_choices():
    assert get_cam_method("GradCAM") is CAM_METHODS["gradcam"]
    assert get_cam_method("gradcam_pp") is CAM_METHODS["gradcam++"]
    assert get_cam_method("Layer-CAM") is CAM_METHODS["layercam"]
    with pytest.raises(ValueError, match="hirescam"):
        get_cam_method("scorecam")
