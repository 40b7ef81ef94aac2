"""A Keras model's layer graph, nested models included: its layers, nodes and ranks,
and the target layer (automatic, a name anywhere, or a path ``outer/inner``).
"""

from __future__ import annotations

from contextlib import contextmanager

import keras
import numpy as np

from audit.engine.models import PATH_SEPARATOR, ModelStructureError


def apply_parts(parts, inputs, training: bool):
    for part in parts:
        inputs = part(inputs, training=training)
    return inputs


def graph_of(model: keras.Model):
    """The functional graph of a model: Functional itself, or a Sequential's."""
    if isinstance(model, keras.Sequential):
        if not model.built or getattr(model, "_functional", None) is None:
            raise ModelStructureError(
                f"Sequential model {model.name!r} has no input shape yet; build it "
                "(model.build((None, H, W, C))) or call it on a batch first"
            )
        return model._functional
    if has_graph(model):
        return model
    raise ModelStructureError(
        f"model {model.name!r} ({type(model).__name__}) is a subclassed model without a "
        "layer graph; Grad-CAM needs a Functional or Sequential model"
    )


def has_graph(layer) -> bool:
    """A Functional or Sequential model, whose layers the search can enter.

    A nested subclassed model has no layer graph: it is treated as one layer.
    """
    return isinstance(layer, keras.Sequential) or (
        isinstance(layer, keras.Model)
        and hasattr(layer, "_nodes_by_depth")
        and hasattr(layer, "operations")
    )


def layers_of(graph) -> list:
    """The graph's layers and operations (``x + y``) in topological order, without inputs."""
    return [op for op in graph.operations if not isinstance(op, keras.layers.InputLayer)]


def _graph_nodes(graph) -> list:
    """Every call (node) in the graph, as Keras records them by depth."""
    return [node for nodes in graph._nodes_by_depth.values() for node in nodes]


def node_of(layer, graph):
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


def producer_of(tensor, graph):
    """The layer that produces ``tensor`` in ``graph`` (None for a graph input)."""
    for node in _graph_nodes(graph):
        if node.operation is not None and any(out is tensor for out in node.output_tensors):
            return None if isinstance(node.operation, keras.layers.InputLayer) else node.operation
    return None


def _source_path(tensor, graph) -> list[str]:
    """Path to the innermost layer that produces ``tensor`` ([] for the graph's input)."""
    source = producer_of(tensor, graph)
    if source is None:
        return []
    if has_graph(source):
        inner = graph_of(source)
        return [source.name, *_source_path(inner.outputs[0], inner)]
    return [source.name]


def rank_of(tensor) -> int:
    return len(tensor.shape)


def _pools(layer, node) -> bool:
    """Whether ``layer`` pools a feature map with real spatial extent: global pooling
    (``keepdims`` too), or flatten/pooling from 4-D to 2-D of a map larger than 1x1 (a
    flatten of a 1x1 map, as after MobileNetV3's 1x1 ``logits`` conv, pools nothing)."""
    if isinstance(layer, keras.layers.GlobalAveragePooling2D | keras.layers.GlobalMaxPooling2D):
        return True
    source, output = node.input_tensors[0], node.output_tensors[0]
    return rank_of(source) == 4 and rank_of(output) == 2 and tuple(source.shape[1:3]) != (1, 1)


def _find_pooled_feature_map(graph) -> list[str] | None:
    """Path to the last 4-D feature map that feeds global pooling or flatten.

    [] when that map is the graph's own input (a nested head that pools what it is
    given: the caller's tensor is the map); None when no layer pools.
    """
    for layer in reversed(layers_of(graph)):
        if has_graph(layer):
            inner = _find_pooled_feature_map(graph_of(layer))
            if inner == []:
                return _source_path(node_of(layer, graph).input_tensors[0], graph)
            if inner is not None:
                return [layer.name, *inner]
            continue
        node = node_of(layer, graph)
        if _pools(layer, node):
            return _source_path(node.input_tensors[0], graph)
    return None


