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

Loading (``load_model``) hands the engine one image input and one classification
output: a Keras Hub classifier with its preprocessor folded in (or left out), the
modules of custom layers imported on purpose (safe mode stays on), one output of a
multi-output model chosen by name.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import keras

if TYPE_CHECKING:
    from audit.config import AuditConfig

PATH_SEPARATOR = "/"


class ModelStructureError(ValueError):
    """The model cannot be explained as asked (no spatial layer, bad layer path, ...)."""


# What to install for a Keras Hub model (its classes register when keras_hub is imported).
KERAS_HUB_INSTALL = "pip install keras-hub"


def load_model(
    path: str | os.PathLike,
    *,
    safe_mode: bool = True,
    custom_objects: str | Sequence[str] = (),
    output: str | None = None,
    preprocessor: Literal["apply", "skip"] | None = None,
) -> keras.Model:
    """Load a classifier for auditing.

    * ``.keras`` (Keras 3) and legacy ``.h5`` files load with Keras' safe mode on, so
      a file cannot run arbitrary code (``Lambda`` bytecode) unless ``safe_mode=False``
      is asked for explicitly, for files you trust.
    * ``custom_objects``: a module name, or several, imported before loading, so that
      the custom layers they register (``@keras.saving.register_keras_serializable()``)
      load in safe mode.
    * A Keras Hub classifier (``keras_hub.models.ViTImageClassifier``, ...) loads once
      ``keras_hub`` is imported, which happens here when the file names one of its
      classes. ``preprocessor="apply"`` (what ``None`` does when the classifier has a
      preprocessor) returns ``pixels -> Rescaling -> classifier``: a model that takes
      0..255 pixels at its image converter's image size and scales and offsets them
      as the converter does. ``"skip"`` returns the classifier alone, which takes what
      the converter would give it. Either way the task's layer graph comes back as a
      plain Functional model (a task's own ``predict`` would preprocess again).
    * ``output``: the classification output of a multi-output model, by its layer's
      name (or its key in a dict of outputs); the other outputs are left out.
    * A TensorFlow SavedModel folder loads as a ``TFSMLayer`` for predictions; it has
      no layer graph, so Grad-CAM cannot reach inside it (re-save it as ``.keras``).

    The model is loaded without its optimizer state (``compile=False``). A model with
    several inputs is refused.
    """
    return _load(path, safe_mode, custom_objects, output, preprocessor)[0]


def load_for_config(config: AuditConfig) -> tuple[keras.Model, AuditConfig]:
    """The model as ``config.model`` asks for it, and the config that feeds it.

    A model with its Keras Hub preprocessor applied takes 0..255 pixels, so the
    config comes back with ``preprocess.scale: 1``; a ``preprocess`` section that
    would scale or normalise them as well is refused (``ConfigError``).
    """
    section = config.model
    model, takes_pixels = _load(
        section.path,
        section.safe_mode,
        section.custom_objects,
        section.output,
        section.preprocessor,
    )
    if takes_pixels:
        config = config.model_copy(update={"preprocess": _pixels(config.preprocess, model)})
    return model, config


def _load(
    path: str | os.PathLike,
    safe_mode: bool,
    custom_objects: str | Sequence[str],
    output: str | None,
    preprocessor: str | None,
) -> tuple[keras.Model, bool]:
    """``load_model``'s model, and whether it takes 0..255 pixels (a preprocessor applied)."""
    path = Path(path)
    modules = (custom_objects,) if isinstance(custom_objects, str) else tuple(custom_objects)
    model = _read(path, safe_mode, modules)
    inputs = getattr(model, "inputs", None) or []  # an unbuilt Sequential has none yet
    if len(inputs) > 1:
        raise ModelStructureError(
            f"model {model.name!r} ({path}) takes {len(inputs)} inputs "
            f"({', '.join(repr(tensor.name) for tensor in inputs)}); the audit feeds each "
            "example as one image, so it explains single-input classifiers: save a model "
            "that takes the image alone"
        )
    model, takes_pixels = _hub_classifier(model, preprocessor, path)
    return _chosen_output(model, output, path), takes_pixels


