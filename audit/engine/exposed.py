"""The engine's path for a layer the features/head cut cannot split at: the whole
model runs, and the target layer's output is exposed on the way.

A layer inside a residual branch (a skip connection bypasses it) has no head that
starts at its output, and a layer inside another layer (a ViT's encoder block) is no
node of the model's graph. The gradient of a score with respect to such a layer's
output is still well defined, and it is what the Keras Grad-CAM example and
tf-keras-vis compute: here the layer's call is wrapped for the step
(``graph.wrapped_call``) so its output is recorded and differentiated, with
``tf.GradientTape.watch`` on TensorFlow, ``jax.vjp`` of a zero added to it on JAX and
``torch.autograd.grad`` of one on PyTorch. The forward pass runs whole (no head-only
backward pass), so this path costs about as much as the model's own training step
would for the layers above the target.
"""

from __future__ import annotations

from audit.engine.graph import apply_parts, wrapped_call
from audit.engine.models import ModelStructureError


class Exposed:
    """The target layer of a cut that runs the whole model (``ModelCut.exposed``)."""

    def __init__(self, layer, path: str) -> None:
        self.layer = layer
        self.path = path

    def run(self, forward, transform):
        """``forward()`` (the model's logits) with the layer's output ``y`` replaced by
        ``transform(y)``; the layer must be called exactly once."""
        calls = []

        def once(out):
            calls.append(None)
            if len(calls) > 1:
                raise ModelStructureError(
                    f"layer {self.path!r} is called more than once in a forward pass; "
                    "Grad-CAM needs a layer used exactly once"
                )
            if not hasattr(out, "shape") or len(out.shape) not in (3, 4):
                raise ModelStructureError(
                    f"layer {self.path!r} does not return one 4-D (batch, height, width, "
                    "channels) or 3-D (batch, tokens, channels) tensor; choose a layer "
                    "that does"
                )
            return transform(out)

        with wrapped_call(self.layer, once):
            logits = forward()
        if not calls:
            raise ModelStructureError(
                f"layer {self.path!r} is not called when the model runs; choose a layer on "
                "the path to the output"
            )
        return logits

    def activations(self, forward):
        """The layer's output in ``forward()`` (no gradients)."""
        seen = {}

        def record(out):
            seen["out"] = out
            return out

        self.run(forward, record)
        return seen["out"]


def tensorflow_step(cut, images):
    """``(activations, logits, gradient_of)`` on TensorFlow, inside ``tf.function``."""
    import tensorflow as tf

    seen = {}
    with tf.GradientTape(persistent=True) as tape:

        def watch(out):
            tape.watch(out)
            seen["out"] = out
            return out

        logits = cut.exposed.run(lambda: apply_parts(cut.head_parts, images, False), watch)
        logits = tf.cast(logits, tf.float32)

    def gradient_of(chosen):
        with tape:
            score = tf.reduce_sum(tf.gather(logits, chosen, axis=1, batch_dims=1))
        return tape.gradient(score, seen["out"])

    return seen["out"], logits, gradient_of


def jax_program(cut, maps_of, post):
    """``compile_program`` on JAX for an exposed layer: ``jax.vjp`` of the logits with
    respect to a zero added to the layer's output (its gradient), in one ``jax.jit``."""
    import jax
    import jax.numpy as jnp

    from audit.engine.backends import _run, jax_run, one_hot_pullback

    parts = list(cut.head_parts)

    def step(states, images, target_sets, extras):
        def logits_of(delta):
            seen = {}

            def add(out):
                seen["out"] = out + delta
                return seen["out"]

            logits = cut.exposed.run(lambda: _run(parts, states, images), add)
            return logits.astype(jnp.float32), seen["out"]

        spec = jax.eval_shape(
            lambda values: cut.exposed.activations(lambda: _run(parts, states, values)), images
        )
        delta = jnp.zeros(spec.shape, spec.dtype)
        logits, pullback, activations = jax.vjp(logits_of, delta, has_aux=True)

        def forward(values):
            return cut.probabilities(_run(parts, states, values))

        gradient_of = one_hot_pullback(pullback, logits)
        out = maps_of(activations, logits, gradient_of, target_sets, images=images, forward=forward)
        return post(out, images, *extras)

    return jax_run(step, [parts])


def torch_program(cut, maps_of, post):
    """``compile_program`` on PyTorch for an exposed layer: autograd of the logits with
    respect to a zero added to the layer's output."""
    import torch

    from audit.engine.backends import torch_run

    def differentiable(images):
        seen = {}

        def add(out):
            seen["delta"] = torch.zeros_like(out, requires_grad=True)
            seen["out"] = out + seen["delta"]
            return seen["out"]

        with torch.enable_grad():
            logits = cut.exposed.run(lambda: apply_parts(cut.head_parts, images, False), add)
        return seen["out"], logits.float(), seen["delta"]

    return torch_run(cut, maps_of, post, differentiable)
