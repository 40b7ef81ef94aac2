"""The Grad-CAM engine: one compiled forward + head-only backward per batch."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import keras
import numpy as np
import tensorflow as tf

from audit.engine.cam_methods import get_cam_method, uses_gradients
from audit.engine.cut import ModelCut, cut_model
from audit.engine.maps import (
    as_image_batch,
    cam_sets,
    pad_batch,
    probabilities_of,
    upsample,
    zero_maps,
)
from audit.engine.models import ModelStructureError
from audit.timing import count, stage

# Target value meaning "the class the model predicts" inside the compiled step.
PREDICTED = -1
# Models whose first scores were checked (``GradCAM.check_scores``): every engine of one
# model (the audit pass's, the analysis's) shares one check and at most one warning.
_SCORES_CHECKED: weakref.WeakSet = weakref.WeakSet()
SCORE_CHECK_ROWS = 8


@dataclass(frozen=True)
class Explanation:
    """Maps and the model's outputs for a set of images, in input order.

    ``maps`` are raw (ReLU, not normalised). ``zero`` marks maps that are all zero
    (the target class has no positive evidence at this layer), ``finite`` is False
    where the activations or gradients were not finite; those maps are set to zero.
    """

    maps: np.ndarray  # (N, h, w) float32
    logits: np.ndarray  # (N, classes) float32
    targets: np.ndarray  # (N,) int32, the class each map explains
    zero: np.ndarray  # (N,) bool
    finite: np.ndarray  # (N,) bool
    multi_label: bool = False  # the model ends in a sigmoid per class

    @property
    def predictions(self) -> np.ndarray:
        """The predicted class of each image (argmax of the logits)."""
        return self.logits.argmax(axis=-1)

    @property
    def probabilities(self) -> np.ndarray:
        """What the model's final softmax (or, multi-label, its sigmoids) would have
        returned."""
        return probabilities_of(self.logits, self.multi_label)


class GradCAM:
    """Batched Grad-CAM (and its single-pass variants) for a Keras 3 classifier.

    >>> cam = GradCAM(model)                      # target layer found automatically
    >>> maps = cam.explain(images)                # (N, h, w), predicted classes
    >>> maps = cam.explain(images, targets=labels, size=(224, 224))

    Args:
        model: a Functional or Sequential Keras model (nested models allowed).
        layer: the target layer: a name anywhere in the model, a path through nested
            models such as ``"mobilenetv2_1.00_224/out_relu"``, or None for the last
            4-D feature map that feeds global pooling or flatten.
        method: one of ``audit.CAM_METHODS`` (gradcam, hirescam, gradcam++, xgradcam,
            layercam).
        batch_size: images per compiled step; the last batch of a call is padded to
            it, so the step is traced once per image shape (a call with fewer images
            runs them as one smaller batch unless ``pad_to_batch``).
        jit_compile: compile the step with XLA.
        counterfactual: explain what argues *against* the target (Selvaraju et al.'s
            counterfactual explanations): the method applied to the negated gradients.
        score_channels: for ``scorecam``, the number of channels scored per image
            (highest spatial variance first); None scores all of them.
        pad_to_batch: every call runs whole batches of ``batch_size`` (the last one
            padded), so a few images do not compile the step for another shape: for
            an engine that many stages share (the audit's). By default a call with
            fewer images than ``batch_size`` runs them as one smaller batch.

    Scores are logits: a final softmax is bypassed without changing ``model``, also
    inside nested models; a binary classifier with one output (a sigmoid, or none) has
    two classes, scored by the logits ``[-z/2, z/2]`` of its score ``z``.
    """

    def __init__(
        self,
        model: keras.Model,
        layer: str | None = None,
        method: str = "gradcam",
        *,
        batch_size: int = 32,
        jit_compile: bool = False,
        counterfactual: bool = False,
        score_channels: int | None = 32,
        pad_to_batch: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if any(isinstance(part, keras.layers.TFSMLayer) for part in model.layers):
            raise ModelStructureError(
                f"model {model.name!r} wraps a TensorFlow SavedModel, whose layers Keras 3 "
                "cannot see, so there is no feature map to explain. Re-save the model in the "
                ".keras format (model.save('model.keras')) from the code that built it"
            )
        self.model = model
        self.method = method
        self.batch_size = batch_size
        self.jit_compile = jit_compile
        self.counterfactual = counterfactual
        self._layer = layer
        self.score_channels = score_channels
        self.pad_to_batch = pad_to_batch
        self._cam = get_cam_method(method, score_channels=score_channels)
        if counterfactual and not uses_gradients(self._cam):
            raise ValueError(
                f"counterfactual maps negate the gradients; {method} does not use gradients "
                "(use gradcam, hirescam, gradcam++, xgradcam or layercam)"
            )
        self._cut: ModelCut | None = None
        self._step: Program | None = None
        self._forward = None
        if model.built and not (
            isinstance(model, keras.Sequential) and getattr(model, "_functional", None) is None
        ):
            self._cut = cut_model(model, layer)

    @classmethod
    def for_config(cls, model: keras.Model, config, *, batch_size: int | None = None) -> GradCAM:
        """The engine as an ``AuditConfig`` asks for it (the same for every audit stage;
        ``batch_size`` overrides the config's), padding every call to its batch size."""
        return cls(
            model,
            config.model.layer,
            config.model.method,
            batch_size=batch_size or config.batch_size,
            score_channels=config.model.score_channels,
            pad_to_batch=True,
        )

    @property
    def layer_path(self) -> str:
        """The target layer's path (``outer/inner``); known once the model is built."""
        if self._cut is None:
            raise ModelStructureError("the model is not built yet; call explain() first")
        return self._cut.layer_path

    def feature_shape(self, size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) of the target layer's maps for ``size`` input images (a model
        with a flexible input size has no fixed map size: one image is run to see)."""
        cut = self._ensure_cut(None)
        shape = cut.feature_parts[-1].outputs[0].shape
        if shape[1] is None or shape[2] is None:
            zeros = np.zeros((1, *size, self.input_channels), "float32")
            shape = cut.activations(zeros, training=False).shape
        return int(shape[1]), int(shape[2])

    @property
    def input_channels(self) -> int:
        """The channels of the model's input images (3 for RGB, 1 for grey); known once
        the model is built."""
        return int(self._ensure_cut(None).feature_parts[0].inputs[0].shape[-1])

    @property
    def num_classes(self) -> int:
        """The number of classes the model scores; known once the model is built."""
        return self._ensure_cut(None).num_classes

    @property
    def softmax_bypassed(self) -> bool:
        """Whether a final softmax or sigmoid was skipped to score logits."""
        return self._ensure_cut(None).softmax_bypassed

    @property
    def multi_label(self) -> bool:
        """Whether the model ends in a sigmoid per class (its probabilities are those
        sigmoids, not a softmax)."""
        return self._ensure_cut(None).multi_label

    def check_scores(self, logits: np.ndarray) -> None:
        """Warn (once per model) when the scores read as logits look like probabilities
        (each row in [0, 1], summing to 1) although no final softmax was found: a softmax
        the cut does not know (a ``Lambda``, a custom layer, exp / sum). Grad-CAM of a
        probability saturates, and the audit's probabilities would be a softmax of it."""
        # A few rows can sum to 1 by chance (one image scored [0.5, 0.5]): judged on a
        # batch of at least SCORE_CHECK_ROWS.
        if self.model in _SCORES_CHECKED or len(logits) < SCORE_CHECK_ROWS:
            return
        _SCORES_CHECKED.add(self.model)
        cut = self._ensure_cut(None)
        if cut.softmax_bypassed or logits.shape[-1] < 2:
            return
        logits = np.asarray(logits, dtype=np.float64)
        if (
            (logits >= 0).all()
            and (logits <= 1).all()
            and np.allclose(logits.sum(-1), 1, atol=1e-3)
        ):
            warnings.warn(
                "the model's outputs look like probabilities (each row sums to 1), but no "
                "final softmax layer or operation was found to skip: Grad-CAM then explains "
                "probabilities, whose gradients vanish for confident predictions. End the "
                "model in a Softmax layer (or keras.ops.softmax) after its logits",
                stacklevel=3,
            )

    def _ensure_cut(self, image_shape: Sequence[int] | None) -> ModelCut:
        if self._cut is None:
            if image_shape is None:
                raise ModelStructureError("the model is not built yet; call explain() first")
            # An unbuilt Sequential gets its input shape from the first images.
            self.model.build((None, *image_shape))
            self._cut = cut_model(self.model, self._layer)
        return self._cut

    def cam_batch_many(
        self,
        images: tf.Tensor,
        target_sets: Sequence[tf.Tensor],
        *,
        with_counterfactual: bool = False,
    ):
        """The TensorFlow step for several target sets: one forward, one head backward each.

        Traceable inside ``tf.function``. Returns ``logits`` and lists ``maps``,
        ``targets``, ``finite`` (one per set), as ``cam_sets`` describes.
        """
        cut = self._ensure_cut(images.shape[1:])
        activations = cut.activations(images, training=False)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(activations)
            logits = tf.cast(cut.logits(activations, training=False), tf.float32)

        def gradient_of(chosen):
            # Samples are independent at inference, so one backward pass of the
            # summed scores gives every sample's own gradient.
            with tape:
                score = tf.reduce_sum(tf.gather(logits, chosen, axis=1, batch_dims=1))
            gradients = tape.gradient(score, activations)
            if gradients is None:
                raise ModelStructureError(
                    f"the logits do not depend on layer {cut.layer_path!r} (gradient is "
                    "None); choose a layer on the path to the output"
                )
            return gradients

        result = cam_sets(
            self._cam,
            activations,
            logits,
            gradient_of,
            target_sets,
            counterfactual=self.counterfactual,
            with_counterfactual=with_counterfactual,
            images=images,
            forward=lambda x: cut.probabilities(cut.logits(cut.activations(x))),
        )
        return result

    def program(self, post, *, with_counterfactual: bool = False) -> Program:
        """Compile ``post(cam_sets(...), images, *extras)`` for the running Keras backend.

        The program takes ``(images, target_sets, *extras)`` (NumPy-convertible; a
        target of ``PREDICTED`` explains the predicted class) and returns ``post``'s
        dict as NumPy arrays. ``post`` is ``keras.ops`` code (upsampling, region
        metrics), so it runs on device inside the same compiled program: a
        ``tf.function`` with ``tf.GradientTape`` on TensorFlow, one ``jax.jit`` of a
        stateless call with ``jax.vjp`` through the head on JAX, autograd through the
        head on PyTorch (``audit.engine.backends``). Traced once per input shape.
        """
        from audit.engine import backends

        cut = self._ensure_cut(None)
        backend = backends.running_backend()
        program = Program()

        def counted(out, images, *extras):
            program.traces += 1  # Python runs this once per trace when compiled
            return post(out, images, *extras)

        if backend == "tensorflow":

            def step(images, target_sets, *extras):
                many = self.cam_batch_many(
                    images, target_sets, with_counterfactual=with_counterfactual
                )
                return counted(many, images, *extras)

            function = tf.function(step, jit_compile=self.jit_compile)

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
                self._cam,
                counterfactual=self.counterfactual,
                with_counterfactual=with_counterfactual,
            )
            build = backends.jax_program if backend == "jax" else backends.torch_program
            run = build(cut, maps_of, counted)
        program.run = run
        return program

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """The model's probabilities for each image: the softmax of the logits, or for a
        multi-label model their sigmoids (the predicted class's maps come along).

        With a gradient method the logits come from the engine's own compiled step: one
        compiled program serves maps and predictions, and the maps cost only a backward
        pass through the head. Eigen-CAM and Score-CAM, whose maps cost more than a
        forward pass, use a compiled forward of their own, padded to ``batch_size``.
        The images are counted as ``"forward images"``, the time as ``"forward passes"``
        (``audit.timing``).
        """
        count("forward images", len(images))
        with stage("forward passes"):
            return self._probabilities(images)

    def _probabilities(self, images: np.ndarray) -> np.ndarray:
        if uses_gradients(self._cam):
            return self.explain_details(images).probabilities
        if self._forward is None:
            from audit.engine.backends import compiled_forward

            self._forward = compiled_forward(self._ensure_cut(images.shape[1:]))
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = np.asarray(images[start : start + self.batch_size], dtype="float32")
            padded = chunk if len(chunk) == self.batch_size else pad_batch(chunk, self.batch_size)
            out.append(self._forward(padded)[: len(chunk)])
        return np.concatenate(out)

    def compiled_step(self) -> Program:
        """The compiled single-target step: ``(images, targets) -> {maps, logits,
        targets, finite}`` with maps at the layer's resolution (see ``program``);
        ``explain`` upsamples its output, so every output size shares this program."""
        if self._step is None:

            def first(out, images):
                return {
                    "maps": out["maps"][0],
                    "logits": out["logits"],
                    "targets": out["targets"][0],
                    "finite": out["finite"][0],
                }

            self._step = self.program(first)
        return self._step

    def explain(
        self,
        images,
        targets=None,
        size: tuple[int, int] | None = None,
        *,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Maps ``(N, h, w)`` float32 at the layer's resolution, or ``size`` if given.

        ``targets``: None explains each image's predicted class; otherwise one class
        index per image.
        """
        return self.explain_details(images, targets, size, batch_size=batch_size).maps

    def explain_details(
        self,
        images,
        targets=None,
        size: tuple[int, int] | None = None,
        *,
        batch_size: int | None = None,
    ) -> Explanation:
        """Like ``explain`` but also returns logits, explained classes and flags."""
        images = as_image_batch(images)
        count = len(images)
        targets = self._check_targets(targets, count, images.shape[1:])
        batch = batch_size or self.batch_size
        if not self.pad_to_batch:
            batch = min(batch, max(count, 1))
        self._ensure_cut(images.shape[1:])  # an unbuilt Sequential gets built here
        step = self.compiled_step()
        if size is not None:
            size = (int(size[0]), int(size[1]))
        outputs: dict[str, list[np.ndarray]] = {}
        for start in range(0, count, batch):
            chunk = images[start : start + batch]
            chunk_targets = targets[start : start + batch]
            real = len(chunk)
            if real < batch:  # pad so the step keeps one traced shape
                chunk = pad_batch(chunk, batch)
                chunk_targets = pad_batch(chunk_targets, batch)
            result = {
                key: np.asarray(value)[:real] for key, value in step(chunk, chunk_targets).items()
            }
            if size is not None:  # outside the compiled step: one program for every size
                result["maps"] = keras.ops.convert_to_numpy(upsample(result["maps"], size))
            for key, value in result.items():
                outputs.setdefault(key, []).append(value)
        if count == 0:
            raise ValueError("explain() needs at least one image")
        maps = np.concatenate(outputs["maps"]).astype(np.float32, copy=False)
        self.check_scores(np.concatenate(outputs["logits"])[:count])
        return Explanation(
            maps=maps,
            logits=np.concatenate(outputs["logits"]),
            targets=np.concatenate(outputs["targets"]),
            zero=zero_maps(maps),
            finite=np.concatenate(outputs["finite"]),
            multi_label=self.multi_label,
        )

    def _check_targets(self, targets, count: int, image_shape) -> np.ndarray:
        if targets is None:
            return np.full(count, PREDICTED, dtype=np.int32)
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
        classes = self._ensure_cut(image_shape).num_classes
        bad = (targets < 0) | (targets >= classes)
        if bad.any():
            index = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"targets[{index}] = {targets[index]} is not a class index of this model "
                f"(0..{classes - 1})"
            )
        return targets.astype(np.int32)


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
