"""The config's sections (pydantic models): every key with its type, default, check
and the description docs/config.md shows.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    field_validator,
    model_validator,
)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value, info):
        """pydantic's lax mode reads `true` as 1 and "32" as 32: a number key takes a
        number (a bool or quoted text is a mistake to point out, not to guess at)."""
        kind = _number_kind(cls.model_fields[info.field_name].annotation)
        if kind == "number" and isinstance(value, (bool, str)):
            raise ValueError(_not_a_number(value))
        if kind == "numbers" and isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, (bool, str)):
                    raise ValueError(f"in {list(value)!r}: {_not_a_number(item)}")
        return value


def _not_a_number(value: bool | str) -> str:
    if isinstance(value, bool):  # YAML's true/yes/on
        return f"{str(value).lower()} is a yes/no value, not a number; write a number"
    return f"{value!r} is text, not a number; write the number without quotes"


def _number_kind(annotation) -> str | None:
    """``number`` for a number key (``int``, ``float | None``, ...), ``numbers`` for a
    list or tuple of numbers (``tuple[int, int] | None``), else None."""
    if typing.get_origin(annotation) is typing.Annotated:  # FiniteFloat and the like
        annotation = typing.get_args(annotation)[0]
    if annotation in (int, float):
        return "number"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple):
        items = {_number_kind(arg) for arg in args if arg is not Ellipsis}
        return "numbers" if items == {"number"} else None
    if origin in (typing.Union, types.UnionType):
        kinds = {_number_kind(arg) for arg in args if arg is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    return None


class ModelSection(Section):
    path: Path | None = Field(
        None,
        description="The classifier: a .keras or .h5 file (required unless schedule.models "
        "names the versions).",
    )
    layer: str | None = Field(
        None, description="Target layer name or path (outer/inner); null = automatic."
    )
    method: str = Field(
        "gradcam",
        description="The CAM method, one of the registered ones (audit.engine.registry; "
        "docs/engine.md lists the built-in ones and which variant each is).",
    )
    score_channels: int | None = Field(
        32, ge=1, description="With scorecam: channels scored per image (null = all)."
    )
    target: Literal["true", "predicted"] = Field(
        "true", description="Which class the main map explains; the other is kept as pred_*."
    )

    @field_validator("method")
    @classmethod
    def _registered_method(cls, value: str) -> str:
        # The registry names the methods without importing Keras.
        from audit.engine.registry import canonical_name

        return canonical_name(value)

    @field_validator("target", mode="before")
    @classmethod
    def _yaml_true(cls, value):
        # YAML reads an unquoted `true` as a boolean.
        return "true" if value is True else value

    safe_mode: bool = Field(True, description="Keras safe mode; false only for trusted files.")
    class_names: list[str] | None = Field(
        None,
        description="Class names in the model's output order; default: sorted labels.",
    )

    @field_validator("class_names")
    @classmethod
    def _distinct_names(cls, names: list[str] | None) -> list[str] | None:
        if names is not None:
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                raise ValueError(
                    f"{', '.join(map(repr, repeated))} listed more than once; every output of "
                    "the model needs its own name, in output order"
                )
        return names

    custom_objects: tuple[str, ...] = Field(
        (),
        description="Modules (a name or a list) imported before loading, whose "
        "@keras.saving.register_keras_serializable classes the file uses; safe mode stays on.",
    )
    preprocessor: Literal["apply", "skip"] | None = Field(
        None,
        description="A Keras Hub classifier's preprocessor: apply (the default when it has "
        "one) feeds it 0..255 pixels (preprocess.scale 1); skip audits the classifier alone, "
        "preprocessed as the preprocess section says.",
    )
    output: str | None = Field(
        None,
        description="With several outputs: the classification output's name (its layer's "
        "name, or its key in a dict of outputs); the others are left out.",
    )

    @field_validator("custom_objects", mode="before")
    @classmethod
    def _module_names(cls, modules):
        if isinstance(modules, str):  # one module, written without a list
            modules = [modules]
        if isinstance(modules, (list, tuple)):
            for module in modules:
                if not (isinstance(module, str) and all(map(str.isidentifier, module.split(".")))):
                    raise ValueError(
                        f"{module!r} is not a Python module name; write the dotted name you "
                        "would import, e.g. my_package.layers"
                    )
        return modules


class PreprocessSection(Section):
    size: tuple[int, int] | None = Field(
        None, description="Resize images to (height, width); default: the model's input size."
    )
    scale: FiniteFloat = Field(1 / 255, description="Multiply pixel values (0..255) by this.")
    mean: tuple[FiniteFloat, ...] | None = Field(
        None, description="Subtract per channel: three values, or one for a grey model."
    )
    std: tuple[FiniteFloat, ...] | None = Field(
        None, description="Divide per channel (no zeros): three values, or one for a grey model."
    )
    keras_preprocess: str | None = Field(
        None,
        description="A keras.applications module whose preprocess_input to apply to 0..255 "
        "pixels (e.g. mobilenet_v2, resnet50); replaces scale/mean/std.",
    )
    resize: Literal["keras", "pillow"] = Field(
        "keras",
        description="keras: the pixels keras.utils.image_dataset_from_directory gives (its "
        "decoder, then bilinear without antialiasing, unrounded); pillow: Pillow's decoder "
        "and antialiased bilinear.",
    )
    crop_to_aspect_ratio: bool = Field(
        False,
        description="Resize the largest centred part with the input's aspect ratio, as "
        "image_dataset_from_directory(crop_to_aspect_ratio=True).",
    )
    pad_to_aspect_ratio: bool = Field(
        False,
        description="Resize the whole image to fit and pad it with zeros to the input's aspect "
        "ratio, as image_dataset_from_directory(pad_to_aspect_ratio=True); padding is background.",
    )

    @field_validator("size")
    @classmethod
    def _positive_size(cls, size: tuple[int, int] | None) -> tuple[int, int] | None:
        if size is not None and min(size) < 1:
            raise ValueError(
                f"height and width must be at least 1 pixel, got {list(size)}; give the "
                "model's input size as [height, width], or leave size out to use it"
            )
        return size

    @field_validator("scale")
    @classmethod
    def _nonzero_scale(cls, scale: float) -> float:
        if scale == 0:
            raise ValueError("0 would turn every image black; the default is 1/255 (0.00392...)")
        return scale

    @field_validator("mean", "std")
    @classmethod
    def _one_per_channel(cls, values: tuple[float, ...] | None):
        if values is not None and len(values) not in (1, 3):
            raise ValueError(
                f"one value per channel: three for an RGB model, one for a greyscale "
                f"model; got {len(values)}"
            )
        return values

    @field_validator("std")
    @classmethod
    def _nonzero_std(cls, std: tuple[float, ...] | None):
        if std is not None and 0 in std:
            raise ValueError(
                f"pixels are divided by std, so no channel may be 0, got {list(std)}; give "
                "each channel's standard deviation (e.g. [0.229, 0.224, 0.225])"
            )
        return std

    @field_validator("keras_preprocess")
    @classmethod
    def _known_preprocess(cls, name: str | None) -> str | None:
        if name is not None:
            import keras

            if not hasattr(getattr(keras.applications, name, None), "preprocess_input"):
                raise ValueError(
                    f"keras.applications has no module {name!r} with preprocess_input; "
                    "use e.g. mobilenet_v2, resnet50, efficientnet, vgg16"
                )
        return name

    @model_validator(mode="after")
    def _one_aspect_ratio_rule(self) -> PreprocessSection:
        if self.crop_to_aspect_ratio and self.pad_to_aspect_ratio:
            raise ValueError(
                "crop_to_aspect_ratio and pad_to_aspect_ratio cannot both be true (Keras takes "
                "one): set the one the model's training pipeline used"
            )
        return self


class DatasetSection(Section):
    manifest: Path | None = Field(
        None, description="CSV or Parquet: path, label, optional mask_path / box / slices."
    )
    folders: Path | None = Field(None, description="Class folders: ROOT/<class>/<image>.")
    masks: Path | None = Field(
        None, description="With folders: a parallel tree ROOT/<class>/<image stem>.png of masks."
    )
    coco: Path | None = Field(None, description="A COCO instances JSON file (object masks).")
    coco_images: Path | None = Field(None, description="With coco: the image folder.")
    tfds: str | None = Field(None, description="A TensorFlow Datasets name, e.g. oxford_iiit_pet.")
    tfds_split: str = "test"
    image_key: str = "image"
    label_key: str = "label"
    mask_key: str | None = Field(None, description="With tfds: the mask feature, if any.")
    limit: int | None = Field(None, ge=1, description="Audit only the first N entries.")
    root: Path | None = Field(
        None,
        description="With manifest: where relative path and mask_path values start (default: "
        "the manifest's folder). Absolute paths are used as they are.",
    )
    confine: bool = Field(
        False,
        description="Refuse (skip) rows whose files lie outside the dataset root (absolute "
        "paths elsewhere, '..', symlinks out): for shared servers and manifests from others.",
    )
    face_detector: Literal["mtcnn"] | None = Field(
        None,
        description="Detect face boxes with MTCNN before the audit (cached per dataset) "
        "instead of reading face_* columns.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSection:
        given = [k for k in ("manifest", "folders", "coco", "tfds") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of manifest, folders, coco or tfds"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.masks and not self.folders:
            raise ValueError("masks goes with folders")
        if self.coco and not self.coco_images:
            raise ValueError("coco needs coco_images, the folder of its images")
        return self


class RegionSection(Section):
    name: str = Field(description="Column suffix in images.parquet: mass_<name>, ...")
    source: Literal["mask", "box", "face", "background", "border"] = Field(
        description="mask: the object mask; box: the bounding box; face: the face box (manifest "
        "face_* columns or dataset.face_detector); background: the rest of the "
        "image (outside every mask, box and face region); border: a frame of `width` pixels."
    )
    role: Literal["expected", "spurious"] = "expected"
    dilate: int = Field(0, ge=0, description="Grow the region by this many pixels.")
    box_from_mask: bool = Field(False, description="With source mask: use the mask's box.")
    width: int = Field(4, ge=1, description="With source border: the frame width in pixels.")
    shape: Literal["box", "ellipse"] = Field(
        "box", description="With source face: the box, or the ellipse inscribed in it."
    )
    hair_band: float = Field(
        0.0, ge=0, le=1, description="With source face: extend upwards by this share of its height."
    )

    @field_validator("name")
    @classmethod
    def _identifier(cls, name: str) -> str:
        if not name.isidentifier():
            raise ValueError(f"region name {name!r} must be a simple identifier like 'object'")
        return name

    @model_validator(mode="after")
    def _keys_of_its_source(self) -> RegionSection:
        """A key meant for another source would be silently ignored: refuse it, as an
        unknown key is refused. (A default value passes: a dumped config, which the
        manifest and the Ray workers read back, lists every key.)"""
        for key, source in REGION_SOURCE_KEYS.items():
            default = type(self).model_fields[key].default
            if self.source != source and getattr(self, key) != default:
                raise ValueError(
                    f"{key} applies to regions with source: {source}, and region "
                    f"{self.name!r} has source: {self.source}; remove {key}"
                )
        return self


# The region keys that only one source reads.
REGION_SOURCE_KEYS = {
    "box_from_mask": "mask",
    "width": "border",
    "shape": "face",
    "hair_band": "face",
}


DEFAULT_REGIONS = (
    RegionSection(name="object", source="mask", role="expected"),
    RegionSection(name="background", source="background", role="spurious"),
)


class MetricsSection(Section):
    iou_threshold: float = Field(0.5, gt=0, lt=1, description="IoU binarises at t * max.")
    pointing_tolerance: int = Field(0, ge=0, description="Pointing-game tolerance in pixels.")
    loc_threshold: float = Field(
        0.15,
        gt=0,
        lt=1,
        description="Weak localisation: the map's box is the largest connected component of "
        "map >= t * max (the Grad-CAM paper's 15%).",
    )
    max_side: int = Field(
        64,
        ge=8,
        le=1024,
        description="Measure at most this many pixels per side: larger inputs are measured on "
        "a grid this size, masks area-averaged to it (coverage fractions).",
    )
    cam_size: int = Field(
        16, ge=4, le=64, description="Stored CAMs are resized to at most this side (fp16)."
    )
