"""The Grad-CAM step on Keras backends other than TensorFlow (JAX and PyTorch).

TensorFlow stays the default and the reference (``GradCAM.cam_batch_many``,
``tf.GradientTape``). On JAX the same step is one jitted function of the weights:
the features and head halves of the cut run as stateless calls, and ``jax.vjp``
through the head gives every target's gradient with one backward pass per target
set (the cotangent is the one-hot of each sample's target: the gradient of the sum
of per-sample scores, exactly as on TensorFlow). The CAM methods are ``keras.ops``
functions, so they run inside the jitted function unchanged.
"""

from __future__ import annotations

import keras
import numpy as np

from audit.cam_methods import uses_gradients


def _states(parts) -> list[tuple[list, list]]:
    """Current weight values of each part (read per call: weight changes are seen)."""
    return [
        (
            [variable.value for variable in part.trainable_variables],
            [variable.value for variable in part.non_trainable_variables],
        )
        for part in parts
    ]


def _run(parts, states, inputs):
    for part, (trainable, non_trainable) in zip(parts, states, strict=True):
        inputs, _ = part.stateless_call(trainable, non_trainable, inputs, training=False)
    return inputs


def _one_pass_only(method, backend: str) -> None:
    """The gradient-free methods (eigencam, scorecam) are TensorFlow-only: say so."""
    if not uses_gradients(method):
        raise NotImplementedError(
            f"on the {backend} backend GradCAM runs the one-pass methods (gradcam, hirescam, "
            "gradcam++, xgradcam, layercam); eigencam and scorecam need TensorFlow"
        )


def jax_cam_step(cut, method, size: tuple[int, int] | None, counterfactual: bool):
    """A jitted ``(images, targets) -> {maps, logits, targets, finite}`` on JAX."""
    import jax
    import jax.numpy as jnp

    _one_pass_only(method, "jax")
    features, head = list(cut.feature_parts), list(cut.head_parts)

    def step(feature_states, head_states, images, targets):
        activations = _run(features, feature_states, images)

        def scores(values):
            return _run(head, head_states, values).astype(jnp.float32)

        logits, pullback = jax.vjp(scores, activations)
        predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        chosen = jnp.where(targets < 0, predicted, targets.astype(jnp.int32))
        (gradients,) = pullback(jax.nn.one_hot(chosen, logits.shape[-1], dtype=logits.dtype))
        gradients = gradients.astype(jnp.float32)
        if counterfactual:
            gradients = -gradients
        activations = activations.astype(jnp.float32)
        finite = jnp.all(jnp.isfinite(activations), axis=(1, 2, 3)) & jnp.all(
            jnp.isfinite(gradients), axis=(1, 2, 3)
        )
        keep = finite[:, None, None, None]
        maps = method(jnp.where(keep, activations, 0.0), jnp.where(keep, gradients, 0.0))
        if size is not None:
            maps = keras.ops.image.resize(maps[..., None], size, interpolation="bilinear")[..., 0]
        return {"maps": maps, "logits": logits, "targets": chosen, "finite": finite}

    jitted = jax.jit(step)

    def call(images, targets):
        return jitted(
            _states(features),
            _states(head),
            jnp.asarray(np.asarray(images, dtype="float32")),
            jnp.asarray(np.asarray(targets, dtype="int32")),
        )

    return call


def torch_cam_step(cut, method, size: tuple[int, int] | None, counterfactual: bool):
    """``(images, targets) -> {maps, logits, targets, finite}`` on PyTorch (autograd).

    The features half runs without a graph; the head runs on activations that require
    gradients, and ``torch.autograd.grad`` of the summed target logits gives every
    sample's gradient in one backward pass through the head only.
    """
    import torch

    _one_pass_only(method, "torch")
    ops = keras.ops

    def call(images, targets):
        images = ops.convert_to_tensor(np.asarray(images, dtype="float32"))
        targets = ops.convert_to_tensor(np.asarray(targets, dtype="int32"))
        with torch.no_grad():
            activations = cut.activations(images, training=False)
        activations = activations.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = cut.logits(activations, training=False).float()
            predicted = torch.argmax(logits, dim=-1).to(torch.int32)
            chosen = torch.where(targets < 0, predicted, targets)
            score = torch.gather(logits, 1, chosen[:, None].long()).sum()
            (gradients,) = torch.autograd.grad(score, activations)
        with torch.no_grad():
            gradients = gradients.float()
            if counterfactual:
                gradients = -gradients
            values = activations.detach().float()
            finite = torch.isfinite(values).all(dim=(1, 2, 3)) & torch.isfinite(gradients).all(
                dim=(1, 2, 3)
            )
            keep = finite[:, None, None, None]
            zero = torch.zeros((), dtype=values.dtype, device=values.device)
            maps = method(torch.where(keep, values, zero), torch.where(keep, gradients, zero))
            if size is not None:
                maps = ops.image.resize(maps[..., None], size, interpolation="bilinear")[..., 0]
            result = {"maps": maps, "logits": logits.detach(), "targets": chosen, "finite": finite}
            return {key: ops.convert_to_numpy(value) for key, value in result.items()}

    return call
