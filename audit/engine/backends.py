"""The engine's compiled programs on each Keras backend: the Grad-CAM step on JAX and
PyTorch, and the plain forward pass and the input gradients (Guided Grad-CAM) on all
three.

TensorFlow stays the default and the reference (``GradCAM.cam_batch_many``,
``tf.GradientTape``); every backend shares ``explain.cam_sets`` (the maps, in
``keras.ops``) and the caller's ``post`` (upsampling, region metrics), so they run
inside each backend's compiled program unchanged. On JAX the step is one jitted
function of the weights: the features and head halves of the cut run as stateless
calls, and ``jax.vjp`` through the head gives every target's gradient with one
backward pass per target set (the cotangent is the one-hot of each sample's target:
the gradient of the sum of per-sample scores, exactly as on TensorFlow).
"""

from __future__ import annotations

import keras
import numpy as np

from audit.timing import compiled

BACKENDS = ("tensorflow", "jax", "torch")


def counted(value):
    """``value``, counting one compile (``audit.timing.COMPILES``): called in the body of
    a compiled function, which Python runs once per trace."""
    compiled()
    return value


def running_backend() -> str:
    """The running Keras backend, or a clear error if the engine is not written for it."""
    backend = keras.backend.backend()
    if backend not in BACKENDS:
        raise NotImplementedError(
            f"the audit runs on the tensorflow, jax and torch Keras backends; this process "
            f"uses {backend!r} (set KERAS_BACKEND=tensorflow, jax or torch before importing keras)"
        )
    return backend


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


def jax_program(cut, maps_of, post):
    """``GradCAM.program`` on JAX: one jitted function of the weights and the inputs.

    ``maps_of``: ``explain.cam_sets`` with the engine's method and options bound."""
    import jax
    import jax.numpy as jnp

    features, head = list(cut.feature_parts), list(cut.head_parts)

    def step(feature_states, head_states, images, target_sets, extras):
        activations = _run(features, feature_states, images)

        def scores(values):
            return _run(head, head_states, values).astype(jnp.float32)

        logits, pullback = jax.vjp(scores, activations)

        def forward(values):  # Score-CAM's masked forward passes: probabilities
            return cut.probabilities(scores(_run(features, feature_states, values)))

        gradient_of = one_hot_pullback(pullback, logits)
        out = maps_of(activations, logits, gradient_of, target_sets, images=images, forward=forward)
        return post(out, images, *extras)

    return jax_run(step, [features, head])


def one_hot_pullback(pullback, logits):
    """``gradient_of(chosen)`` from a ``jax.vjp`` pullback of the logits: the one-hot
    cotangent gives d sum_i logits[i, chosen_i], one backward pass per target set."""
    import jax

    def gradient_of(chosen):
        (gradients,) = pullback(jax.nn.one_hot(chosen, logits.shape[-1], dtype=logits.dtype))
        return gradients

    return gradient_of


def jax_run(step, state_parts):
    """``step(*states, images, target_sets, extras)`` jitted, as a ``Program.run``: the
    weights of each list of parts are read per call (weight changes are seen)."""
    import jax
    import jax.numpy as jnp

    jitted = jax.jit(step)  # its step counts its traces (compile_program's post)

    def run(images, target_sets, *extras):
        out = jitted(
            *(_states(parts) for parts in state_parts),
            jnp.asarray(np.asarray(images, dtype="float32")),
            [jnp.asarray(np.asarray(targets, dtype="int32")) for targets in target_sets],
            [jnp.asarray(extra) for extra in extras],
        )
        return {key: np.asarray(value) for key, value in out.items()}

    return run


def torch_program(cut, maps_of, post):
    """``GradCAM.program`` on PyTorch: the features run without a graph; the head runs
    on activations that require gradients, and ``torch.autograd.grad`` of the summed
    target logits gives every sample's gradient with one backward pass through the head
    per target set."""
    import torch

    def differentiable(images):
        with torch.no_grad():
            activations = cut.activations(images, training=False)
        activations = activations.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = cut.logits(activations, training=False).float()
        return activations, logits, activations

    return torch_run(cut, maps_of, post, differentiable)


