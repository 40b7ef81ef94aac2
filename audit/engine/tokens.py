"""Token models (Vision Transformers): a layer whose output is ``(batch, tokens,
channels)`` is explained on its patch grid.

The patch tokens of a late block are laid back onto the patch grid, dropping the class
and register tokens in front of them, as pytorch-grad-cam's ``reshape_transform`` does
for ViTs: the activations and the gradients alike, so every CAM method sees a
``(batch, rows, columns, channels)`` feature map.

The layer a ViT is explained at by default is found by ``graph.find_token_layer``.
"""

from __future__ import annotations

import math

import keras

from audit.engine.models import ModelStructureError

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