def _read(path: Path, safe_mode: bool, modules: tuple[str, ...]) -> keras.Model:
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
    for module in modules:
        _import_custom_objects(module)
    classes = _saved_classes(path) if path.suffix == ".keras" else {}
    if any(module.split(".")[0] == "keras_hub" for module in classes.values()):
        try:
            importlib.import_module("keras_hub")
        except ImportError as error:
            raise ModelStructureError(
                f"{path} is a Keras Hub model ({next(iter(classes))}): install Keras Hub to "
                f"load it ({KERAS_HUB_INSTALL})"
            ) from error
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
        unknown = re.search(r"Could not locate class '([^']+)'", str(error))
        if unknown:  # a custom layer whose module was not imported
            name = unknown.group(1)
            module = classes.get(name)
            source = f" (the file says it comes from the module {module!r})" if module else ""
            raise ModelStructureError(
                f"cannot read model {path}: it uses the class {name!r}{source}, which is not "
                "registered. Name the module that defines it, decorated with "
                "@keras.saving.register_keras_serializable(), under model.custom_objects: it "
                "is imported before loading, and safe mode stays on."
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


def _import_custom_objects(module: str) -> None:
    """Import a module of custom layers on purpose: its decorators register them."""
    try:
        importlib.import_module(module)
    except Exception as error:  # the module's own code runs: whatever it raises, name it
        raise ModelStructureError(
            f"model.custom_objects: cannot import the module {module!r} "
            f"({type(error).__name__}: {error}); install its package, or add the folder "
            "that holds it to PYTHONPATH"
        ) from error


def _saved_classes(path: Path) -> dict[str, str]:
    """Class name -> module of every object a .keras file's ``config.json`` names, the
    model's own class first; empty for a damaged file (Keras then says what it lacks)."""
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (KeyError, ValueError, zipfile.BadZipFile):
        return {}
    classes: dict[str, str] = {}
    pending = [config]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if isinstance(node.get("class_name"), str) and isinstance(node.get("module"), str):
                classes.setdefault(node["class_name"], node["module"])
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return classes


def _hub_classifier(
    model: keras.Model, preprocessor: str | None, path: Path
) -> tuple[keras.Model, bool]:
    """A Keras Hub task as a plain Functional model, with its preprocessor applied
    (the model then takes 0..255 pixels: True) or skipped; any other model as it is."""
    hub = sys.modules.get("keras_hub")  # imported by _read when the file needs it
    task = hub is not None and isinstance(model, hub.models.Task)
    attached = model.preprocessor if task else None
    if attached is None and preprocessor == "apply":
        raise ModelStructureError(
            f"model.preprocessor: apply, but model {model.name!r} ({path}) carries no "
            "Keras Hub preprocessor; remove model.preprocessor, and the preprocess section "
            "scales its inputs"
        )
    if not task:
        return model, False
    # The task's own predict() would run its preprocessor again: its graph alone.
    classifier = keras.Model(model.inputs, model.outputs, name=model.name)
    if attached is None or preprocessor == "skip":
        return classifier, False
    converter = getattr(attached, "image_converter", None)
    if (
        type(attached).call is not hub.models.ImageClassifierPreprocessor.call
        or not isinstance(converter, hub.layers.ImageConverter)
        or type(converter).call is not hub.layers.ImageConverter.call
    ):
        raise ModelStructureError(
            f"model {model.name!r} ({path}): its preprocessor {type(attached).__name__} does "
            "more than an image converter's resize, scale and offset, which is what the "
            "audit can put in front of the classifier; set model.preprocessor: skip and "
            "give its preprocessing in the preprocess section"
        )
    return _on_pixels(classifier, converter), True


def _on_pixels(classifier: keras.Model, converter) -> keras.Model:
    """``pixels -> Rescaling -> classifier`` at the converter's image size, scaling and
    offsetting 0..255 pixels as the converter does.

    The audit resizes the images (and their masks with them) to the model's input
    size, so the converter's resize has nothing left to do. Its scale and offset
    become a Keras ``Rescaling``: the converter itself is a tf.data preprocessing
    layer, which pins its ops to the CPU and, called inside a model, lets the
    BatchNormalization layers after it update their statistics when the model was
    called without ``training=False`` (Keras Hub 0.32).
    """
    height, width = converter.image_size or classifier.input_shape[1:3]
    pixels = keras.Input((height, width, classifier.input_shape[-1]), name="pixels")
    scaled = keras.layers.Rescaling(
        1.0 if converter.scale is None else converter.scale,
        0.0 if converter.offset is None else converter.offset,
        name=converter.name,
        dtype=converter.dtype_policy,
    )(pixels)
    return keras.Model(pixels, classifier(scaled), name=f"{classifier.name}_on_pixels")


def _chosen_output(model: keras.Model, output: str | None, path: Path) -> keras.Model:
    """The model with only its classification output (``output``, by name)."""
    names = getattr(model, "output_names", None)  # Functional models only
    if not names:  # Sequential, subclassed, SavedModel: one output, unnamed
        if output is not None:
            raise ModelStructureError(
                f"model.output {output!r}: model {model.name!r} ({path}) is a "
                f"{type(model).__name__} with one unnamed output; remove model.output"
            )
        return model
    outputs = dict(zip(names, model.outputs, strict=True))
    if isinstance(model.output, dict):  # a dict of outputs: its keys name them too
        outputs |= model.output
    listed = ", ".join(map(repr, outputs))
    if output is None:
        if len(model.outputs) > 1:
            raise ModelStructureError(
                f"model {model.name!r} ({path}) has {len(model.outputs)} outputs ({listed}); "
                "the audit explains one classification output: name it with model.output "
                "(--output NAME), the others are left out"
            )
        return model
    if output not in outputs:
        raise ModelStructureError(
            f"model.output {output!r} names no output of model {model.name!r} ({path}); its "
            f"outputs are: {listed}"
        )
    if len(model.outputs) == 1:
        return model
    return keras.Model(model.inputs, outputs[output], name=model.name)


def _pixels(preprocess, model: keras.Model):
    """``preprocess`` that feeds 0..255 pixels (scale 1) to a model that scales them itself."""
    from audit.config import ConfigError

    scaling = [key for key in ("mean", "std", "keras_preprocess") if getattr(preprocess, key)]
    if preprocess.scale not in (1, type(preprocess).model_fields["scale"].default):
        scaling.insert(0, "scale")
    if scaling:
        raise ConfigError(
            f"model {model.name!r} applies its Keras Hub preprocessor (model.preprocessor: "
            "apply), which scales and normalises 0..255 pixels itself; remove "
            + ", ".join(f"preprocess.{key}" for key in scaling)
            + ", or set model.preprocessor: skip to preprocess for the classifier yourself"
        )
    return preprocess.model_copy(update={"scale": 1.0})