def torch_run(cut, maps_of, post, differentiable):
    """A ``Program.run`` on PyTorch: ``differentiable(images)`` returns the activations,
    the logits and the tensor whose gradient is the activations' (the activations
    themselves, or a zero added to them); one ``torch.autograd.grad`` per target set."""
    import torch

    ops = keras.ops

    def forward(values):  # Score-CAM's masked forward passes: probabilities
        return cut.probabilities(cut.scores(values))

    def run(images, target_sets, *extras):
        images = ops.convert_to_tensor(np.asarray(images, dtype="float32"))
        target_sets = [
            ops.convert_to_tensor(np.asarray(targets, dtype="int32")) for targets in target_sets
        ]
        extras = [ops.convert_to_tensor(extra) for extra in extras]
        activations, logits, source = differentiable(images)

        def gradient_of(chosen):
            with torch.enable_grad():
                score = torch.gather(logits, 1, chosen[:, None].long()).sum()
                (gradients,) = torch.autograd.grad(score, source, retain_graph=True)
            return gradients

        with torch.no_grad():
            out = maps_of(
                activations.detach(),
                logits.detach(),
                gradient_of,
                target_sets,
                images=images,
                forward=forward,
            )
            result = post(out, images, *extras)
            return {key: ops.convert_to_numpy(value) for key, value in result.items()}

    return run


def compiled_forward(cut):
    """``images -> the model's probabilities`` as NumPy (``ModelCut.probabilities``),
    compiled for the running backend."""
    backend = running_backend()
    if backend == "tensorflow":
        import tensorflow as tf

        function = tf.function(lambda x: counted(cut.probabilities(cut.scores(x))))
        return lambda images: function(tf.convert_to_tensor(images)).numpy()
    if backend == "jax":
        import jax

        parts = list(cut.feature_parts) + list(cut.head_parts)
        jitted = jax.jit(lambda states, x: counted(cut.probabilities(_run(parts, states, x))))
        return lambda images: np.asarray(jitted(_states(parts), images))
    import torch

    def forward(images):
        with torch.no_grad():
            logits = cut.scores(keras.ops.convert_to_tensor(images))
            return keras.ops.convert_to_numpy(cut.probabilities(logits))

    return forward


def input_gradients(cut):
    """``(images, targets) -> d(sum_i logits[i, targets_i]) / d images`` as NumPy, compiled
    for the running backend (Guided Grad-CAM's backward pass to the input)."""
    backend = running_backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function
        def gradients(images, targets):
            with tf.GradientTape() as tape:
                tape.watch(images)
                logits = tf.cast(cut.scores(images), tf.float32)
                score = tf.reduce_sum(tf.gather(logits, targets, axis=1, batch_dims=1))
            return counted(tape.gradient(score, images))

        return lambda images, targets: gradients(
            tf.convert_to_tensor(images), tf.convert_to_tensor(targets, tf.int32)
        ).numpy()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        parts = list(cut.feature_parts) + list(cut.head_parts)

        def score(images, states, targets):
            logits = _run(parts, states, images).astype(jnp.float32)
            return counted(jnp.take_along_axis(logits, targets[:, None], axis=1).sum())

        jitted = jax.jit(jax.grad(score))
        return lambda images, targets: np.asarray(
            jitted(jnp.asarray(images), _states(parts), jnp.asarray(targets, dtype="int32"))
        )
    import torch

    def run(images, targets):
        images = keras.ops.convert_to_tensor(np.asarray(images, dtype="float32"))
        images.requires_grad_(True)
        chosen = keras.ops.convert_to_tensor(np.asarray(targets, dtype="int64"))
        with torch.enable_grad():
            logits = cut.scores(images).float()
            score = torch.gather(logits, 1, chosen[:, None]).sum()
            (gradients,) = torch.autograd.grad(score, images)
        return keras.ops.convert_to_numpy(gradients)

    return run
