"""Maps as arrays: batches padded to the compiled size, upsampling and area
downscaling, probabilities from logits, zero maps, and the CAM sets that tie the
configured method to its counterfactual form.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from audit.engine.cam_methods import gradcam, needs_forward, uses_gradients


def probabilities_of(logits: np.ndarray, multi_label: bool = False) -> np.ndarray:
    """Softmax of each row of logits, or with ``multi_label`` a sigmoid of each logit."""
    logits = np.asarray(logits, dtype=np.float32)
    if multi_label:
        return 0.5 * (1.0 + np.tanh(0.5 * logits))  # the sigmoid, without overflow
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def zero_maps(maps: np.ndarray) -> np.ndarray:
    """True for each map in ``(N, h, w)`` that is zero everywhere."""
    return ~(np.asarray(maps).reshape(len(maps), -1) > 0).any(axis=1)


def as_image_batch(images) -> np.ndarray:
    array = images.numpy() if isinstance(images, tf.Tensor) else np.asarray(images)
    if array.ndim != 4:
        hint = " (add a batch axis: images[None])" if array.ndim == 3 else ""
        raise ValueError(
            f"images must be a batch shaped (N, height, width, channels), got {array.shape}" + hint
        )
    # float32 whatever came in (integers, float64 from NumPy's random generators): one
    # traced input type, and Score-CAM's masks (float32) multiply the images.
    return array.astype(np.float32, copy=False)


def pad_batch(array: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad the batch axis to ``size`` so a compiled step keeps one traced shape."""
    padding = np.zeros((size - len(array), *array.shape[1:]), dtype=array.dtype)
    return np.concatenate([array, padding])


def upsample(maps, size: tuple[int, int]):
    """``(B, h, w)`` maps resized bilinearly to ``size`` (``keras.ops``: any backend;
    channels-last whatever ``keras.config.image_data_format()`` says)."""
    resized = keras.ops.image.resize(
        maps[..., None], size, interpolation="bilinear", data_format="channels_last"
    )
    return resized[..., 0]


def area_downscale(maps, size: tuple[int, int]):
    """``(B, h, w)`` maps shrunk to ``size`` by area averaging (each output cell is the
    mean of the input it covers, fractional overlaps weighted): TensorFlow's ``area``
    resize written as two matrix products, so every backend stores the same maps."""
    rows = keras.ops.convert_to_tensor(_overlap_matrix(maps.shape[1], size[0]))
    cols = keras.ops.convert_to_tensor(_overlap_matrix(maps.shape[2], size[1]))
    return keras.ops.einsum("ih,bhw,jw->bij", rows, keras.ops.cast(maps, "float32"), cols)


def _overlap_matrix(source: int, target: int) -> np.ndarray:
    """(target, source) weights: the share of output cell i that input cell j covers."""
    scale = source / target
    starts = np.arange(target)[:, None] * scale
    cells = np.arange(source)[None, :]
    overlap = np.clip(np.minimum(starts + scale, cells + 1) - np.maximum(starts, cells), 0, None)
    return (overlap / scale).astype("float32")


def cam_sets(
    method,
    activations,
    logits,
    gradient_of,
    target_sets,
    *,
    counterfactual: bool = False,
    with_counterfactual: bool = False,
    images=None,
    forward=None,
    to_grid=None,
) -> dict:
    """Maps of every target set from one forward pass, in ``keras.ops`` (any backend).

    ``gradient_of(chosen)`` returns the backend's gradient of ``sum_i logits[i,
    chosen_i]`` with respect to ``activations`` (one head backward pass per set).
    Returns ``logits`` and, per set, ``maps`` (raw, at the layer's resolution),
    ``targets`` (``PREDICTED`` resolved) and ``finite`` (False where activations or
    gradients were not finite; those maps are zero). ``to_grid`` lays a token layer's
    activations and gradients onto their patch grid (``ModelCut.to_grid``).
    ``with_counterfactual`` adds ``counterfactual``: the first set's counterfactual map
    (the method on the negated gradients; Grad-CAM's formula for methods without
    gradients).
    """
    ops = keras.ops
    predicted = ops.cast(ops.argmax(logits, axis=-1), "int32")
    to_grid = to_grid or (lambda values: values)
    activations = ops.cast(to_grid(activations), "float32")
    finite_activations = ops.all(ops.isfinite(activations), axis=(1, 2, 3))
    result = {"logits": logits, "targets": [], "maps": [], "finite": []}
    for targets in target_sets:
        chosen = ops.where(targets < 0, predicted, ops.cast(targets, "int32"))
        raw = ops.cast(to_grid(gradient_of(chosen)), "float32")
        gradients = -raw if counterfactual else raw
        finite = ops.logical_and(
            finite_activations, ops.all(ops.isfinite(gradients), axis=(1, 2, 3))
        )
        keep = finite[:, None, None, None]
        safe = (ops.where(keep, activations, 0.0), ops.where(keep, gradients, 0.0))
        if with_counterfactual and not result["maps"]:
            negated = ops.where(keep, -raw, 0.0)  # against the target, whatever the mode
            formula = method if uses_gradients(method) else gradcam
            result["counterfactual"] = formula(safe[0], negated)
        if needs_forward(method):
            maps = method(*safe, images=images, targets=chosen, forward=forward)
        else:
            maps = method(*safe)
        result["maps"].append(maps)
        result["targets"].append(chosen)
        result["finite"].append(finite)
    return result
