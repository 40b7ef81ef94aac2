"""Cut a model at the target layer into features and a logit head: a final softmax
or sigmoid is bypassed (also inside nested models) without changing the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from audit.engine.exposed import Exposed
from audit.engine.graph import (
    apply_parts,
    graph_of,
    has_graph,
    in_graph,
    layer_at,
    layers_of,
    node_of,
    producer_of,
    rank_of,
    resolve_layer_path,
)
from audit.engine.models import PATH_SEPARATOR, ModelStructureError
from audit.engine.tokens import to_grid, token_grid


@dataclass(frozen=True)
class ModelCut:
    """A model split at the target layer: ``logits = head(features(x))``.

    Both halves are sequences of Keras models/layers that share the user's layers.
    """

    layer_path: str
    feature_parts: tuple
    head_parts: tuple
    num_classes: int  # 2 for a binary classifier with one output
    softmax_bypassed: bool  # a final softmax or sigmoid was skipped
    multi_label: bool = False  # it ended in several sigmoids: one probability per class
    # A layer the cut cannot split at (inside a residual branch, or inside another
    # layer): ``head_parts`` are then the whole model up to its logits, and the layer's
    # output is exposed as it runs (``audit.engine.exposed``); no ``feature_parts``.
    exposed: Exposed | None = None
    aspect: float | None = None  # height / width of the input: a token layer's patch grid

    def probabilities(self, logits):
        """The model's own probabilities from the logits (``keras.ops``, any backend):
        a sigmoid per class for a multi-label model, otherwise a softmax (a one-output
        model's two logits give ``[1 - sigmoid(z), sigmoid(z)]``)."""
        logits = keras.ops.cast(logits, "float32")
        if self.multi_label:
            return keras.ops.sigmoid(logits)
        return keras.ops.softmax(logits, axis=-1)

    def activations(self, images, training: bool = False):
        """The target layer's activations for a batch of images (4-D, or 3-D tokens)."""
        if self.exposed is not None:
            return self.exposed.activations(lambda: self.scores(images, training))
        return apply_parts(self.feature_parts, images, training)

    def logits(self, activations, training: bool = False):
        """The head from the target layer's activations to the class logits."""
        if self.exposed is not None:
            raise ModelStructureError(
                f"layer {self.layer_path!r} has no head of its own (see audit.engine.exposed)"
            )
        return apply_parts(self.head_parts, activations, training)

    def scores(self, images, training: bool = False):
        """The class logits of a batch of images."""
        if self.exposed is not None:
            return apply_parts(self.head_parts, images, training)
        return self.logits(self.activations(images, training), training)

    def to_grid(self, values):
        """Activations or gradients as a ``(batch, rows, columns, channels)`` map: a
        token layer's patch tokens laid onto their grid (``audit.engine.tokens``)."""
        return to_grid(values, self.aspect)


# tf.nn.softmax is named softmax_v2; keras.activations and keras.ops name theirs softmax.
# A log-softmax counts as a softmax: the softmax of log-probabilities is the softmax of
# the logits, so skipping it keeps the probabilities and leaves the logits.
_SOFTMAX_NAMES = ("softmax", "softmax_v2", "log_softmax", "log_softmax_v2")


def _squashes(activation, width: int) -> str | None:
    """How ``activation`` turns scores into probabilities: ``"softmax"``, ``"sigmoid"``
    (one output: a binary classifier; several: a multi-label one), or None."""
    name = getattr(activation, "__name__", None)
    if name in _SOFTMAX_NAMES and width == 1:
        raise ModelStructureError(
            "the model ends in a softmax over one output, which is constant; a binary "
            "classifier with one output needs a sigmoid (or no activation)"
        )
    if name in _SOFTMAX_NAMES:
        return "softmax"
    return "sigmoid" if name == "sigmoid" else None


def _over_classes(axis) -> bool:
    """Whether a softmax over ``axis`` of a ``(batch, classes)`` output is over the
    classes (not over the batch: that gives no class probabilities)."""
    axes = tuple(axis) if isinstance(axis, list | tuple) else (axis,)
    return set(axes) <= {-1, 1}


def _passes_through(operation) -> bool:
    """A step after the squash that leaves the values as they are: a linear
    ``Activation`` (mixed precision's float32 output layer), an ``Identity`` layer, a
    cast."""
    if isinstance(operation, keras.layers.Activation):
        return getattr(operation.activation, "__name__", None) == "linear"
    return isinstance(operation, keras.layers.Identity) or type(operation).__name__ == "Cast"


def _under_passes(tensor, graph):
    """The tensor that the value-keeping steps ending in ``tensor`` start from
    (``_passes_through``); ``tensor`` itself when it is not made by one."""
    last = producer_of(tensor, graph)
    while last is not None and _passes_through(last):
        tensor = node_of(last, graph).input_tensors[0]
        last = producer_of(tensor, graph)
    return tensor


def _squashing_operation(operation, width: int) -> str | None:
    """``_squashes`` for an operation of a functional model (no layer):
    ``keras.ops.softmax(x)`` or ``keras.activations.softmax(x)`` (or a log-softmax) over
    the classes, or ``keras.ops.sigmoid(x)``."""
    if isinstance(operation, keras.layers.Layer) or not isinstance(operation, keras.Operation):
        return None
    kind = type(operation).__name__
    if kind in ("Softmax", "LogSoftmax"):
        if not _over_classes(getattr(operation, "axis", -1)):
            return None
        return _squashes(keras.activations.softmax, width)
    return "sigmoid" if kind == "Sigmoid" else None


def _linear_twin(layer, input_shape):
    """``layer`` without its activation: built from its config, on the very same variables
    (not copies), so later weight changes (training, ``load_weights``) are seen."""
    shared = {variable.name: variable for variable in layer.weights}
    config = layer.get_config() | {"activation": "linear", "name": f"{layer.name}_logits"}
    twin = type(layer).from_config(config)

    def reuse(*args, name=None, **kwargs):  # build() asks for each weight by name
        if name not in shared:
            raise ModelStructureError(
                f"cannot score the logits of {layer.name!r} ({type(layer).__name__}): it ends "
                "in a softmax or sigmoid and its weights are not named as its build() asks "
                "for them; end the model with a separate Activation layer instead"
            )
        return shared[name]

    twin.add_weight = reuse
    twin.build(input_shape)
    del twin.add_weight
    return twin


def _logit_end(graph) -> tuple:
    """Where the graph's scores before a final softmax or sigmoid are:
    ``(tensor, tail, squash)`` with the scores ``= tail(tensor)`` and ``squash`` the
    function skipped (``"softmax"`` or ``"sigmoid"``; None when nothing was skipped).

    A separate ``Softmax``/``Activation('softmax')`` layer, or a softmax operation
    (``keras.ops.softmax(x)``), is skipped, also under steps that keep the values (a
    linear float32 ``Activation``, a cast: ``_passes_through``); a layer with
    ``activation='softmax'`` (usually ``Dense``) is re-applied through its linear twin
    (``_linear_twin``); a nested model that produces the output is replaced by its own
    part up to its scores, at any depth. The user's model is never modified.
    """
    output = graph.outputs[0]
    width = output.shape[-1]
    last = producer_of(_under_passes(output, graph), graph)
    if last is None:
        return output, [], None
    node = node_of(last, graph)
    source = node.input_tensors[0]
    if has_graph(last):
        if len(node.input_tensors) != 1:
            return output, [], None
        inner = graph_of(last)
        end, tail, squash = _logit_end(inner)
        if squash is None:
            return output, [], None
        lead = _submodel(inner.inputs[0], end, f"{last.name}_scores")
        return source, [part for part in (lead, *tail) if part is not None], squash
    if isinstance(last, keras.layers.Softmax):
        if not _over_classes(last.axis):
            return output, [], None
        return source, [], _squashes(keras.activations.softmax, width)
    squash = (
        _squashes(last.activation, width)
        if isinstance(last, keras.layers.Activation)
        else _squashing_operation(last, width)
    )
    if squash is not None:
        return source, [], squash
    squash = _squashes(getattr(last, "activation", None), width)
    if squash is not None:
        return source, [_linear_twin(last, source.shape)], squash
    return output, [], None


def _ends_linear(graph) -> bool:
    """Whether the graph's output comes from a layer with a linear activation (at any
    depth of nesting): a score, not a probability."""
    last = producer_of(graph.outputs[0], graph)
    if last is None:
        return False
    if has_graph(last):
        return _ends_linear(graph_of(last))
    return getattr(getattr(last, "activation", None), "__name__", None) == "linear"


class BinaryLogits(keras.layers.Layer):
    """A one-output classifier's score ``z`` as two logits ``[-z/2, z/2]``: their
    softmax is ``[1 - sigmoid(z), sigmoid(z)]``, and the gradient of class 1's logit
    is half that of ``z`` (class 0's, of ``-z``), so normalised maps are the usual ones."""

    def call(self, scores, training=None):  # JAX's stateless_call passes training
        return keras.ops.concatenate([-scores / 2, scores / 2], axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 2)


class _Bypassed(ModelStructureError):
    """Another path (a skip connection) bypasses the layer: no head starts at its
    output, so the cut exposes it instead."""


def _submodel(inputs, outputs, name: str):
    if inputs is outputs:
        return None
    try:
        return keras.Model(inputs, outputs, name=name)
    except ValueError as error:
        raise _Bypassed(str(error)) from error


def _cut(graph, path: list[str], scores: bool) -> tuple[list, list, bool]:
    """``(features, head, squash)``: the parts from the graph's input to the layer at
    ``path`` and from there to the graph's output, or its scores before a final softmax
    or sigmoid when ``scores`` (see ``_logit_end``)."""
    # An operation such as ``x + y`` is no layer (graph.get_layer misses it), but its
    # output is a tensor of the graph like any layer's.
    layer = next(op for op in layers_of(graph) if op.name == path[0])
    node = node_of(layer, graph)
    layer_in, layer_out = node.input_tensors[0], node.output_tensors[0]
    if len(path) == 1:
        end, tail, squash = _logit_end(graph) if scores else (graph.outputs[0], [], None)
        features = [_submodel(graph.inputs[0], layer_out, "features")]
        head = [_submodel(layer_out, end, "head"), *tail]
    else:
        if len(node.input_tensors) != 1:
            raise ModelStructureError(
                f"nested model {layer.name!r} takes {len(node.input_tensors)} inputs; models "
                "on the path to the target layer must take one tensor"
            )
        inner = graph_of(layer)
        if scores and layer_out is _under_passes(graph.outputs[0], graph):
            # The nested model on the path makes the output (steps after it keep its
            # values): its own scores are the end.
            inner_features, head, squash = _cut(inner, path[1:], scores=True)
        else:
            inner_features, inner_head, _ = _cut(inner, path[1:], scores=False)
            end, tail, squash = _logit_end(graph) if scores else (graph.outputs[0], [], None)
            head = [*inner_head, _submodel(layer_out, end, "head_post"), *tail]
        features = [_submodel(graph.inputs[0], layer_in, "features_pre"), *inner_features]
    return [f for f in features if f is not None], [h for h in head if h is not None], squash


def cut_model(model: keras.Model, layer: str | None = None) -> ModelCut:
    """Split ``model`` at ``layer`` (None = automatic) into features and logit head, or,
    where no head starts at the layer, expose it in the whole model (``exposed``)."""
    graph = graph_of(model)
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ModelStructureError(
            f"model {model.name!r} has {len(graph.inputs)} inputs and {len(graph.outputs)} "
            "outputs; the audit explains single-input, single-output classifiers"
        )
    path = resolve_layer_path(model, layer)
    output = graph.outputs[0]
    if rank_of(output) != 2:
        raise ModelStructureError(
            f"model {model.name!r} outputs shape {tuple(output.shape)}; a classifier must "
            "return (batch, classes)"
        )
    exposed = None
    try:
        if not in_graph(model, path):
            raise _Bypassed("inside another layer")
        features, head, squash = _cut(graph, path, scores=True)
    except _Bypassed:
        end, tail, squash = _logit_end(graph)
        features, head = [], [p for p in (_submodel(graph.inputs[0], end, "scores"), *tail) if p]
        exposed = Exposed(layer_at(model, path), PATH_SEPARATOR.join(path))
    num_classes = int(output.shape[-1])
    if num_classes == 1 and squash is None and not _ends_linear(graph):
        # Its one output may already be a probability (a Lambda, a tanh): as a
        # score it would make class 1 win every image.
        raise ModelStructureError(
            f"model {model.name!r} has one output and does not end in a layer whose "
            "activation is linear or sigmoid; end it with Dense(1) (with or without "
            "activation='sigmoid') or Activation('sigmoid'), so its score can be read"
        )
    if num_classes == 1:  # a binary classifier's one score: two classes (BinaryLogits)
        binary = BinaryLogits(name="binary_logits")
        binary.build(output.shape)  # JAX's stateless calls need built layers
        head.append(binary)
        num_classes = 2
    height, width = graph.inputs[0].shape[1:3]
    cut = ModelCut(
        layer_path=PATH_SEPARATOR.join(path),
        feature_parts=tuple(features),
        head_parts=tuple(head),
        num_classes=num_classes,
        softmax_bypassed=squash is not None,
        # Several sigmoids: each class's probability on its own (one output: two logits).
        multi_label=squash == "sigmoid" and int(output.shape[-1]) > 1,
        exposed=exposed,
        aspect=height / width if height and width else None,
    )
    _check_feature_map(cut, graph)
    return cut


def _check_feature_map(cut: ModelCut, graph) -> None:
    """The layer's output must be a map or patch tokens with a grid: known from the
    graph, or from one image run through an exposed layer (when the input size is)."""
    if cut.exposed is None:
        shape = tuple(cut.feature_parts[-1].outputs[0].shape)
    elif all(graph.inputs[0].shape[1:]):
        zeros = keras.ops.zeros((1, *graph.inputs[0].shape[1:]))
        shape = tuple(cut.activations(zeros).shape)
    else:
        return  # a flexible input size: checked when the first batch runs
    if len(shape) not in (3, 4):
        raise ModelStructureError(
            f"layer {cut.layer_path!r} outputs a {len(shape)}-D tensor; Grad-CAM needs a 4-D "
            "(batch, height, width, channels) feature map or 3-D (batch, tokens, channels) "
            "patch tokens"
        )
    if len(shape) == 3 and shape[1] is not None:
        token_grid(int(shape[1]), cut.aspect)  # a clear error when there is no grid
