"""Cached, read-only access to the run store for the dashboard pages.

The dashboard never recomputes an audit: it reads manifests, reports, the Parquet
tables and the stored CAMs. The only thing it writes is the decisions log.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from audit.decisions import model_line
from audit.overlay import stored_overlay
from audit.store import RunStore

STORE_VARIABLE = "BIAS_AUDIT_STORE"
THUMBNAIL = 128


def store_path() -> Path:
    """The store folder: ``--store DIR`` after ``--`` on the command line, or $BIAS_AUDIT_STORE."""
    if "--store" in sys.argv[:-1]:
        return Path(sys.argv[sys.argv.index("--store") + 1])
    return Path(os.environ.get(STORE_VARIABLE, "runs"))


def escape_markdown(text) -> str:
    """Text from the store shown inside Markdown: no formatting, links or HTML."""
    escaped = str(text)
    for char in "\\`*_{}[]()<>#+-.!|~$":
        escaped = escaped.replace(char, "\\" + char)
    return escaped


@st.cache_data(show_spinner=False)
def list_runs(store: str) -> pd.DataFrame:
    """Every run in the store with its model, dataset, date, status and flag count."""
    rows = []
    for manifest_path in sorted(Path(store).glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        report_path = manifest_path.parent / "report.json"
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        counts = report.get("status_counts", {})
        rows.append(
            {
                "run_id": manifest["run_id"],
                "started": manifest.get("started", "")[:19].replace("T", " "),
                "status": manifest.get("status"),
                "outcome": report.get("outcome", "n/a"),
                "model": Path(manifest["model"]["path"]).name,
                "model_line": model_line(manifest["model"]["path"]),
                "dataset": manifest["dataset"]["source"],
                "images": manifest.get("counts", {}).get("ok", 0),
                "bias_driven": counts.get("bias-driven", 0),
                "suspected": counts.get("suspected", 0),
                "flagged_slices": sum(
                    1 for t in report.get("slices", {}).get("tests", []) if t.get("flagged")
                ),
            }
        )
    table = pd.DataFrame(rows)
    return table.sort_values("started", ascending=False) if len(table) else table


@st.cache_data(show_spinner=False)
def report(store: str, run_id: str) -> dict:
    return json.loads((Path(store) / run_id / "report.json").read_text())


@st.cache_data(show_spinner=False)
def table(store: str, run_id: str, name: str) -> pd.DataFrame:
    path = Path(store) / run_id / f"{name}.parquet"
    return pd.read_parquet(path) if path.exists() else pd.DataFrame()


@st.cache_data(show_spinner=False, max_entries=4)
def cams(store: str, run_id: str) -> dict[int, np.ndarray]:
    rows, maps = RunStore(Path(store) / run_id).cams()
    return dict(zip(rows.tolist(), maps, strict=True))


@st.cache_data(show_spinner=False)
def image_rows(store: str, run_id: str) -> pd.DataFrame:
    """``images.parquet`` indexed by row, for per-image lookups."""
    return table(store, run_id, "images").set_index("row")


@st.cache_data(show_spinner=False, max_entries=2048)
def thumbnail(store: str, run_id: str, row: int) -> Image.Image | None:
    """The CAM overlay of one image with its mask outline (made once per run and row)."""
    entry = image_rows(store, run_id).loc[row]
    return stored_overlay(
        report(store, run_id)["dataset"],
        entry["path"],
        entry.get("mask_path"),
        cams(store, run_id).get(int(row)),
        THUMBNAIL,
    )


def selected_run(store: Path) -> str | None:
    """The run chosen in the sidebar (shared by every page through session state)."""
    runs = list_runs(str(store))
    if not len(runs):
        return None
    options = runs["run_id"].tolist()
    current = st.session_state.get("run_id")
    index = options.index(current) if current in options else 0
    return st.sidebar.selectbox("Run", options, index=index, key="run_id")


def current_run() -> tuple[Path, str, dict]:
    """The store, the run chosen in the sidebar and its report; stops the page if none."""
    store = store_path()
    run = selected_run(store)
    if run is None:
        st.info(f"No audit runs in {store} yet: run `bias-audit run` or `bias-audit demo`.")
        st.stop()
    return store, run, report(str(store), run)
