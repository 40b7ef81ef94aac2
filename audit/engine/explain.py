"""The Grad-CAM engine: one compiled forward + head-only backward per batch."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from audit.engine.cam_methods import get_cam_method, uses_gradients
from audit.engine.cut import ModelCut, cut_model
from audit.engine.maps import as_image_batch, pad_batch, probabilities_of, upsample, zero_maps
from audit.engine.models import ModelStructureError
from audit.engine.program import Program, checked_targets, compile_program, tensorflow_cam_sets
from audit.engine.tokens import token_grid
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
            from audit.engine.cam_methods import CAM_METHODS

            usable = ", ".join(name for name, cam in CAM_METHODS.items() if uses_gradients(cam))
            raise ValueError(
                f"counterfactual maps negate the gradients; {method} does not use gradients "
                f"(use one that does: {usable})"
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
        shape = None if cut.exposed else cut.feature_parts[-1].outputs[0].shape
        if shape is None or any(side is None for side in shape[1:]):
            zeros = np.zeros((1, *size, self.input_channels), "float32")
            shape = cut.activations(zeros, training=False).shape
        if len(shape) == 3:  # patch tokens: their grid
            _, rows, columns = token_grid(int(shape[1]), cut.aspect or size[0] / size[1])
            return rows, columns
        return int(shape[1]), int(shape[2])

    @property
    def input_channels(self) -> int:
        """The channels of the model's input images (3 for RGB, 1 for grey); known once
        the model is built."""
        cut = self._ensure_cut(None)
        return int((cut.feature_parts or cut.head_parts)[0].inputs[0].shape[-1])

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
        """The TensorFlow step for several target sets (``program.tensorflow_cam_sets``):
        traceable inside ``tf.function``."""
        return tensorflow_cam_sets(
            self._ensure_cut(images.shape[1:]),
            self._cam,
            images,
            target_sets,
            counterfactual=self.counterfactual,
            with_counterfactual=with_counterfactual,
        )

    def program(self, post, *, with_counterfactual: bool = False) -> Program:
        """Compile ``post(cam_sets(...), images, *extras)`` for the running Keras backend
        (``audit.engine.program.compile_program``)."""
        return compile_program(
            self._ensure_cut(None),
            self._cam,
            post,
            counterfactual=self.counterfactual,
            with_counterfactual=with_counterfactual,
            jit_compile=self.jit_compile,
        )

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

    def explain(self, images, targets=None, size=None, **options) -> np.ndarray:
        """Maps ``(N, h, w)`` float32 at the layer's resolution, or ``size`` if given.

        ``targets``: None explains each image's predicted class; otherwise one class
        index per image. ``options``: ``batch_size`` (``explain_details``).
        """
        return self.explain_details(images, targets, size, **options).maps

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
        return checked_targets(targets, count, self._ensure_cut(image_shape).num_classes)
