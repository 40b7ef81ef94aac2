"""A damaged store costs only what is damaged: torn decision lines, corrupt manifests,
copied, renamed or planted run folders never crash a run, a report, history or a page."""

import json
import shutil
from pathlib import Path

import pytest
from test_dashboard import app
from test_history import write_run
from test_report import hostile_run

from audit.cli.main import main
from audit.runs.decisions import (
    DECISIONS,
    Decision,
    read_decision_log,
    read_decisions,
    record_decision,
)
from audit.runs.history import history
from audit.runs.store import latest_run
from dashboard.store import escape_markdown, list_runs, report, run_path, unreadable_runs

# A writer killed in the middle of "é": the line ends on the first of its two bytes.
CUT_CHARACTER = b'{"model_line": "cls", "class_name": "7", "reviewer": "Zo' + "é".encode()[:1]


def decide(store, note="rebalance", line="cls", class_name="7", choice="collect-data"):
    return record_decision(store, Decision(line, class_name, choice, "Ada", note, "run-1"))


def append_bytes(store, data: bytes) -> None:
    with (Path(store) / DECISIONS).open("ab") as handle:
        handle.write(data)


def test_a_cut_utf8_character_costs_only_its_line(tmp_path):
    first = decide(tmp_path, "first")
    append_bytes(tmp_path, CUT_CHARACTER)
    second = decide(tmp_path, "second")
    with pytest.warns(UserWarning, match=rf"{DECISIONS}, line 2: skipped \(not UTF-8 text\)"):
        assert read_decisions(tmp_path) == [first, second]


def test_a_torn_line_never_swallows_the_next_decision(tmp_path):
    first = decide(tmp_path, "first")
    append_bytes(tmp_path, b'{"model_line": "cls", "cla')  # torn, no end of line
    second = decide(tmp_path, "second")
    lines = (tmp_path / DECISIONS).read_bytes().split(b"\n")
    assert lines[1] == b'{"model_line": "cls", "cla'  # ended, left as it was
    assert json.loads(lines[2])["note"] == "second"  # on a line of its own
    with pytest.warns(UserWarning, match=r"line 2: skipped \(not JSON"):
        log = read_decision_log(tmp_path)
    assert log.decisions == [first, second] and [n for n, _ in log.skipped] == [2]


def test_a_field_of_the_wrong_type_is_skipped_not_fatal(tmp_path):
    good = decide(tmp_path)
    wrong = {**json.loads((tmp_path / DECISIONS).read_text()), "reviewer": 123}
    append_bytes(tmp_path, (json.dumps(wrong) + "\n").encode())
    append_bytes(tmp_path, b'["not", "a", "decision"]\n')
    with pytest.warns(UserWarning) as caught:
        log = read_decision_log(tmp_path)
    assert log.decisions == [good] and [n for n, _ in log.skipped] == [2, 3]
    assert "reviewer must be text, got int 123" in log.skipped[0][1]
    assert [str(w.message).split(": skipped")[0] for w in caught] == [
        f"{tmp_path / DECISIONS}, line {n}" for n in (2, 3)
    ]
    with pytest.raises(TypeError, match="reviewer must be text"):
        Decision("cls", "7", "relabel", 123, "", "run-1")


def test_a_note_with_a_unicode_line_separator_is_one_line(tmp_path):
    note = "kept\u2028on one line\x85and\x1cthis"  # str.splitlines would cut it three times
    recorded = decide(tmp_path, note)
    assert read_decisions(tmp_path) == [recorded]


def test_history_and_its_command_read_past_a_torn_decision(tmp_path, capsys):
    write_run(tmp_path, "done", "2026-01-01")
    append_bytes(tmp_path, CUT_CHARACTER)
    decide(tmp_path)
    with pytest.warns(UserWarning, match="line 1: skipped"):
        runs = history(tmp_path).set_index("run_id")
    assert runs.loc["done", "flags"][0] == "class 7 (bias-driven) -> collect-data by Ada"
    with pytest.warns(UserWarning, match="line 1: skipped"):
        assert main(["history", "--store", str(tmp_path)]) == 0
    assert "class 7 (bias-driven) -> collect-data by Ada" in capsys.readouterr().out


def write_manifest(store, name, text, started="2026-01-01"):
    """A run folder whose manifest.json holds ``text`` (None: a valid manifest)."""
    folder = Path(store) / name
    folder.mkdir(parents=True)
    payload = {"run_id": name, "run_key": "k", "started": started, "status": "complete"}
    (folder / "manifest.json").write_text(json.dumps(payload) if text is None else text)
    return folder


def test_a_corrupt_manifest_never_blocks_a_new_run(tmp_path):
    good = write_manifest(tmp_path, "good", None)
    write_manifest(tmp_path, "torn", '{"run_id": "torn", "sta')
    write_manifest(tmp_path, "listed", "[]")  # JSON, but not an object
    with pytest.warns(UserWarning) as caught:
        assert latest_run(tmp_path, "k", prefer_complete=True) == good
    messages = sorted(str(w.message) for w in caught)
    assert messages[0].startswith(f"{tmp_path / 'listed' / 'manifest.json'}: skipped")
    assert "JSON of type list, not an object" in messages[0]
    assert messages[1].startswith(f"{tmp_path / 'torn' / 'manifest.json'}: skipped")


