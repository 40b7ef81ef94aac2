"""The analysis tables of a run (``Analysis``), written next to ``images.parquet`` and
read back by the reports and the dashboard (no Keras needed); ``verdicts.parquet``
holds the class verdicts, computed once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from audit.runs.store import RunStore, atomic_write


@dataclass(frozen=True)
class Analysis:
    groups: pd.DataFrame
    flags: pd.DataFrame
    interventions: pd.DataFrame
    strategies: pd.DataFrame
    trust: dict | None = field(default=None)
    associations: pd.DataFrame = field(default_factory=pd.DataFrame)
    # One row per class: its status, severity, reasons and evidence (verdicts.py),
    # computed once by the analysis and read by every report.
    verdicts: pd.DataFrame = field(default_factory=pd.DataFrame)


def write_analysis(run: RunStore, analysis: Analysis) -> None:
    for name, table in (
        ("classes", analysis.groups),
        ("flags", analysis.flags),
        ("interventions", analysis.interventions),
        ("strategies", analysis.strategies),
        ("associations", analysis.associations),
        ("verdicts", analysis.verdicts),
    ):
        table = _parquet_safe(table)
        atomic_write(run.root / f"{name}.parquet", lambda tmp, t=table: t.to_parquet(tmp))
    trust_path = run.root / "trust.json"
    if analysis.trust is not None:
        text = json.dumps(analysis.trust, indent=2, default=float)
        atomic_write(trust_path, lambda tmp: Path(tmp).write_text(text))
    else:
        trust_path.unlink(missing_ok=True)  # never leave an earlier analysis's checks


def _parquet_safe(table: pd.DataFrame) -> pd.DataFrame:
    """Object columns of mixed None/number become floats; lists stay lists."""
    table = table.copy()
    for column in table.columns:
        if (
            table[column].dtype == object
            and table[column].map(lambda v: v is None or isinstance(v, (int, float))).all()
        ):
            table[column] = pd.to_numeric(table[column], errors="coerce")
    return table


def read_analysis(run_dir: Path) -> Analysis:
    def read(name: str) -> pd.DataFrame:
        path = Path(run_dir) / f"{name}.parquet"
        return pd.read_parquet(path) if path.exists() else pd.DataFrame()

    trust_path = Path(run_dir) / "trust.json"
    trust = json.loads(trust_path.read_text()) if trust_path.exists() else None
    return Analysis(
        read("classes"),
        read("flags"),
        read("interventions"),
        read("strategies"),
        trust,
        read("associations"),
        read("verdicts"),
    )


def stored_verdicts(analysis: Analysis) -> list[dict] | None:
    """The verdicts the analysis stored, as ``class_verdicts`` returns them; None for a
    run analysed before they were stored."""
    if not len(analysis.verdicts):
        return None
    return [
        {key: _plain(value) for key, value in record.items()}
        for record in analysis.verdicts.to_dict("records")
    ]


def _plain(value):
    """Parquet's numpy values as Python's (a list column reads back as an array)."""
    if isinstance(value, np.ndarray):
        return [_plain(item) for item in value]
    return value.item() if isinstance(value, np.generic) else value
