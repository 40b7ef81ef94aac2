"""Guided backpropagation and Guided Grad-CAM (Selvaraju et al. 2017, Springenberg et al. 2015).

Guided backpropagation passes a gradient through a ReLU only where both the ReLU's
input is positive (its own derivative) and the incoming gradient is positive. The
user's model is never changed: a clone is built (nested models included) whose
ReLU-family activations carry that rule as a custom gradient, with the same weights
(``tf.custom_gradient``, ``jax.custom_vjp`` or a ``torch.autograd.Function``,
following the Keras backend).

Guided Grad-CAM multiplies the guided gradient of the target logit with respect to
the input by the Grad-CAM map upsampled to the input: a high-resolution map of the
pixels that matter *and* lie where the class's evidence is. It costs a full backward
pass to the input, so the audit computes it for the report's example images only.
"""

from __future__ import annotations

import keras
import numpy as np

from audit.engine.backends import input_gradients, running_backend
from audit.engine.cut import cut_model
from audit.engine.explain import GradCAM
from audit.engine.maps import as_image_batch, pad_batch

_RELU_ACTIVATIONS = {"relu", "relu6", "leaky_relu"}


def _guided(function):
    """``function`` (an element-wise ReLU-like op) with the guided-backprop gradient:
    ``upstream * f'(x) * [upstream > 0]``, on the running Keras backend."""
    backend = running_backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.custom_gradient
        def guided(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = function(x)
            local = tape.gradient(y, x)  # element-wise: the op's own derivative

            def gradient(upstream):
                return upstream * local * tf.cast(upstream > 0, upstream.dtype)

            return y, gradient

        return guided
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        @jax.custom_vjp
        def guided(x):
            return function(x)

        def forward(x):
            return function(x), x

        def backward(x, upstream):
            _, pullback = jax.vjp(function, x)
            (local,) = pullback(jnp.ones_like(upstream))
            return (upstream * local * (upstream > 0).astype(upstream.dtype),)

        guided.defvjp(forward, backward)
        return guided
    import torch

    class Guided(torch.autograd.Function):
        @staticmethod
        def forward(context, x):
            context.save_for_backward(x)
            return function(x)

        @staticmethod
        def backward(context, upstream):
            (x,) = context.saved_tensors
            with torch.enable_grad():
                leaf = x.detach().requires_grad_(True)
                (local,) = torch.autograd.grad(function(leaf), leaf, torch.ones_like(upstream))
            return upstream * local * (upstream > 0).to(upstream.dtype)

    return Guided.apply


def _is_relu(activation) -> bool:
    return getattr(activation, "__name__", "") in _RELU_ACTIVATIONS


def _takes_the_rule(layer) -> bool:
    """A ReLU-family layer, or a layer with a ReLU-family ``activation``."""
    return isinstance(layer, keras.layers.ReLU | keras.layers.LeakyReLU) or _is_relu(
        getattr(layer, "activation", None)
    )


def _clone_layer(layer, shared: list):
    if not getattr(layer, "weights", None) and not _takes_the_rule(layer):
        # (an operation such as x[:, 0] has no weights attribute at all)
        # Nothing to copy and nothing to change: the clone calls the layer itself. So a
        # Lambda's code is never deserialised a second time; the model's safe mode was
        # decided once, when it was loaded.
        return layer
    try:
        clone = layer.__class__.from_config(layer.get_config())
    except (TypeError, ValueError):
        if _takes_the_rule(layer):
            raise
        # A layer whose config does not rebuild it (keras_hub 0.32's ViT patch
        # embedding) and that has no ReLU to change: the clone calls it as it is, and
        # its weights stay the model's (the guided rule never writes to them).
        shared.append(layer)
        return layer
    if isinstance(clone, keras.layers.ReLU | keras.layers.LeakyReLU):
        clone.call = _guided(clone.call)
    elif _is_relu(getattr(clone, "activation", None)):
        clone.activation = _guided(clone.activation)
    return clone


def independent_clone(model: keras.Model, **options) -> keras.Model:
    """``clone_model(recursive=True)`` that refuses to share a variable with ``model``,
    but those of the layers ``clone_function(layer, shared)`` lists in ``shared``.

    Keras versions before the fix of keras-team/keras#21120 cloned only one level of
    nesting; a copy that shares weights would let the guided clone's changes reach
    the user's model.
    """
    shared: list = []
    if "clone_function" in options:
        clone_function = options.pop("clone_function")
        options["clone_function"] = lambda layer: clone_function(layer, shared)
    copy = keras.models.clone_model(model, recursive=True, **options)
    original = {id(variable) for variable in model.weights}
    original -= {id(variable) for layer in shared for variable in layer.weights}
    if any(id(variable) in original for variable in copy.weights):
        raise RuntimeError(
            f"keras {keras.__version__} clone_model shares layers of nested models with the "
            "original; upgrade Keras (pip install -U keras) for Guided Grad-CAM"
        )
    return copy


def guided_model(model: keras.Model) -> keras.Model:
    """A copy of ``model`` whose ReLU, ReLU6 and leaky ReLU follow the guided rule.

    Other activations (GELU, swish, ...) keep their ordinary gradient.
    """
    clone = independent_clone(model, clone_function=_clone_layer)
    clone.set_weights(model.get_weights())
    return clone


class GuidedGradCAM:
    """Guided backpropagation and Guided Grad-CAM for a Keras classifier, batched.

    >>> guided = GuidedGradCAM(model)
    >>> gradients = guided.guided_backprop(images, targets)   # (N, H, W, C)
    >>> maps = guided.explain(images, targets)                 # (N, H, W, C)

    Scores are logits (a final softmax or sigmoid is bypassed, as for ``GradCAM``).
    """

    def __init__(self, model: keras.Model, *, cam: GradCAM | None = None, **options) -> None:
        # ``cam``: an existing engine for ``model`` to reuse (its traced functions too);
        # else one is made with ``options`` (``layer``, ``method``, ``batch_size``, ...).
        self.cam = cam or GradCAM(model, **options)
        self.batch_size = self.cam.batch_size
        self._cut = cut_model(guided_model(model), self.cam.layer_path)
        self._function = input_gradients(self._cut)

    def guided_backprop(self, images, targets=None, *, batch_size: int | None = None):
        """Guided gradients of each target logit with respect to its image.

        ``batch_size``: images per compiled call (the last call padded to it); by
        default the engine's. Each size compiles once.
        """
        images = as_image_batch(images)
        if targets is None:
            targets = self.cam.explain_details(images).predictions
        targets = np.asarray(targets, dtype="int32")
        batch = batch_size or self.batch_size
        out = []
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            real = len(chunk)
            padded = [pad_batch(a, batch) for a in (chunk, targets[start : start + real])]
            out.append(self._function(*padded)[:real])
        return np.concatenate(out)

    def explain(self, images, targets=None, *, batch_size: int | None = None) -> np.ndarray:
        """Guided Grad-CAM: guided gradients times the upsampled Grad-CAM map."""
        images = as_image_batch(images)
        if targets is None:
            targets = self.cam.explain_details(images).predictions
        maps = self.cam.explain(images, targets, size=images.shape[1:3])
        guided = self.guided_backprop(images, targets, batch_size=batch_size)
        return guided * maps[..., None]


def guided_picture(guided: np.ndarray) -> np.ndarray:
    """One Guided Grad-CAM result ``(H, W, C)`` as a uint8 grey image: |g| summed over
    channels, scaled to its 99.5th percentile (a few extreme pixels do not wash it out)."""
    magnitude = np.abs(guided).sum(axis=-1)
    top = np.percentile(magnitude, 99.5)
    scaled = magnitude / top if top > 0 else magnitude
    return (np.clip(scaled, 0, 1) * 255).astype("uint8")
