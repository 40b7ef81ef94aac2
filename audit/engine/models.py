"""Load Keras models safely and cut them at the Grad-CAM target layer.

Grad-CAM needs the activations ``A`` of one layer and the gradient of a logit
with respect to ``A``. We cut the model into two Keras models that share the
user's layers and weights (nothing is copied or mutated):

    features: image -> A          (the forward pass up to the target layer)
    head:     A     -> logits     (the rest, with a final softmax or sigmoid bypassed)

so the backward pass runs through the head only. The final softmax is bypassed at
any depth of nesting (a classifier wrapped in ``Sequential([Rescaling, clf])``, a
nested head model); a binary classifier with one output (a sigmoid, or none) gets
two logits ``[-z/2, z/2]`` whose softmax is ``[1 - sigmoid(z), sigmoid(z)]``; a
multi-label classifier (several sigmoids) keeps a sigmoid per class for its
probabilities (``ModelCut.probabilities``).

The cut follows the layer path through nested models (``Sequential([base_model,
GlobalAveragePooling2D(), Dense])``, the usual transfer-learning shape), which is
where tools that build ``Model(model.inputs, [layer.output, model.output])`` fail
with "graph disconnected".
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import keras

PATH_SEPARATOR = "/"


class ModelStructureError(ValueError):
    """The model cannot be explained as asked (no spatial layer, bad layer path, ...)."""


def load_model(path: str | os.PathLike, *, safe_mode: bool = True) -> keras.Model:
    """Load a classifier for auditing.

    * ``.keras`` (Keras 3) and legacy ``.h5`` files load with Keras' safe mode on, so
      a file cannot run arbitrary code (``Lambda`` bytecode) unless ``safe_mode=False``
      is asked for explicitly, for files you trust.
    * A TensorFlow SavedModel folder loads as a ``TFSMLayer`` for predictions; it has
      no layer graph, so Grad-CAM cannot reach inside it (re-save it as ``.keras``).

    The model is loaded without its optimizer state (``compile=False``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    if path.is_dir():
        if not (path / "saved_model.pb").exists():
            raise ModelStructureError(
                f"{path} is a folder but not a TensorFlow SavedModel (no saved_model.pb); "
                "pass a .keras or .h5 file"
            )
        layer = keras.layers.TFSMLayer(str(path), call_endpoint="serving_default")
        return keras.Sequential([layer], name=f"savedmodel_{path.name}")
    if path.suffix not in (".keras", ".h5", ".hdf5"):
        raise ModelStructureError(
            f"{path}: unsupported model format {path.suffix!r}; use .keras, .h5 or a "
            "SavedModel folder"
        )
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        # Keras reports "File not found" for a file that exists but is not a zip.
        raise ModelStructureError(
            f"cannot read model {path}: not a valid .keras file (not a zip archive); "
            "save the model again with model.save('model.keras')"
        )
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
    except (ValueError, TypeError) as error:  # TypeError: an unknown custom layer class
        missing = re.search(r"Could not locate function '([^']+)'", str(error))
        if missing:  # a named function: the file holds its name, not its code
            raise ModelStructureError(
                f"cannot read model {path}: a Lambda layer calls the Python function "
                f"{missing.group(1)!r}, and a .keras file stores only its name, not its "
                "code. Load it in Python after defining the function, decorated with "
                "@keras.saving.register_keras_serializable(), or save the model with that "
                "function as a lambda (which the file stores, and --unsafe-model loads)."
            ) from error
        if safe_mode and ("safe_mode" in str(error) or "Lambda" in str(error)):
            raise ModelStructureError(
                f"{path} contains code (a Lambda layer) and was refused in safe mode. "
                "Only if you trust this file, load it with safe_mode=False "
                "(CLI: --unsafe-model)."
            ) from error
        raise ModelStructureError(f"cannot read model {path}: {error}") from error
    except (OSError, KeyError, zipfile.BadZipFile) as error:
        # A damaged archive (no config.json), or an .h5 file that is not HDF5.
        raise ModelStructureError(
            f"cannot read model {path}: not a valid {path.suffix} file ({error}); "
            "save the model again with model.save()"
        ) from error


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

    def probabilities(self, logits):
        """The model's own probabilities from the logits (``keras.ops``, any backend):
        a sigmoid per class for a multi-label model, otherwise a softmax (a one-output
        model's two logits give ``[1 - sigmoid(z), sigmoid(z)]``)."""
        logits = keras.ops.cast(logits, "float32")
        if self.multi_label:
            return keras.ops.sigmoid(logits)
        return keras.ops.softmax(logits, axis=-1)

    def activations(self, images, training: bool = False):
        """The target layer's activations for a batch of images."""
        return _apply(self.feature_parts, images, training)

    def logits(self, activations, training: bool = False):
        """The head from the target layer's activations to the class logits."""
        return _apply(self.head_parts, activations, training)


def _apply(parts, inputs, training: bool):
    for part in parts:
        inputs = part(inputs, training=training)
    return inputs


def _graph(model: keras.Model):
    """The functional graph of a model: Functional itself, or a Sequential's."""
    if isinstance(model, keras.Sequential):
        if not model.built or getattr(model, "_functional", None) is None:
            raise ModelStructureError(
                f"Sequential model {model.name!r} has no input shape yet; build it "
                "(model.build((None, H, W, C))) or call it on a batch first"
            )
        return model._functional
    if _has_graph(model):
        return model
    raise ModelStructureError(
        f"model {model.name!r} ({type(model).__name__}) is a subclassed model without a "
        "layer graph; Grad-CAM needs a Functional or Sequential model"
    )


def _has_graph(layer) -> bool:
    """A Functional or Sequential model, whose layers the search can enter.

    A nested subclassed model has no layer graph: it is treated as one layer.
    """
    return isinstance(layer, keras.Sequential) or (
        isinstance(layer, keras.Model)
        and hasattr(layer, "_nodes_by_depth")
        and hasattr(layer, "operations")
    )


def _layers(graph) -> list:
    """The graph's layers and operations (``x + y``) in topological order, without inputs."""
    return [op for op in graph.operations if not isinstance(op, keras.layers.InputLayer)]


def _graph_nodes(graph) -> list:
    """Every call (node) in the graph, as Keras records them by depth."""
    return [node for nodes in graph._nodes_by_depth.values() for node in nodes]


def _node(layer, graph):
    """The node where ``layer`` is called inside ``graph``."""
    nodes = [node for node in _graph_nodes(graph) if node.operation is layer]
    if len(nodes) != 1:
        raise ModelStructureError(
            f"layer {layer.name!r} is called {len(nodes)} times in {graph.name!r}; "
            "Grad-CAM needs a layer used exactly once"
        )
    node = nodes[0]
    if len(node.output_tensors) != 1:
        raise ModelStructureError(
            f"layer {layer.name!r} has {len(node.output_tensors)} outputs; the target layer "
            "must return one tensor"
        )
    return node


def _producer(tensor, graph):
    """The layer that produces ``tensor`` in ``graph`` (None for a graph input)."""
    for node in _graph_nodes(graph):
        if node.operation is not None and any(out is tensor for out in node.output_tensors):
            return None if isinstance(node.operation, keras.layers.InputLayer) else node.operation
    return None


def _source_path(tensor, graph) -> list[str]:
    """Path to the innermost layer that produces ``tensor`` ([] for the graph's input)."""
    source = _producer(tensor, graph)
    if source is None:
        return []
    if _has_graph(source):
        inner = _graph(source)
        return [source.name, *_source_path(inner.outputs[0], inner)]
    return [source.name]


def _rank(tensor) -> int:
    return len(tensor.shape)


def _pools(layer, node) -> bool:
    """Whether ``layer`` pools a feature map with real spatial extent: global pooling
    (``keepdims`` too), or flatten/pooling from 4-D to 2-D of a map larger than 1x1 (a
    flatten of a 1x1 map, as after MobileNetV3's 1x1 ``logits`` conv, pools nothing)."""
    if isinstance(layer, keras.layers.GlobalAveragePooling2D | keras.layers.GlobalMaxPooling2D):
        return True
    source, output = node.input_tensors[0], node.output_tensors[0]
    return _rank(source) == 4 and _rank(output) == 2 and tuple(source.shape[1:3]) != (1, 1)


def _find_pooled_feature_map(graph) -> list[str] | None:
    """Path to the last 4-D feature map that feeds global pooling or flatten.

    [] when that map is the graph's own input (a nested head that pools what it is
    given: the caller's tensor is the map); None when no layer pools.
    """
    for layer in reversed(_layers(graph)):
        if _has_graph(layer):
            inner = _find_pooled_feature_map(_graph(layer))
            if inner == []:
                return _source_path(_node(layer, graph).input_tensors[0], graph)
            if inner is not None:
                return [layer.name, *inner]
            continue
        node = _node(layer, graph)
        if _pools(layer, node):
            return _source_path(node.input_tensors[0], graph)
    return None


def _find_last_feature_map(graph) -> list[str] | None:
    """Fallback: path to the last layer with a 4-D output."""
    for layer in reversed(_layers(graph)):
        if _has_graph(layer):
            inner = _find_last_feature_map(_graph(layer))
            if inner is not None:
                return [layer.name, *inner]
        elif _rank(_node(layer, graph).output_tensors[0]) == 4:
            return [layer.name]
    return None


def _all_layer_paths(graph, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int | None]:
    """Every layer path in the model, with its output rank (None for nested models)."""
    paths = {}
    for layer in _layers(graph):
        path = (*prefix, layer.name)
        if _has_graph(layer):
            paths[path] = None
            paths.update(_all_layer_paths(_graph(layer), path))
        else:
            paths[path] = _rank(_node(layer, graph).output_tensors[0])
    return paths


def resolve_layer_path(model: keras.Model, layer: str | None = None) -> list[str]:
    """Find the target layer: automatic, a name anywhere in the model, or a path ``a/b``."""
    graph = _graph(model)
    if layer is None:
        path = _find_pooled_feature_map(graph) or _find_last_feature_map(graph)
        if not path:
            opaque = any(isinstance(op, keras.layers.TFSMLayer) for op in _layers(graph))
            raise ModelStructureError(
                f"model {model.name!r} has no layer with a 4-D (batch, height, width, "
                "channels) output, so there is no spatial map to explain"
                + (
                    "; it wraps a TensorFlow SavedModel, whose layers are not visible. "
                    "Re-save the model in the .keras format to audit it"
                    if opaque
                    else ""
                )
            )
        return path
    paths = _all_layer_paths(graph)
    wanted = tuple(layer.split(PATH_SEPARATOR))
    spatial = ", ".join([PATH_SEPARATOR.join(p) for p, rank in paths.items() if rank == 4][-8:])
    matches = [wanted] if wanted in paths else [p for p in paths if p[-len(wanted) :] == wanted]
    if len(matches) == 1:
        rank = paths[matches[0]]
        if rank not in (None, 4):  # a Dense or pooled layer: no map, whatever the paths
            raise ModelStructureError(
                f"layer {PATH_SEPARATOR.join(matches[0])!r} outputs a {rank}-D tensor; "
                "Grad-CAM needs a 4-D (batch, height, width, channels) feature map. The "
                f"last layers with one are: {spatial}"
            )
        return list(matches[0])
    if not matches:
        raise ModelStructureError(
            f"no layer {layer!r} in model {model.name!r}; the last layers with 4-D "
            f"outputs are: {spatial}"
        )
    raise ModelStructureError(
        f"layer name {layer!r} is ambiguous in model {model.name!r}; use one of the paths: "
        + ", ".join(PATH_SEPARATOR.join(p) for p in matches)
    )


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
    last = _producer(tensor, graph)
    while last is not None and _passes_through(last):
        tensor = _node(last, graph).input_tensors[0]
        last = _producer(tensor, graph)
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
    last = _producer(_under_passes(output, graph), graph)
    if last is None:
        return output, [], None
    node = _node(last, graph)
    source = node.input_tensors[0]
    if _has_graph(last):
        if len(node.input_tensors) != 1:
            return output, [], None
        inner = _graph(last)
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
    last = _producer(graph.outputs[0], graph)
    if last is None:
        return False
    if _has_graph(last):
        return _ends_linear(_graph(last))
    return getattr(getattr(last, "activation", None), "__name__", None) == "linear"


class BinaryLogits(keras.layers.Layer):
    """A one-output classifier's score ``z`` as two logits ``[-z/2, z/2]``: their
    softmax is ``[1 - sigmoid(z), sigmoid(z)]``, and the gradient of class 1's logit
    is half that of ``z`` (class 0's, of ``-z``), so normalised maps are the usual ones."""

    def call(self, scores, training=None):  # JAX's stateless_call passes training
        return keras.ops.concatenate([-scores / 2, scores / 2], axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 2)


def _submodel(inputs, outputs, name: str):
    if inputs is outputs:
        return None
    try:
        return keras.Model(inputs, outputs, name=name)
    except ValueError as error:
        raise ModelStructureError(
            f"cannot cut the model at this layer: {error}. Another path (a skip "
            "connection) bypasses it; choose a layer that every path goes through, "
            "such as the last block's output"
        ) from error


def _cut(graph, path: list[str], scores: bool) -> tuple[list, list, bool]:
    """``(features, head, squash)``: the parts from the graph's input to the layer at
    ``path`` and from there to the graph's output, or its scores before a final softmax
    or sigmoid when ``scores`` (see ``_logit_end``)."""
    # An operation such as ``x + y`` is no layer (graph.get_layer misses it), but its
    # output is a tensor of the graph like any layer's.
    layer = next(op for op in _layers(graph) if op.name == path[0])
    node = _node(layer, graph)
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
        inner = _graph(layer)
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
    """Split ``model`` at ``layer`` (None = automatic) into features and logit head."""
    graph = _graph(model)
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ModelStructureError(
            f"model {model.name!r} has {len(graph.inputs)} inputs and {len(graph.outputs)} "
            "outputs; the audit explains single-input, single-output classifiers"
        )
    path = resolve_layer_path(model, layer)
    output = graph.outputs[0]
    if _rank(output) != 2:
        raise ModelStructureError(
            f"model {model.name!r} outputs shape {tuple(output.shape)}; a classifier must "
            "return (batch, classes)"
        )
    features, head, squash = _cut(graph, path, scores=True)
    feature_rank = _rank(features[-1].outputs[0])
    if feature_rank != 4:
        raise ModelStructureError(
            f"layer {PATH_SEPARATOR.join(path)!r} outputs a {feature_rank}-D tensor; "
            "Grad-CAM needs a 4-D (batch, height, width, channels) feature map"
        )
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
    return ModelCut(
        layer_path=PATH_SEPARATOR.join(path),
        feature_parts=tuple(features),
        head_parts=tuple(head),
        num_classes=num_classes,
        softmax_bypassed=squash is not None,
        # Several sigmoids: each class's probability on its own (one output: two logits).
        multi_label=squash == "sigmoid" and int(output.shape[-1]) > 1,
    )
