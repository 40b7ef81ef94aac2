"""CAM methods that are cheap functions of one forward and one backward pass.

Every method is a pure function of the target layer's activations ``A`` and the
gradients ``G`` of the per-sample target logit with respect to ``A``, both shaped
``(batch, height, width, channels)`` and float32. It returns the map
``(batch, height, width)``, already passed through ReLU and never normalised,
so maps stay comparable across images and classes.

Adding a method is one function here plus one entry in ``CAM_METHODS``.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

CamMethod = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]

# Guards divisions by sums that are legitimately zero (a dead channel).
_EPS = 1e-7


def _weighted_sum(weights: tf.Tensor, activations: tf.Tensor) -> tf.Tensor:
    """ReLU(sum_k w_k A_k) for channel weights ``(batch, channels)``."""
    return tf.nn.relu(tf.einsum("bc,bhwc->bhw", weights, activations))


def gradcam(activations: tf.Tensor, gradients: tf.Tensor) -> tf.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): alpha_k = mean_ij G_k; L = ReLU(sum_k alpha_k A_k)."""
    weights = tf.reduce_mean(gradients, axis=(1, 2))
    return _weighted_sum(weights, activations)


def hirescam(activations: tf.Tensor, gradients: tf.Tensor) -> tf.Tensor:
    """HiResCAM (Draelos & Carin 2020): L = ReLU(sum_k G_k * A_k), element-wise.

    Unlike Grad-CAM it does not average the gradients spatially, so the map is
    faithful to what the head computes when the head is GAP + Dense.
    """
    return tf.nn.relu(tf.reduce_sum(gradients * activations, axis=-1))


def gradcam_plus_plus(activations: tf.Tensor, gradients: tf.Tensor) -> tf.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018), in its usual closed form.

    With the exponential-score approximation the higher derivatives become powers
    of the first: a_ij = G^2 / (2 G^2 + sum_ab A * G^3), w_k = sum_ij a_ij ReLU(G_k),
    L = ReLU(sum_k w_k A_k). This is the variant of the authors' code and of
    pytorch-grad-cam.
    """
    grads_2 = tf.square(gradients)
    grads_3 = grads_2 * gradients
    activation_sums = tf.reduce_sum(activations, axis=(1, 2), keepdims=True)
    denominator = 2.0 * grads_2 + activation_sums * grads_3
    alpha = tf.math.divide_no_nan(grads_2, denominator)
    weights = tf.reduce_sum(alpha * tf.nn.relu(gradients), axis=(1, 2))
    return _weighted_sum(weights, activations)


def xgradcam(activations: tf.Tensor, gradients: tf.Tensor) -> tf.Tensor:
    """XGrad-CAM (Fu et al. 2020): w_k = sum_ij G_k A_k / (sum_ij A_k); L = ReLU(sum_k w_k A_k)."""
    activation_sums = tf.reduce_sum(activations, axis=(1, 2))
    weights = tf.reduce_sum(gradients * activations, axis=(1, 2)) / (activation_sums + _EPS)
    return _weighted_sum(weights, activations)


def layercam(activations: tf.Tensor, gradients: tf.Tensor) -> tf.Tensor:
    """LayerCAM (Jiang et al. 2021): L = ReLU(sum_k ReLU(G_k) * A_k).

    The outer ReLU matters only for layers whose activations can be negative.
    """
    return tf.nn.relu(tf.reduce_sum(tf.nn.relu(gradients) * activations, axis=-1))


CAM_METHODS: dict[str, CamMethod] = {
    "gradcam": gradcam,
    "hirescam": hirescam,
    "gradcam++": gradcam_plus_plus,
    "xgradcam": xgradcam,
    "layercam": layercam,
}


def get_cam_method(name: str) -> CamMethod:
    """Return the CAM function registered under ``name`` (case-insensitive)."""
    key = name.lower().replace("_", "").replace("-", "")
    aliases = {k.replace("-", ""): k for k in CAM_METHODS} | {"gradcampp": "gradcam++"}
    if key not in aliases:
        known = ", ".join(CAM_METHODS)
        raise ValueError(f"unknown CAM method {name!r}; choose one of: {known}")
    return CAM_METHODS[aliases[key]]
