"""The audit configuration: one pydantic model (``AuditConfig``, its sections in
``audit.config.sections``), built from YAML or from Python.

Every key is documented in ``docs/config.md``; unknown keys and bad values fail
fast with the key's path and a hint (``ConfigError``; the CLI exits with 2).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from audit.config.decisions import OutputSection, PolicySection, ScheduleSection, TrustSection
from audit.config.sections import (
    DEFAULT_REGIONS,
    DatasetSection,
    MetricsSection,
    ModelSection,
    PreprocessSection,
    RegionSection,
    Section,
)


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the fix."""


class AuditConfig(Section):
    """A whole audit: what to explain, on which data, measured how, stored where."""

    model: ModelSection = ModelSection()  # a schedule needs no model section
    dataset: DatasetSection
    preprocess: PreprocessSection = PreprocessSection()
    regions: tuple[RegionSection, ...] = DEFAULT_REGIONS
    metrics: MetricsSection = MetricsSection()
    policy: PolicySection = PolicySection()
    trust: TrustSection = TrustSection()
    output: OutputSection = OutputSection()
    schedule: ScheduleSection | None = None
    batch_size: int = Field(32, ge=1, le=4096)

    @field_validator("regions")
    @classmethod
    def _regions_make_sense(cls, regions: tuple[RegionSection, ...]):
        names = [region.name for region in regions]
        if len(set(names)) != len(names):
            raise ValueError(f"region names must be unique, got {names}")
        if not any(region.role == "expected" for region in regions):
            raise ValueError(
                "at least one region needs role: expected (where the evidence should be)"
            )
        return regions

    @model_validator(mode="after")
    def _model_or_schedule(self) -> AuditConfig:
        if self.model.path is None and self.schedule is None:
            raise ValueError("model.path is required (or schedule.models for scheduled audits)")
        return self

    def fingerprint(self) -> str:
        """A hash of the audit's settings: what changes the numbers, not where the files
        are. The run key adds the model file's hash and the dataset's (its rows, with
        paths relative to the dataset's folder, and its files), so a moved audit folder
        or a renamed model file is the same audit, and output and schedule (where runs
        are stored, which versions to audit) change no result."""
        payload = self.model_dump(mode="json", exclude={"output", "schedule"})
        del payload["model"]["path"]
        for key in DATASET_PATHS:  # which kind of source, not where it is
            payload["dataset"][key] = payload["dataset"][key] is not None
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


DATASET_PATHS = ("manifest", "folders", "masks", "coco", "coco_images")


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid audit config {source}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "value_error":  # our validators' messages, without pydantic's prefix
            message = message.removeprefix("Value error, ")
        elif item["type"] == "extra_forbidden":
            message = "unknown key; check the spelling against docs/config.md"
        elif item["type"] == "missing" and isinstance(item["loc"][-1], int):
            # A fixed-length list (size: [h, w]) given too few values.
            key = ".".join(str(part) for part in item["loc"][:-1])
            message = f"too few values (item {item['loc'][-1]} is missing); see docs/config.md"
        elif item["type"] == "missing":
            message = "required key is missing"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def build_config(data: dict, source: str = "(python)", base_dir: Path | None = None) -> AuditConfig:
    """Validate a config dict; relative paths are resolved against ``base_dir``."""
    try:
        config = AuditConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None
    if base_dir is None:
        return config
    return _resolve_paths(config, base_dir)


def _resolve_paths(config: AuditConfig, base_dir: Path) -> AuditConfig:
    def resolve(path: Path | None) -> Path | None:
        if path is None:
            return None
        path = path.expanduser()
        return path if path.is_absolute() else base_dir / path

    dataset = config.dataset
    schedule = config.schedule
    if schedule is not None:
        models = schedule.models
        models = [resolve(m) for m in models] if isinstance(models, list) else resolve(models)
        schedule = schedule.model_copy(update={"models": models})
    return config.model_copy(
        update={
            "schedule": schedule,
            "model": config.model.model_copy(update={"path": resolve(config.model.path)}),
            "dataset": dataset.model_copy(
                update={
                    key: resolve(getattr(dataset, key))
                    for key in DATASET_PATHS
                    if getattr(dataset, key) is not None
                }
            ),
            "output": config.output.model_copy(update={"store": resolve(config.output.store)}),
        }
    )


def load_config(path: str | Path, overrides: dict | None = None) -> AuditConfig:
    """Read a YAML config; ``overrides`` (nested dicts) win over the file's values."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder; give the config's YAML file") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8"
        ) from None
    except OSError as error:
        raise ConfigError(f"cannot read the config file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, ...)")
    return build_config(merge(data, overrides or {}), str(path), path.parent)


def merge(base: dict, overrides: dict) -> dict:
    """Recursively merge ``overrides`` into a copy of ``base``."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged
