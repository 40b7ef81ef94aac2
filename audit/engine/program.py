"""The compiled program of the engine: one forward pass and a head-only backward pass
per target set, the CAM method, and whatever the caller computes from the maps, for
the running Keras backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import tensorflow as tf

from audit.engine import exposed
from audit.engine.cut import ModelCut
from audit.engine.maps import cam_sets
from audit.engine.models import ModelStructureError
from audit.timing import compiled


class Program:
    """A compiled step: ``program(images, target_sets, *extras)`` with NumPy-convertible
    inputs (``target_sets``: a list of per-image target arrays, or one such array)
    returns a dict of NumPy arrays.

    ``traces`` counts how often Python ran the step's body: once per input shape on
    TensorFlow and JAX; every call on PyTorch, which runs eagerly.
    """

    def __init__(self) -> None:
        self.run = None
        self.traces = 0

    def __call__(self, images, target_sets, *extras) -> dict[str, np.ndarray]:
        if not isinstance(target_sets, list | tuple):
            target_sets = [target_sets]
        return self.run(images, list(target_sets), *extras)


def tensorflow_cam_sets(
    cut: ModelCut,
    method: Callable,
    images: tf.Tensor,
    target_sets: Sequence[tf.Tensor],
    *,
    counterfactual: bool = False,
    with_counterfactual: bool = False,
) -> dict:
    """The TensorFlow step for several target sets: one forward, one head backward each.

    Traceable inside ``tf.function``. Returns ``logits`` and lists ``maps``,
    ``targets``, ``finite`` (one per set), as ``cam_sets`` describes.
    """
    if cut.exposed is not None:  # the whole model runs; the layer's output is watched
        activations, logits, gradient_at = exposed.tensorflow_step(cut, images)
    else:
        activations = cut.activations(images, training=False)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(activations)
            logits = tf.cast(cut.logits(activations, training=False), tf.float32)

        def gradient_at(chosen):
            # Samples are independent at inference, so one backward pass of the summed
            # scores gives every sample's own gradient.
            with tape:
                score = tf.reduce_sum(tf.gather(logits, chosen, axis=1, batch_dims=1))
            return tape.gradient(score, activations)

    def gradient_of(chosen):
        gradients = gradient_at(chosen)
        if gradients is None:
            raise ModelStructureError(
                f"the logits do not depend on layer {cut.layer_path!r} (gradient is "
                "None); choose a layer on the path to the output"
            )
        return gradients

    return cam_sets(
        method,
        activations,
        logits,
        gradient_of,
        target_sets,
        counterfactual=counterfactual,
        with_counterfactual=with_counterfactual,
        images=images,
        forward=lambda x: cut.probabilities(cut.scores(x)),
        to_grid=cut.to_grid,
    )


def compile_program(
    cut: ModelCut,
    method: Callable,
    post: Callable,
    *,
    counterfactual: bool = False,
    with_counterfactual: bool = False,
    jit_compile: bool = False,
) -> Program:
    """Compile ``post(cam_sets(...), images, *extras)`` for the running Keras backend.

    The program takes ``(images, target_sets, *extras)`` (NumPy-convertible; a target
    of ``PREDICTED`` explains the predicted class) and returns ``post``'s dict as NumPy
    arrays. ``post`` is ``keras.ops`` code (upsampling, region metrics), so it runs on
    device inside the same compiled program: a ``tf.function`` with
    ``tf.GradientTape`` on TensorFlow, one ``jax.jit`` of a stateless call with
    ``jax.vjp`` through the head on JAX, autograd through the head on PyTorch
    (``audit.engine.backends``). Traced once per input shape.
    """
    from audit.engine import backends

    backend = backends.running_backend()
    program = Program()

    def counted(out, images, *extras):
        program.traces += 1  # Python runs this once per trace when compiled
        if backend != "torch":  # (PyTorch runs eagerly: every call, nothing compiled)
            compiled()
        return post(out, images, *extras)

    if backend == "tensorflow":

        def step(images, target_sets, *extras):
            many = tensorflow_cam_sets(
                cut,
                method,
                images,
                target_sets,
                counterfactual=counterfactual,
                with_counterfactual=with_counterfactual,
            )
            return counted(many, images, *extras)

        function = tf.function(step, jit_compile=jit_compile)

        def run(images, target_sets, *extras):
            out = function(
                tf.convert_to_tensor(images),
                [tf.convert_to_tensor(targets, tf.int32) for targets in target_sets],
                *(tf.convert_to_tensor(extra) for extra in extras),
            )
            return {key: value.numpy() for key, value in out.items()}

    else:
        maps_of = partial(
            cam_sets,
            method,
            counterfactual=counterfactual,
            with_counterfactual=with_counterfactual,
            to_grid=cut.to_grid,
        )
        programs = exposed if cut.exposed is not None else backends
        build = programs.jax_program if backend == "jax" else programs.torch_program
        run = build(cut, maps_of, counted)
    program.run = run
    return program


def checked_targets(targets, count: int, classes: int) -> np.ndarray:
    """``targets`` as int32 class indices, one per image, or a ``ValueError`` that says
    what is wrong and what to pass."""
    targets = np.asarray(targets)
    if targets.ndim == 0:
        raise ValueError(
            "targets must hold one class index per image; for one class for all "
            f"images pass np.full({count}, class_index)"
        )
    if targets.shape != (count,):
        raise ValueError(
            f"targets has shape {targets.shape} but there are {count} images; pass one "
            "class index per image (or None for the predicted class)"
        )
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    bad = (targets < 0) | (targets >= classes)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"targets[{index}] = {targets[index]} is not a class index of this model "
            f"(0..{classes - 1})"
        )
    return targets.astype(np.int32)
