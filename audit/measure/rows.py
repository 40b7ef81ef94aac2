"""The per-image row schema of ``images.parquet``: the columns the audit writes for a
config's regions and target.
"""

from __future__ import annotations

from audit.config import AuditConfig
from audit.data.manifest import (
    RESERVED_COLUMNS,
)
from audit.measure import spec


def result_columns(config: AuditConfig) -> set[str]:
    """The names of the columns the audit writes into images.parquet, for ``config``'s
    regions and target (as ``measured_rows`` names them)."""
    other_prefix = spec.OTHER_PREFIX[config.model.target]
    names = set(RESERVED_COLUMNS) | {"cf_total", "loc_iou"}
    for region in config.regions:
        names.add(spec.counterfactual_column(region.name))
        names.update(spec.column(metric, region.name) for metric in spec.names())
        names.update(
            spec.column(metric, region.name, other_prefix) for metric in spec.names(other_map=True)
        )
    return names
