"""The run history index: an embedded SQLite database beside the runs (``history.sqlite``).

It lists every finished run, its flags and the reviewer decisions in force, so that
``bias-audit history`` and scheduled audits answer "what happened to this model line"
without opening every report. It is an index, rebuilt from the run folders at any
time (``index_store``); the runs themselves stay the records.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pandas as pd

from audit.decisions import model_line, read_decisions

HISTORY = "history.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, run_key TEXT, started TEXT, model_path TEXT, model_line TEXT,
    model_sha256 TEXT, dataset_fingerprint TEXT, outcome TEXT, accuracy REAL,
    images INTEGER, bias_driven INTEGER, suspected INTEGER, flagged_slices INTEGER
);
CREATE TABLE IF NOT EXISTS flags (
    run_id TEXT, subject TEXT, status TEXT, severity TEXT,
    PRIMARY KEY (run_id, subject)
);
"""


def _connect(store: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(Path(store) / HISTORY)
    connection.executescript(SCHEMA)
    return connection


def index_run(store: Path, run_dir: Path) -> None:
    """Add (or refresh) one finished run in the index."""
    run_dir = Path(run_dir)
    report_path = run_dir / "report.json"
    if not report_path.exists():
        return
    report = json.loads(report_path.read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    flagged_slices = [t for t in report["slices"]["tests"] if t.get("flagged")]
    row = (
        report["run_id"],
        manifest.get("run_key"),
        manifest.get("started"),
        manifest["model"]["path"],
        model_line(manifest["model"]["path"]),
        manifest["model"].get("sha256"),
        manifest["dataset"].get("fingerprint"),
        report["outcome"],
        report.get("accuracy"),
        report.get("counts", {}).get("ok", 0),
        report["status_counts"].get("bias-driven", 0),
        report["status_counts"].get("suspected", 0),
        len(flagged_slices),
    )
    flags = [
        (report["run_id"], f"class {c['class_name']}", c["status"], c["severity"])
        for c in report["classes"]
        if c["status"] != "ok"
    ] + [
        (report["run_id"], f"slice {t['attribute']}={t['value']}", "flagged", t["severity"])
        for t in flagged_slices
    ]
    with closing(_connect(store)) as connection, connection:
        connection.execute("DELETE FROM flags WHERE run_id = ?", (report["run_id"],))
        connection.execute(f"INSERT OR REPLACE INTO runs VALUES ({', '.join('?' * 13)})", row)
        connection.executemany("INSERT OR REPLACE INTO flags VALUES (?, ?, ?, ?)", flags)


def index_store(store: Path) -> int:
    """Index every finished run in the store not yet indexed; returns how many were added."""
    store = Path(store)
    with closing(_connect(store)) as connection:
        known = {row[0] for row in connection.execute("SELECT run_id FROM runs")}
    added = 0
    for report_path in sorted(store.glob("*/report.json")):
        if report_path.parent.name not in known:
            index_run(store, report_path.parent)
            added += 1
    return added


def history(store: Path, line: str | None = None) -> pd.DataFrame:
    """Runs (newest first) with their flags and the decisions in force for their classes."""
    store = Path(store)
    index_store(store)
    with closing(_connect(store)) as connection:
        runs = pd.read_sql_query("SELECT * FROM runs ORDER BY started DESC", connection)
        flags = pd.read_sql_query("SELECT * FROM flags", connection)
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
        summaries.append("; ".join(items))
    return runs.assign(flags=summaries)
