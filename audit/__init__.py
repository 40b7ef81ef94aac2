"""Dataset-bias audits for Keras image classifiers with Grad-CAM.

The public API lives here; nothing else needs importing from submodules.
"""

import os as _os

# Quiet TensorFlow's C++ start-up banner unless the user asked for logs.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from audit.cam_methods import CAM_METHODS, get_cam_method  # noqa: E402
from audit.explain import PREDICTED, Explanation, GradCAM, zero_maps  # noqa: E402
from audit.models import ModelCut, ModelStructureError, cut_model, load_model  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CAM_METHODS",
    "PREDICTED",
    "Explanation",
    "GradCAM",
    "ModelCut",
    "ModelStructureError",
    "cut_model",
    "get_cam_method",
    "load_model",
    "zero_maps",
]
