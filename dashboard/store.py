"""Cached, read-only access to the run store for the dashboard pages.

The dashboard never recomputes an audit: it reads manifests, reports, the Parquet
tables and the stored CAMs. The only thing it writes is the decisions log. Cached
reads are keyed on the files' modification stamps, so new runs, rewritten reports
and status changes show on the next rerun, without a restart.
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
from audit.report import untested_classes
from audit.store import RunStore, run_state

STORE_VARIABLE = "BIAS_AUDIT_STORE"
THUMBNAIL = 128


def store_path() -> Path:
    """The store folder: ``--store DIR`` after ``--`` on the command line, or $BIAS_AUDIT_STORE."""
    if "--store" in sys.argv[:-1]:
        return Path(sys.argv[sys.argv.index("--store") + 1])
    return Path(os.environ.get(STORE_VARIABLE, "runs"))


def escape_markdown(text) -> str:
    """Text from the store shown inside Markdown: no formatting, links, math, HTML or icons.

    Backslashes neutralise Markdown syntax (``$`` math included). Streamlit turns
    ``:smile:``, ``:material/home:`` and ``:streamlit:`` into pictures after parsing,
    where an escaped colon is a plain colon again, so a colon is followed by an
    invisible word joiner (U+2060) that no shortcode matches.
    """
    escaped = str(text)
    for char in "\\`*_{}[]()<>#+-.!|~$":
        escaped = escaped.replace(char, "\\" + char)
    return escaped.replace(":", ":\u2060").replace("@", "@\u2060")  # no e-mail autolinks


def _stamp(path: Path) -> tuple[int, int] | None:
    """A file's (mtime_ns, size), None if it is missing: cached reads are keyed on it,
    so a rewritten file is read again and an unchanged one stays cached."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size


def list_runs(store: str) -> pd.DataFrame:
    """Every run in the store with its model, dataset, date, status and flag count."""
    root = Path(store)
    stamps = tuple(
        (str(path), _stamp(path))
        for manifest in sorted(root.glob("*/manifest.json"))
        for path in (manifest, manifest.parent / "report.json")
    )
    table = _list_runs(store, stamps)
    if len(table):  # a running run's process may end without its manifest changing
        table = table.assign(
            status=[
                run_state(root / run_id) if status == "running" else status
                for run_id, status in zip(table["run_id"], table["status"], strict=True)
            ]
        )
    return table


@st.cache_data(show_spinner=False)
def _list_runs(store: str, stamps: tuple) -> pd.DataFrame:
    rows = []
    for manifest_path in sorted(Path(store).glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        report_path = manifest_path.parent / "report.json"
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        counts = report.get("status_counts", {})
        complete = manifest.get("status") == "complete"
        rows.append(
            {
                "run_id": manifest["run_id"],
                "started": manifest.get("started", "")[:19].replace("T", " "),
                "status": manifest.get("status"),
                # A verdict once complete: a run killed after its reports has none yet.
                "outcome": report.get("outcome", "n/a") if complete else "n/a",
                # Classes with audited images that no test could judge: INCONCLUSIVE's why.
                "untested": _untested(report) if complete else None,
                "model": Path(manifest["model"]["path"]).name,
                # How the maps were made: runs of another method or layer differ by
                # construction (the Compare page warns).
                "method": manifest["model"].get("method"),
                "layer": manifest["model"].get("layer"),
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


def _untested(report: dict) -> str | None:
    """``7 of 10``: the untested classes among those with audited images."""
    if "classes" not in report:
        return None
    audited, untested = untested_classes(report["classes"])
    return f"{len(untested)} of {len(audited)}"


def report(store: str, run_id: str) -> dict:
    """A run's ``report.json`` (read again once the file changes)."""
    path = Path(store) / run_id / "report.json"
    return _read_json(str(path), _stamp(path))


@st.cache_data(show_spinner=False)
def _read_json(path: str, stamp: tuple[int, int] | None) -> dict:
    return json.loads(Path(path).read_text())


def table(store: str, run_id: str, name: str) -> pd.DataFrame:
    """A run's ``<name>.parquet``, empty if missing (read again once the file changes)."""
    path = Path(store) / run_id / f"{name}.parquet"
    return _read_table(str(path), _stamp(path))


@st.cache_data(show_spinner=False)
def _read_table(path: str, stamp: tuple[int, int] | None) -> pd.DataFrame:
    return pd.DataFrame() if stamp is None else pd.read_parquet(path)


def cams(store: str, run_id: str) -> dict[int, np.ndarray]:
    # images.parquet is written after the last CAM chunk: its stamp keys the CAMs.
    return _cams(store, run_id, _stamp(Path(store) / run_id / "images.parquet"))


@st.cache_data(show_spinner=False, max_entries=4)
def _cams(store: str, run_id: str, stamp: tuple[int, int] | None) -> dict[int, np.ndarray]:
    rows, maps = RunStore(Path(store) / run_id).cams()
    return dict(zip(rows.tolist(), maps, strict=True))


def thumbnail(
    store: str, run_id: str, dataset: dict, row: int, path: str, mask_path
) -> Image.Image | None:
    """One image's CAM overlay with its mask outline; None if the image cannot be read.

    ``dataset`` is the report's dataset section. Cached per image and keyed on the
    stamps of the CAMs and of the image file, so an image that comes back (the data
    moved back) is read again.
    """
    stamps = (
        _stamp(Path(store) / run_id / "images.parquet"),
        _stamp(Path(dataset["root"]) / path),
    )
    return _thumbnail(store, run_id, dataset, row, path, mask_path, stamps)


@st.cache_data(show_spinner=False, max_entries=2048)
def _thumbnail(
    store: str, run_id: str, dataset: dict, row: int, path: str, mask_path, stamps: tuple
) -> Image.Image | None:
    return stored_overlay(dataset, path, mask_path, cams(store, run_id).get(row), THUMBNAIL)


def selected_run(store: Path) -> str | None:
    """The run chosen in the sidebar (shared by every page through session state).

    The default is the newest complete run; unfinished runs stay selectable.
    """
    runs = list_runs(str(store))
    if not len(runs):
        return None
    options = runs["run_id"].tolist()
    finished = runs.loc[runs["outcome"] != "n/a", "run_id"].tolist()
    current = st.session_state.get("run_id")
    default = current if current in options else (finished or options)[0]
    return st.sidebar.selectbox("Run", options, index=options.index(default), key="run_id")


def current_run() -> tuple[Path, str, dict]:
    """The store, the run chosen in the sidebar and its report; stops the page if none."""
    store = store_path()
    run = selected_run(store)
    if run is None:
        st.info(
            f"No audit runs in {escape_markdown(store)} yet: run `bias-audit run` or "
            "`bias-audit demo`."
        )
        st.stop()
    path = store / run / "report.json"
    runs = list_runs(str(store)).set_index("run_id")
    # A run killed after writing its reports is not complete: no verdict, as in history.
    if runs.at[run, "status"] != "complete" or not path.is_file():
        st.warning(
            f"Run {escape_markdown(run)} is still running or was interrupted (status "
            f"{escape_markdown(runs.at[run, 'status'])}) and has no report yet: choose a "
            "finished run in the sidebar."
        )
        st.stop()
    try:
        return store, run, report(str(store), run)
    except (OSError, ValueError) as error:
        st.error(
            f"Cannot read {escape_markdown(path)} ({escape_markdown(error)}): rewrite it "
            f"with `bias-audit report` on {escape_markdown(store / run)}."
        )
        st.stop()
