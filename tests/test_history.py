"""The history index follows the run folders: every run with its status, flags in full."""

import json
import shutil
import sqlite3

from audit.cli.main import main
from audit.runs.history import HISTORY, history

LONG = "a background texture value long enough that a table cell would cut it short"


def write_run(store, run_id, started, *, status="complete", report=True):
    """A run folder as run_audit leaves it: a manifest, and reports once analysed."""
    run = store / run_id
    run.mkdir(parents=True)
    manifest = {
        "run_id": run_id,
        "run_key": "k",
        "started": started,
        "status": status,
        "model": {"path": "/models/cls_v1.keras", "sha256": "s"},
        "dataset": {"fingerprint": "f"},
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    if report:
        # One slice flagged on two spurious regions, and a class flag.
        tests = [
            {"attribute": "bg", "value": LONG, "region": region, "flagged": True, "severity": s}
            for region, s in (("background", "FAIL"), ("border", "WARN"))
        ]
        payload = {
            "run_id": run_id,
            "outcome": "FAIL",
            "accuracy": 0.9,
            "counts": {"ok": 12},
            "status_counts": {"bias-driven": 1, "suspected": 0},
            "classes": [
                {"class_name": "7", "status": "bias-driven", "severity": "FAIL"},
                {"class_name": "1", "status": "ok", "severity": "PASS"},
            ],
            "slices": {"tests": tests},
        }
        (run / "report.json").write_text(json.dumps(payload))
    return run


def test_history_lists_every_run_with_its_status_and_only_finished_verdicts(tmp_path):
    write_run(tmp_path, "done", "2026-01-01")
    write_run(tmp_path, "killed_early", "2026-01-02", status="running", report=False)
    write_run(tmp_path, "killed_late", "2026-01-03", status="running")  # reports, not complete
    runs = history(tmp_path).set_index("run_id")
    assert runs.index.tolist() == ["killed_late", "killed_early", "done"]  # newest first
    assert runs["status"].tolist() == ["running", "running", "complete"]
    assert runs.loc["done", "outcome"] == "FAIL" and runs.loc["done", "bias_driven"] == 1
    for unfinished in ("killed_late", "killed_early"):
        assert runs.loc[unfinished, ["outcome", "bias_driven", "images"]].isna().all()
        assert runs.loc[unfinished, "flags"] == []
    # Both regions' flags of the one slice, each named with its region.
    assert runs.loc["done", "flags"] == [
        "class 7 (bias-driven)",
        f"slice bg={LONG} on background (flagged)",
        f"slice bg={LONG} on border (flagged)",
    ]
    # The killed run is resumed to completion: the next read shows its verdict.
    manifest = tmp_path / "killed_late" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"running"', '"complete"'))
    runs = history(tmp_path).set_index("run_id")
    assert runs.loc["killed_late", "outcome"] == "FAIL"
    assert len(runs.loc["killed_late", "flags"]) == 3


def test_deleted_runs_leave_the_history(tmp_path):
    write_run(tmp_path, "a", "2026-01-01")
    write_run(tmp_path, "b", "2026-01-02", status="running", report=False)
    assert set(history(tmp_path)["run_id"]) == {"a", "b"}
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(tmp_path / "b")
    assert history(tmp_path).empty
    with sqlite3.connect(tmp_path / HISTORY) as connection:
        assert connection.execute("SELECT count(*) FROM flags").fetchone() == (0,)


def test_an_index_of_the_earlier_layout_is_rebuilt(tmp_path):
    write_run(tmp_path, "a", "2026-01-01")
    columns = (
        "run_id TEXT PRIMARY KEY, run_key TEXT, started TEXT, model_path TEXT, "
        "model_line TEXT, model_sha256 TEXT, dataset_fingerprint TEXT, outcome TEXT, "
        "accuracy REAL, images INTEGER, bias_driven INTEGER, suspected INTEGER, "
        "flagged_slices INTEGER"
    )
    with sqlite3.connect(tmp_path / HISTORY) as connection:  # no status; lines stripped more
        connection.execute(f"CREATE TABLE runs ({columns})")
        connection.execute("INSERT INTO runs (run_id, model_line) VALUES ('a', 'cl')")
    runs = history(tmp_path)
    assert runs["status"].tolist() == ["complete"] and runs["model_line"].tolist() == ["cls"]


def test_the_history_command_prints_statuses_and_every_flag_in_full(tmp_path, capsys):
    write_run(tmp_path, "done", "2026-01-01")
    write_run(tmp_path, "killed", "2026-01-02", status="running")
    assert main(["history", "--store", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "run_id", "model_line", "model", "status", "outcome", "bias_driven", "suspected"
    ]  # fmt: skip
    assert lines[1].split() == ["killed", "cls", "cls_v1.keras", "running", "n/a", "n/a", "n/a"]
    assert lines[2].split() == ["done", "cls", "cls_v1.keras", "complete", "FAIL", "1", "0"]
    assert lines[3:] == [
        "    class 7 (bias-driven)",
        f"    slice bg={LONG} on background (flagged)",
        f"    slice bg={LONG} on border (flagged)",
    ]
    shutil.rmtree(tmp_path / "done")
    shutil.rmtree(tmp_path / "killed")
    assert main(["history", "--store", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"no runs in {tmp_path}\n"


def test_a_running_run_that_no_process_holds_shows_as_interrupted(tmp_path):
    from audit.runs.store import LOCK, hold_run

    for day, run_id in enumerate(("killed", "live", "older"), start=1):
        write_run(tmp_path, run_id, f"2026-01-0{day}", status="running", report=False)
    (tmp_path / "killed" / LOCK).touch()  # its process took the lock, then ended
    # "older": no lock file (a run from before runs were locked) cannot be told apart.
    with hold_run(tmp_path / "live"):
        status = history(tmp_path).set_index("run_id")["status"].to_dict()
        assert status == {"killed": "interrupted", "live": "running", "older": "running"}
        assert main(["history", "--store", str(tmp_path)]) == 0
    # Resumed: held again, running again, with no other change to the folder.
    with hold_run(tmp_path / "killed"):
        assert history(tmp_path).set_index("run_id").at["killed", "status"] == "running"
    assert history(tmp_path).set_index("run_id").at["live", "status"] == "interrupted"