def _find_last_feature_map(graph) -> list[str] | None:
    """Fallback: path to the last layer with a 4-D output."""
    for layer in reversed(layers_of(graph)):
        if has_graph(layer):
            inner = _find_last_feature_map(graph_of(layer))
            if inner is not None:
                return [layer.name, *inner]
        elif rank_of(node_of(layer, graph).output_tensors[0]) == 4:
            return [layer.name]
    return None


def _all_layer_paths(graph, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int | None]:
    """Every layer path in the model, with its output rank (None for nested models and
    for the layers inside a layer, such as a ViT encoder's blocks: no graph node says)."""
    paths = {}
    for layer in layers_of(graph):
        path = (*prefix, layer.name)
        if has_graph(layer):
            paths[path] = None
            paths.update(_all_layer_paths(graph_of(layer), path))
        else:
            paths[path] = rank_of(node_of(layer, graph).output_tensors[0])
            paths.update(_sublayer_paths(layer, path))
    return paths


def _sublayer_paths(layer, prefix: tuple[str, ...]) -> dict[tuple[str, ...], None]:
    paths = {}
    for inner in sublayers(layer):
        path = (*prefix, inner.name)
        paths.setdefault(path, None)
        paths.update(_sublayer_paths(inner, path))
    return paths


def in_graph(model: keras.Model, path: list[str]) -> bool:
    """Whether ``path`` names a node of the model's graph (of nested graphs along it),
    not a layer inside another layer."""
    graph = graph_of(model)
    for depth, name in enumerate(path):
        found = [op for op in layers_of(graph) if op.name == name]
        if not found:
            return False
        if depth < len(path) - 1:
            if not has_graph(found[0]):
                return False
            graph = graph_of(found[0])
    return True


def layer_at(model: keras.Model, path: list[str]):
    """The layer (or operation) at ``path``: through graphs, then through sublayers."""
    current = model
    for name in path:
        children = layers_of(graph_of(current)) if has_graph(current) else sublayers(current)
        matches = [child for child in children if child.name == name]
        if not matches:
            raise ModelStructureError(f"no layer {name!r} in {current.name!r}")
        current = matches[0]
    return current