def test_history_leaves_out_a_corrupt_manifest_with_a_warning(tmp_path):
    write_run(tmp_path, "a", "2026-01-01")
    write_run(tmp_path, "b", "2026-01-02")
    assert set(history(tmp_path)["run_id"]) == {"a", "b"}
    (tmp_path / "b" / "manifest.json").write_text("[]")  # indexed before, corrupt now
    write_manifest(tmp_path, "c", '{"torn')
    with pytest.warns(UserWarning) as caught:
        assert history(tmp_path)["run_id"].tolist() == ["a"]
    assert sorted(str(w.message).split(": skipped")[0] for w in caught) == [
        str(tmp_path / name / "manifest.json") for name in ("b", "c")
    ]


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory):
    """One small real run (about 3 s), copied into each test's store."""
    return hostile_run(tmp_path_factory.mktemp("reliability"))


def store_of(audited_run, tmp_path, *names):
    store = tmp_path / "store"
    for name in names:
        shutil.copytree(audited_run, store / name)
    return store


def test_report_writing_reads_past_a_torn_decision(audited_run, tmp_path):
    store = store_of(audited_run, tmp_path, "run")
    append_bytes(store, CUT_CHARACTER)
    decide(store, line="ink", class_name="0")
    with pytest.warns(UserWarning, match="line 1: skipped"):
        assert main(["report", str(store / "run"), "--format", "md"]) == 0
    written = json.loads((store / "run" / "report.json").read_text())
    entry = next(e for e in written["classes"] if e["class_name"] == "0")
    assert entry["decision"]["decision"] == "collect-data"


def test_the_decisions_page_counts_the_skipped_lines(audited_run, tmp_path, monkeypatch):
    store = store_of(audited_run, tmp_path, audited_run.name)
    decide(store, "first", line="ink", class_name="0")
    append_bytes(store, CUT_CHARACTER)
    append_bytes(store, b"\n{}\n")
    decide(store, "second", line="ink", class_name="0")
    with pytest.warns(UserWarning, match="line [23]: skipped"):  # in the server's log too
        page = app(store, monkeypatch, "decisions")
    assert page.warning[0].value == (
        f"Skipped 2 line(s) of {escape_markdown(store / DECISIONS)} that are not a decision "
        "(torn by a killed writer, or edited by hand): line(s) 2, 3. Every other decision "
        "is shown; correct or delete those lines to clear this warning."
    )
    assert page.dataframe[0].value["note"].tolist() == ["second", "first"]


def test_the_runs_page_names_the_folders_it_leaves_out(audited_run, tmp_path, monkeypatch):
    store = store_of(audited_run, tmp_path, "run", ".hidden")
    write_manifest(store, "torn_[x](y)", '{"run_id": ')
    write_manifest(store, "listed", "[]")
    write_manifest(store, "no_model", None)  # an object, but not a run's manifest
    assert list_runs(str(store))["run_id"].tolist() == ["run"]
    left_out = [".hidden", "listed", "no_model", "torn_[x](y)"]
    assert unreadable_runs(str(store)) == left_out
    page = app(store, monkeypatch)
    assert page.warning[0].value == (
        "Left out 4 folder(s) whose manifest.json is not a run's (torn, edited by hand, or a "
        f"name no page may open): {escape_markdown(', '.join(left_out))}. Restore or remove them."
    )
    assert page.dataframe[0].value["run_id"].tolist() == ["run"]


def test_a_torn_report_is_listed_without_a_verdict_and_said(audited_run, tmp_path, monkeypatch):
    store = store_of(audited_run, tmp_path, audited_run.name)
    (store / audited_run.name / "report.json").write_text('{"outcome": "FA')
    page = app(store, monkeypatch)
    assert page.dataframe[0].value["outcome"].tolist() == ["n/a"]
    page.switch_page("views/classes.py").run()
    assert not page.exception and page.error[0].value.startswith("Cannot read")


def test_a_copied_or_renamed_run_is_opened_by_its_folder(audited_run, tmp_path, monkeypatch):
    store = store_of(audited_run, tmp_path, "copy_a", "renamed")  # neither is its manifest's id
    page = app(store, monkeypatch)
    assert sorted(page.dataframe[0].value["run_id"]) == ["copy_a", "renamed"]
    page.switch_page("views/classes.py").run()
    for name in ("copy_a", "renamed"):
        page.sidebar.selectbox[0].set_value(name).run()
        assert not page.exception
        assert page.caption[0].value.startswith(f"Run {escape_markdown(name)}: outcome")


def test_a_planted_run_id_never_opens_a_report_outside_the_store(
    audited_run, tmp_path, monkeypatch
):
    store = store_of(audited_run, tmp_path, "planted")
    manifest = store / "planted" / "manifest.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"run_id": "../outside"}))
    outside = shutil.copytree(audited_run, tmp_path / "outside")
    (outside / "report.json").write_text(
        json.dumps(report(str(store), "planted") | {"outcome": "OUTSIDE"})
    )
    page = app(store, monkeypatch, "classes")
    assert page.sidebar.selectbox[0].options == ["planted"]
    assert "OUTSIDE" not in page.caption[0].value
    with pytest.raises(ValueError, match="not a run id"):
        report(str(store), "../outside")


@pytest.mark.parametrize("run_id", ["../outside", "a/b", "a\\b", "..", ".hidden", "", "a\0b", 7])
def test_only_a_plain_folder_name_is_a_run_id(tmp_path, run_id):
    with pytest.raises(ValueError, match="not a run id"):
        run_path(tmp_path, run_id)


def test_a_plain_run_id_is_its_folder(tmp_path):
    assert run_path(tmp_path, "20260101T000000-3f2a") == tmp_path / "20260101T000000-3f2a"
