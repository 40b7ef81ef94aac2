"""Dataset-bias audits for Keras image classifiers with Grad-CAM.

The public API lives here; nothing else needs importing from submodules.
"""

import os as _os

# Quiet TensorFlow's C++ start-up banner unless the user asked for logs.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib as _importlib

# The public API, imported on first use (PEP 562): ``bias-audit --help``, ``history``
# and ``report`` need no TensorFlow, which takes seconds to import.
_EXPORTS = {
    "audit.engine.cam_methods": ("CAM_METHODS", "get_cam_method"),
    "audit.runs.compare": ("compare_runs",),
    "audit.config": ("AuditConfig", "ConfigError", "build_config", "load_config"),
    "audit.runs.decisions": ("Decision", "read_decisions", "record_decision"),
    "audit.engine.explain": ("PREDICTED", "Explanation", "GradCAM", "zero_maps"),
    "audit.engine.guided": ("GuidedGradCAM", "guided_model"),
    "audit.measure.metrics": ("region_metrics",),
    "audit.engine.cut": ("ModelCut", "cut_model"),
    "audit.engine.models": ("ModelStructureError", "load_model"),
    "audit.run": ("AuditResult", "run_audit"),
    "audit.report.write": ("write_reports",),
    "audit.data.tfds": ("export_tf_dataset",),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'audit' has no attribute {name!r}")
    value = getattr(_importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])


__version__ = "0.1.0"

__all__ = [
    "CAM_METHODS",
    "PREDICTED",
    "AuditConfig",
    "AuditResult",
    "ConfigError",
    "Decision",
    "Explanation",
    "GradCAM",
    "GuidedGradCAM",
    "ModelCut",
    "ModelStructureError",
    "build_config",
    "compare_runs",
    "cut_model",
    "guided_model",
    "export_tf_dataset",
    "get_cam_method",
    "load_config",
    "load_model",
    "read_decisions",
    "record_decision",
    "region_metrics",
    "run_audit",
    "write_reports",
    "zero_maps",
]
