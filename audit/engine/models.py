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
