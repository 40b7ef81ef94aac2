"""The run history index: an embedded SQLite database beside the runs (``history.sqlite``).

It lists every run folder with its status (``run_state``: running, interrupted or
complete) and, once the run is complete, its verdict, its flags and the reviewer
decisions in force, so that ``bias-audit history`` and scheduled audits answer "what
happened to this model line" without opening every report. It is an index, brought
in line with the run folders whenever it is read (``index_store``: new runs and
status changes added, deleted runs dropped); the runs themselves stay the records.
A folder whose ``manifest.json`` is not a JSON object (torn, hand-edited) is left out
with a warning naming it.
"""

from __future__ import annotations

import json
import sqlite3
import warnings
from contextlib import closing
from pathlib import Path

import pandas as pd

from audit.runs.decisions import model_line, read_decisions
from audit.runs.store import MANIFEST, failure_text, read_json, run_manifests, run_state

HISTORY = "history.sqlite"
# Raised whenever the tables, or what fills them, change: an index of another version
# is dropped and rebuilt from the run folders.
SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, run_key TEXT, started TEXT, status TEXT, model_path TEXT,
    model_line TEXT, model_sha256 TEXT, dataset_fingerprint TEXT, outcome TEXT,
    accuracy REAL, images INTEGER, bias_driven INTEGER, suspected INTEGER,
    flagged_slices INTEGER
);
CREATE TABLE IF NOT EXISTS flags (
    run_id TEXT, subject TEXT, status TEXT, severity TEXT,
    PRIMARY KEY (run_id, subject)
);
"""
COUNTS = ["images", "bias_driven", "suspected", "flagged_slices"]


def _connect(store: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(Path(store) / HISTORY)
    if connection.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
        connection.executescript(
            "DROP TABLE IF EXISTS runs; DROP TABLE IF EXISTS flags; "
            f"PRAGMA user_version = {SCHEMA_VERSION};"
        )
    connection.executescript(SCHEMA)
    return connection


def index_run(store: Path, run_dir: Path, manifest: dict | None = None) -> None:
    """Add (or refresh) one run in the index: its status, and its verdict and flags
    once it is complete (a run killed after writing its reports has no verdict yet)."""
    run_dir = Path(run_dir)
    if manifest is None:
        manifest = read_json(run_dir / MANIFEST)
    status = run_state(run_dir, manifest)
    report_path = run_dir / "report.json"
    report = {}
    if status == "complete" and report_path.exists():
        report = json.loads(report_path.read_text())
    flagged_slices = [t for t in report.get("slices", {}).get("tests", []) if t.get("flagged")]
    status_counts = report.get("status_counts", {})
    model_path = manifest.get("model", {}).get("path", "")
    row = (
        run_dir.name,
        manifest.get("run_key"),
        manifest.get("started"),
        status,
        model_path,
        model_line(model_path),
        manifest.get("model", {}).get("sha256"),
        manifest.get("dataset", {}).get("fingerprint"),
        report.get("outcome"),
        report.get("accuracy"),
        report.get("counts", {}).get("ok", 0) if report else None,
        status_counts.get("bias-driven", 0) if report else None,
        status_counts.get("suspected", 0) if report else None,
        len(flagged_slices) if report else None,
    )
    flags = [
        (run_dir.name, f"class {c['class_name']}", c["status"], c["severity"])
        for c in report.get("classes", [])
        if c["status"] != "ok"
    ] + [
        # The region too: a slice is tested once per spurious region (as compare names it).
        (
            run_dir.name,
            f"slice {t['attribute']}={t['value']} on {t['region']}",
            "flagged",
            t["severity"],
        )
        for t in flagged_slices
    ]
    with closing(_connect(store)) as connection, connection:
        connection.execute("DELETE FROM flags WHERE run_id = ?", (run_dir.name,))
        connection.execute(f"INSERT OR REPLACE INTO runs VALUES ({', '.join('?' * len(row))})", row)
        connection.executemany("INSERT OR REPLACE INTO flags VALUES (?, ?, ?, ?)", flags)


def index_store(store: Path) -> int:
    """Bring the index in line with the run folders: index runs that are new or whose
    status changed, drop runs whose folder is gone or whose manifest cannot be read
    (with a warning naming it); returns how many were (re)indexed."""
    store = Path(store)
    with closing(_connect(store)) as connection:
        indexed = dict(connection.execute("SELECT run_id, status FROM runs"))
    manifests, unreadable = run_manifests(store)
    for folder, why in unreadable.items():
        warnings.warn(f"{folder / MANIFEST}: skipped, not a run's manifest ({why})", stacklevel=2)
    names = {folder.name for folder in manifests}
    gone = [(run_id,) for run_id in indexed if run_id not in names]
    if gone:
        with closing(_connect(store)) as connection, connection:
            connection.executemany("DELETE FROM runs WHERE run_id = ?", gone)
            connection.executemany("DELETE FROM flags WHERE run_id = ?", gone)
    refreshed = 0
    for run_dir, manifest in manifests.items():
        try:
            status = run_state(run_dir, manifest)
            if run_dir.name in indexed and indexed[run_dir.name] == status:
                continue
            index_run(store, run_dir, manifest)
        except (OSError, ValueError):  # deleted meanwhile, or its report is unreadable
            continue
        refreshed += 1
    return refreshed


def history(store: Path, line: str | None = None) -> pd.DataFrame:
    """Every run (newest first) with its status; complete runs with their verdict and
    flags (a list: each with the decision in force for its class, if any)."""
    store = Path(store)
    index_store(store)
    with closing(_connect(store)) as connection:
        runs = pd.read_sql_query("SELECT * FROM runs ORDER BY started DESC", connection)
        flags = pd.read_sql_query("SELECT * FROM flags ORDER BY rowid", connection)
    runs = runs.astype({column: "Int64" for column in COUNTS})
    if line is not None:
        runs = runs[runs["model_line"] == line]
    decisions = {(d.model_line, d.class_name): d for d in read_decisions(store)}
    summaries = []
    for run in runs.itertuples():
        items = []
        for flag in flags[flags["run_id"] == run.run_id].itertuples():
            text = f"{flag.subject} ({flag.status})"
            if flag.subject.startswith("class "):
                decision = decisions.get((run.model_line, flag.subject[len("class ") :]))
                if decision is not None:
                    text += f" -> {decision.decision} by {decision.reviewer}"
            items.append(text)
        summaries.append(items)
    failures = [
        _failure(store / run.run_id) if run.status == "failed" else None
        for run in runs.itertuples()
    ]
    return runs.assign(
        flags=pd.Series(summaries, index=runs.index, dtype=object),
        failure=pd.Series(failures, index=runs.index, dtype=object),
    )


def _failure(run_dir: Path) -> str | None:
    """Why a failed run stopped, read from its manifest (``store.failure_text``)."""
    try:
        return failure_text(read_json(run_dir / MANIFEST))
    except (OSError, ValueError, AttributeError):  # gone meanwhile, or not an object
        return None
