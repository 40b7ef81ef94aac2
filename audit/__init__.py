"""Dataset-bias audits for Keras image classifiers with Grad-CAM.

The public API lives here; nothing else needs importing from submodules.
"""

import os as _os

# Quiet TensorFlow's C++ start-up banner unless the user asked for logs.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from audit.cam_methods import CAM_METHODS, get_cam_method  # noqa: E402
from audit.compare import compare_runs  # noqa: E402
from audit.config import AuditConfig, ConfigError, build_config, load_config  # noqa: E402
from audit.decisions import Decision, read_decisions, record_decision  # noqa: E402
from audit.explain import PREDICTED, Explanation, GradCAM, zero_maps  # noqa: E402
from audit.guided import GuidedGradCAM, guided_model  # noqa: E402
from audit.metrics import region_metrics  # noqa: E402
from audit.models import ModelCut, ModelStructureError, cut_model, load_model  # noqa: E402
from audit.pipeline import AuditResult, run_audit  # noqa: E402
from audit.report import write_reports  # noqa: E402
from audit.sources import export_tf_dataset  # noqa: E402

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
