"""The dashboard's store reads: Markdown escaping, and caches that follow the files."""

import json
import os
import re

import pytest
import streamlit as st

from dashboard.store import escape_markdown, list_runs, report


@pytest.fixture(autouse=True)
def empty_cache():
    st.cache_data.clear()
    yield
    st.cache_data.clear()


@pytest.mark.parametrize(
    "text",
    [
        "[x](https://evil.example)",
        "**b** __i__ ~~s~~ ~t~",
        "$x$ and $$y$$",
        ":smile: :material/home: :streamlit: :red[text]",
        "<b>html</b> # heading | cell `code` a\\*b",
        "1. list\n- item\n> quote",
    ],
)
def test_escape_markdown_leaves_only_text(text):
    escaped = escape_markdown(text)
    bare = re.sub(r"\\.", "", escaped)  # what is left once the escaped characters go
    assert not re.search(r"[][*_~$`<>|#()!-]|:\w", bare), escaped
    # Nothing is lost: a renderer shows the original text.
    assert re.sub(r"\\(.)", r"\1", escaped).replace("\u2060", "") == text


def write_run(store, run_id, started, *, status="complete", outcome=None):
    run = store / run_id
    run.mkdir(parents=True, exist_ok=True)
    manifest = {
        "run_id": run_id,
        "started": started,
        "status": status,
        "model": {"path": "/models/cls_v1.keras"},
        "dataset": {"source": "manifest:audit.csv"},
        "counts": {"ok": 10},
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    if outcome:
        report = {"outcome": outcome, "status_counts": {"bias-driven": 1}, "slices": {}}
        (run / "report.json").write_text(json.dumps(report))
    return run


def test_list_runs_shows_new_runs_reports_and_status_without_a_restart(tmp_path):
    write_run(tmp_path, "a", "2024-01-01T00:00:00", outcome="FAIL")
    assert list_runs(str(tmp_path))["run_id"].tolist() == ["a"]
    write_run(tmp_path, "b", "2024-02-01T00:00:00", status="running")
    runs = list_runs(str(tmp_path)).set_index("run_id")
    assert runs.at["b", "status"] == "running" and runs.at["b", "outcome"] == "n/a"
    write_run(tmp_path, "b", "2024-02-01T00:00:00", outcome="PASS")
    runs = list_runs(str(tmp_path)).set_index("run_id")
    assert runs.at["b", "status"] == "complete" and runs.at["b", "outcome"] == "PASS"


def test_report_is_read_again_only_when_its_file_changes(tmp_path):
    path = write_run(tmp_path, "a", "2024-01-01T00:00:00", outcome="FAIL") / "report.json"
    assert report(str(tmp_path), "a")["outcome"] == "FAIL"
    stamp = path.stat()
    path.write_text(path.read_text().replace("FAIL", "WARN"))  # same size
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert report(str(tmp_path), "a")["outcome"] == "FAIL"  # unchanged stamp: cached
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))
    assert report(str(tmp_path), "a")["outcome"] == "WARN"  # `bias-audit report` rewrote it


def test_a_run_killed_after_its_reports_has_no_verdict_until_complete(tmp_path):
    write_run(tmp_path, "a", "2024-01-01T00:00:00", status="running", outcome="PASS")
    runs = list_runs(str(tmp_path)).set_index("run_id")
    assert runs.at["a", "status"] == "running" and runs.at["a", "outcome"] == "n/a"
    write_run(tmp_path, "a", "2024-01-01T00:00:00", outcome="PASS")  # resumed to the end
    assert list_runs(str(tmp_path)).set_index("run_id").at["a", "outcome"] == "PASS"
