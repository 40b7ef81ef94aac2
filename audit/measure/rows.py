"""The per-image row schema of ``images.parquet``: the columns the audit writes for a
config's regions and target.
"""

from __future__ import annotations

from audit.config import AuditConfig
from audit.data.manifest import (
    RESERVED_COLUMNS,
)
from audit.measure.metrics import METRICS

# The other target's map (pred_* or true_*) skips rank_acc: it needs a sort of
# every map, the costliest metric, and no flag reads it.
OTHER_METRICS = tuple(metric for metric in METRICS if metric != "rank_acc")


def result_columns(config: AuditConfig) -> set[str]:
    """The names of the columns the audit writes into images.parquet, for ``config``'s
    regions and target (as ``measured_rows`` names them)."""
    other_prefix = "pred_" if config.model.target == "true" else "true_"
    names = set(RESERVED_COLUMNS) | {"cf_total", "loc_iou"}
    for region in config.regions:
        names.add(f"cf_mass_{region.name}")
        names.update(f"{metric}_{region.name}" for metric in METRICS)
        names.update(f"{other_prefix}{metric}_{region.name}" for metric in OTHER_METRICS)
    return names
