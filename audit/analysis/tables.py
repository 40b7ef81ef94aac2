"""The analysis tables of a run (``Analysis``), written next to ``images.parquet`` and
read back by the reports and the dashboard (no Keras needed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

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


def write_analysis(run: RunStore, analysis: Analysis) -> None:
    for name, table in (
        ("classes", analysis.groups),
        ("flags", analysis.flags),
        ("interventions", analysis.interventions),
        ("strategies", analysis.strategies),
        ("associations", analysis.associations),
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
    )
