"""Cached, read-only access to the run store for the dashboard pages.

The dashboard never recomputes an audit: it reads manifests, reports, the Parquet
tables and the stored CAMs. The only thing it writes is the decisions log. Cached
reads are keyed on the files' modification stamps, so new runs, rewritten reports
and status changes show on the next rerun, without a restart.

A run's id is its folder's name, never what its manifest says, and only a plain name
(``run_path``) is joined to the store path: a copied, renamed or planted run folder
cannot point the pages elsewhere. A folder whose manifest cannot be read is left out
of the list and named (``unreadable_runs``).
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

from audit.report.outcome import untested_classes
from audit.report.overlay import stored_overlay
from audit.runs.decisions import model_line
from audit.runs.store import RunStore, failure_text, run_manifests, run_state

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


def plain_run_id(run_id) -> bool:
    """Whether a run id is a plain folder name: text without a path separator or
    ``..``, not hidden; only such an id is joined to the store path."""
    return (
        isinstance(run_id, str)
        and bool(run_id)
        and not run_id.startswith(".")
        and ".." not in run_id
        and not any(char in run_id for char in "/\\\0")
    )


def run_path(store, run_id: str) -> Path:
    """The run's folder in the store; a run id that is not a plain folder name is refused
    (ValueError), so no id leads outside the store."""
    if not plain_run_id(run_id):
        raise ValueError(f"not a run id (a folder name in the store): {run_id!r}")
    return Path(store) / run_id


def _listing(store: str) -> tuple[pd.DataFrame, tuple[str, ...]]:
    root = Path(store)
    stamps = tuple(
        (str(path), _stamp(path))
        for manifest in sorted(root.glob("*/manifest.json"))
        for path in (manifest, manifest.parent / "report.json")
    )
    return _list_runs(store, stamps)


def list_runs(store: str) -> pd.DataFrame:
    """Every run in the store with its model, dataset, date, status and flag count."""
    table, _ = _listing(store)
    if len(table):  # a running run's process may end without its manifest changing
        table = table.assign(
            status=[
                run_state(run_path(store, run_id), {"status": status})
                for run_id, status in zip(table["run_id"], table["status"], strict=True)
            ]
        )
    return table


def unreadable_runs(store: str) -> list[str]:
    """The folders left out of ``list_runs``: a manifest that is not a run's (not a JSON
    object, or without its model and dataset) or a name that is no plain run id."""
    return list(_listing(store)[1])


@st.cache_data(show_spinner=False)
def _list_runs(store: str, stamps: tuple) -> tuple[pd.DataFrame, tuple[str, ...]]:
    manifests, unreadable = run_manifests(Path(store))
    skipped = [folder.name for folder in unreadable]
    rows = []
    for folder, manifest in manifests.items():
        if not plain_run_id(folder.name):
            skipped.append(folder.name)  # hidden, or a name no page may join to the store
            continue
        try:
            rows.append(_run_row(folder, manifest))
        except (KeyError, TypeError, AttributeError):  # a JSON object, not a run's manifest
            skipped.append(folder.name)
    table = pd.DataFrame(rows)
    table = table.sort_values("started", ascending=False) if len(table) else table
    return table, tuple(sorted(skipped))


def _run_row(folder: Path, manifest: dict) -> dict:
    """A run's line in the list; KeyError, TypeError or AttributeError if its manifest
    is not a run's."""
    report = _report_or_nothing(folder / "report.json")
    counts = report.get("status_counts", {})
    complete = manifest.get("status") == "complete"
    return {
        "run_id": folder.name,  # the folder, wherever it was copied or renamed to
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
        # Why a failed run stopped (its manifest's ``failure``): no verdict, say why.
        "failure": failure_text(manifest),
    }


def _report_or_nothing(path: Path) -> dict:
    """A run's report for the list; nothing (no verdict) when it is missing or unreadable
    (the pages that open the run say why)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _untested(report: dict) -> str | None:
    """``7 of 10``: the untested classes among those with audited images."""
    if "classes" not in report:
        return None
    audited, untested = untested_classes(report["classes"])
    return f"{len(untested)} of {len(audited)}"


def report(store: str, run_id: str) -> dict:
    """A run's ``report.json`` (read again once the file changes)."""
    path = run_path(store, run_id) / "report.json"
    return _read_json(str(path), _stamp(path))


@st.cache_data(show_spinner=False)
def _read_json(path: str, stamp: tuple[int, int] | None) -> dict:
    return json.loads(Path(path).read_text())


def table(store: str, run_id: str, name: str) -> pd.DataFrame:
    """A run's ``<name>.parquet``, empty if missing (read again once the file changes)."""
    path = run_path(store, run_id) / f"{name}.parquet"
    return _read_table(str(path), _stamp(path))


@st.cache_data(show_spinner=False)
def _read_table(path: str, stamp: tuple[int, int] | None) -> pd.DataFrame:
    return pd.DataFrame() if stamp is None else pd.read_parquet(path)


def cams(store: str, run_id: str) -> dict[int, np.ndarray]:
    # images.parquet is written after the last CAM chunk: its stamp keys the CAMs.
    return _cams(store, run_id, _stamp(run_path(store, run_id) / "images.parquet"))


@st.cache_data(show_spinner=False, max_entries=4)
def _cams(store: str, run_id: str, stamp: tuple[int, int] | None) -> dict[int, np.ndarray]:
    rows, maps = RunStore(run_path(store, run_id)).cams()
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
        _stamp(run_path(store, run_id) / "images.parquet"),
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
    path = run_path(store, run) / "report.json"
    runs = list_runs(str(store)).set_index("run_id")
    # A run killed after writing its reports is not complete: no verdict, as in history.
    if runs.at[run, "status"] == "failed":
        st.warning(
            f"Run {escape_markdown(run)} stopped on an error and has no report: "
            f"{escape_markdown(runs.at[run, 'failure'])}. Continue it with the command that "
            "started it and `--resume`, or choose a finished run in the sidebar."
        )
        st.stop()
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
            f"with `bias-audit report` on {escape_markdown(path.parent)}."
        )
        st.stop()
