"""Token models (Vision Transformers): a layer whose output is ``(batch, tokens,
channels)`` is explained on its patch grid, and the layer a ViT is explained at.

The patch tokens of a late block are laid back onto the patch grid, dropping the class
and register tokens in front of them, as pytorch-grad-cam's ``reshape_transform`` does
for ViTs: the activations and the gradients alike, so every CAM method sees a
``(batch, rows, columns, channels)`` feature map.

The automatic layer of a ViT is the input of its last attention layer: the output of
the layer called just before it (a block's first LayerNorm, pytorch-grad-cam's
``blocks[-1].norm1``). A later layer would not do for a ViT that classifies from its
class token: after the last attention, no patch token reaches the class token, so
every patch token's gradient is zero.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import keras
import numpy as np

from audit.engine.graph import graph_of, has_graph, layers_of
from audit.engine.models import PATH_SEPARATOR, ModelStructureError

# At most this many tokens in front of the patch tokens (class, distillation and
# register tokens).
MAX_PREFIX_TOKENS = 16


def token_grid(tokens: int, aspect: float | None = None) -> tuple[int, int, int]:
    """``(prefix, rows, columns)``: the fewest prefix tokens that leave a patch grid of
    ``rows x columns`` tokens, square or with the input's ``aspect`` (height / width)."""
    for prefix in range(min(MAX_PREFIX_TOKENS, tokens - 1) + 1):
        patches = tokens - prefix
        if aspect is None or aspect == 1:
            side = math.isqrt(patches)
            if side * side == patches:
                return prefix, side, side
            continue
        columns = round(math.sqrt(patches / aspect))
        if (
            columns > 0
            and patches % columns == 0
            and math.isclose((patches // columns) / columns, aspect, rel_tol=1e-6)
        ):
            return prefix, patches // columns, columns
    raise ModelStructureError(
        f"a layer with {tokens} tokens has no patch grid: no count of up to "
        f"{MAX_PREFIX_TOKENS} class or register tokens leaves a "
        + ("square" if aspect in (None, 1) else f"{aspect:g}:1")
        + " grid of patch tokens; choose a layer with a (batch, height, width, channels) "
        "output or one whose tokens are the patches (plus class tokens in front)"
    )


def to_grid(values, aspect: float | None = None):
    """``(batch, tokens, channels)`` -> ``(batch, rows, columns, channels)`` patch grid
    (``keras.ops``, any backend; 4-D values are returned as they are)."""
    if len(values.shape) == 4:
        return values
    prefix, rows, columns = token_grid(int(values.shape[1]), aspect)
    return keras.ops.reshape(values[:, prefix:, :], (-1, rows, columns, values.shape[-1]))


# ------------------------------------------------------------------ every layer


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
def wrapped_call(layer, transform):
    """Within the block, ``layer``'s output ``y`` is ``transform(y)``; the layer and
    ``model`` are left as they were afterwards. Keras calls ``layer.call`` through the
    instance, so an attribute on the instance takes its place for the block."""
    original = layer.call

    def call(*args, **kwargs):
        return transform(original(*args, **kwargs))

    object.__setattr__(layer, "call", call)
    try:
        yield
    finally:
        object.__delattr__(layer, "call")


def _is_attention(layer) -> bool:
    return isinstance(layer, keras.layers.MultiHeadAttention) or (
        "attention" in type(layer).__name__.lower()
    )


def find_token_layer(model: keras.Model) -> list[str] | None:
    """The path of a ViT's automatic layer (see the module), from one forward pass on
    zeros that records the order in which layers are called; None without an attention
    layer."""
    tree = layer_tree(model)
    events: list[tuple[str, int, tuple | None]] = []  # (start | end, layer id, shape)
    hooks = []
    for key, (_, layer) in tree.items():
        if isinstance(layer, keras.layers.InputLayer) or not isinstance(layer, keras.Layer):
            continue
        hooks.append(_recording(layer, key, events))
    shape = tuple(model.inputs[0].shape[1:])
    if any(side is None for side in shape):
        shape = tuple(224 if side is None else side for side in shape)
    with _all(hooks):
        model(np.zeros((1, *shape), "float32"), training=False)
    starts = [i for i, (kind, key, _) in enumerate(events) if kind == "start"]
    attention = [i for i in starts if _is_attention(tree[events[i][1]][1])]
    if not attention:
        return None
    for kind, key, out in reversed(events[: attention[-1]]):
        if kind == "end" and out is not None and len(out) == 3:
            return tree[key][0]
    return None


def _recording(layer, key: int, events: list):
    original = layer.call

    def call(*args, **kwargs):
        events.append(("start", key, None))
        out = original(*args, **kwargs)
        shape = tuple(out.shape) if hasattr(out, "shape") else None
        events.append(("end", key, shape))
        return out

    return layer, call


@contextmanager
def _all(hooks):
    for layer, call in hooks:
        object.__setattr__(layer, "call", call)
    try:
        yield
    finally:
        for layer, _ in hooks:
            object.__delattr__(layer, "call")


def path_text(path: list[str]) -> str:
    return PATH_SEPARATOR.join(path)