def resolve_layer_path(model: keras.Model, layer: str | None = None) -> list[str]:
    """Find the target layer: automatic, a name anywhere in the model, or a path ``a/b``."""
    graph = graph_of(model)
    if layer is None:
        path = (
            _find_pooled_feature_map(graph)
            or find_token_layer(model)
            or _find_last_feature_map(graph)
        )
        if not path:
            opaque = any(isinstance(op, keras.layers.TFSMLayer) for op in layers_of(graph))
            raise ModelStructureError(
                f"model {model.name!r} has no layer with a 4-D (batch, height, width, "
                "channels) output and no attention layer over (batch, tokens, channels), "
                "so there is no spatial map to explain"
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
    spatial = ", ".join(
        [PATH_SEPARATOR.join(p) for p, rank in paths.items() if rank in (3, 4)][-8:]
    )
    matches = [wanted] if wanted in paths else [p for p in paths if p[-len(wanted) :] == wanted]
    if len(matches) == 1:
        rank = paths[matches[0]]
        if rank not in (None, 3, 4):  # a Dense or pooled layer: no map, whatever the paths
            raise ModelStructureError(
                f"layer {PATH_SEPARATOR.join(matches[0])!r} outputs a {rank}-D tensor; "
                "Grad-CAM needs a 4-D (batch, height, width, channels) feature map or 3-D "
                f"(batch, tokens, channels) patch tokens. The last layers with one are: {spatial}"
            )
        return list(matches[0])
    if not matches:
        raise ModelStructureError(
            f"no layer {layer!r} in model {model.name!r}; the last layers with 4-D or 3-D "
            f"outputs are: {spatial}"
        )
    raise ModelStructureError(
        f"layer name {layer!r} is ambiguous in model {model.name!r}; use one of the paths: "
        + ", ".join(PATH_SEPARATOR.join(p) for p in matches)
    )


# ------------------------------------------------------------------ layers inside layers


def layer_tree(model: keras.Model) -> dict[int, tuple[list[str], object]]:
    """Every layer of ``model`` by ``id``: its path and the layer. Graph layers are
    entered through their graph, other layers through their sublayers (a ViT's
    encoder and its blocks are one layer of the graph each)."""
    found: dict[int, tuple[list[str], object]] = {}

    def visit(layer, path: list[str]) -> None:
        found.setdefault(id(layer), (path, layer))
        children = layers_of(graph_of(layer)) if has_graph(layer) else sublayers(layer)
        for child in children:
            visit(child, [*path, child.name])

    for layer in layers_of(graph_of(model)):
        visit(layer, [layer.name])
    return found


def sublayers(layer) -> list:
    """The layers a non-graph layer tracks (``_layers``), in the order it made them."""
    return list(getattr(layer, "_layers", []) or [])


@contextmanager
def wrapped_calls(wrappers):
    """Within the block, each ``(layer, wrap)``'s layer calls ``wrap(its own call)``; the
    layers are left as they were afterwards. Keras calls ``layer.call`` through the
    instance, so an attribute on the instance takes its place for the block."""
    for layer, wrap in wrappers:
        object.__setattr__(layer, "call", wrap(layer.call))
    try:
        yield
    finally:
        for layer, _ in wrappers:
            object.__delattr__(layer, "call")


def wrapped_call(layer, transform):
    """Within the block, ``layer``'s output ``y`` is ``transform(y)``."""

    def wrap(original):
        return lambda *args, **kwargs: transform(original(*args, **kwargs))

    return wrapped_calls([(layer, wrap)])


def _is_attention(layer) -> bool:
    return isinstance(layer, keras.layers.MultiHeadAttention) or (
        "attention" in type(layer).__name__.lower()
    )


def find_token_layer(model: keras.Model) -> list[str] | None:
    """The path of a ViT's automatic layer, from one forward pass on zeros that records
    the order in which layers are called; None without an attention layer.

    It is the input of the last attention layer: the output of the layer called just
    before it (a block's first LayerNorm, pytorch-grad-cam's ``blocks[-1].norm1``). A
    later layer would not do for a ViT that classifies from its class token: after the
    last attention, no patch token reaches the class token, so every patch token's
    gradient is zero (``audit.engine.tokens`` lays the tokens on their grid)."""
    tree = layer_tree(model)
    events: list[tuple[str, int, tuple | None]] = []  # (start | end, layer id, shape)
    hooks = [
        (layer, _recording(key, events))
        for key, (_, layer) in tree.items()
        if isinstance(layer, keras.Layer) and not isinstance(layer, keras.layers.InputLayer)
    ]
    shape = tuple(model.inputs[0].shape[1:])
    if any(side is None for side in shape):
        shape = tuple(224 if side is None else side for side in shape)
    with wrapped_calls(hooks):
        model(np.zeros((1, *shape), "float32"), training=False)
    starts = [i for i, (kind, key, _) in enumerate(events) if kind == "start"]
    attention = [i for i in starts if _is_attention(tree[events[i][1]][1])]
    if not attention:
        return None
    for kind, key, out in reversed(events[: attention[-1]]):
        if kind == "end" and out is not None and len(out) == 3:
            return tree[key][0]
    return None


def _recording(key: int, events: list):
    """A wrap that records each call's start and its output's shape in ``events``."""

    def wrap(original):
        def call(*args, **kwargs):
            events.append(("start", key, None))
            out = original(*args, **kwargs)
            events.append(("end", key, tuple(out.shape) if hasattr(out, "shape") else None))
            return out

        return call

    return wrap
