"""No PASS without evidence: a run whose classes are mostly untested is INCONCLUSIVE,
in its report, the CLI's gate, scheduled audits, history, compare and the dashboard."""

import json
import shutil
import typing

import pandas as pd
import pytest
import yaml
from conftest import ink_model
from streamlit.testing.v1 import AppTest
from test_dashboard import APP
from test_report import HOSTILE, assert_inert, unescaped

from audit.cli.main import main
from audit.cli.run import EXIT_OK, EXIT_POLICY, format_gate, parser
from audit.config import load_config
from audit.config.decisions import ScheduleSection
from audit.report.html import render_html
from audit.report.markdown import render_markdown
from audit.report.outcome import (
    FAIL_ON_LEVELS,
    INCONCLUSIVE,
    NO_IMAGES,
    OUTCOME_ORDER,
    reaches,
    run_outcome,
)
from audit.run import run_audit
from audit.runs.compare import compare_runs, format_comparison
from dashboard.store import escape_markdown
from pipelines.demo import write_dataset
from pipelines.demo_data import make_demo_set


def verdicts(tested: int, untested: int, *, empty: int = 0, severity: str = "none") -> list:
    """Hand-built class verdicts: ``tested`` and ``untested`` classes with 30 audited
    images each, ``empty`` with none; the first class has ``severity``."""
    classes = [
        {"class_name": f"c{index}", "n": 30, "tested": index < tested, "severity": "none"}
        for index in range(tested + untested)
    ]
    classes += [
        {"class_name": f"e{i}", "n": 0, "tested": False, "severity": "none"} for i in range(empty)
    ]
    classes[0]["severity"] = severity
    return classes


# ------------------------------------------------------------------ the rule


def test_every_class_tested_passes():
    assert run_outcome(verdicts(10, 0), "none") == "PASS"


def test_most_classes_untested_is_inconclusive():
    assert run_outcome(verdicts(4, 6), "none") == INCONCLUSIVE
    assert run_outcome(verdicts(5, 5), "none") == "PASS"  # half is not more than half
    assert run_outcome(verdicts(0, 10), "none") == INCONCLUSIVE  # none tested


def test_a_flag_wins_over_untested_classes():
    assert run_outcome(verdicts(1, 9, severity="warn"), "warn") == "WARN"
    assert run_outcome(verdicts(1, 9, severity="fail"), "fail") == "FAIL"
    # A flagged slice warns a run whose classes are all untested.
    assert run_outcome(verdicts(0, 10), "warn") == "WARN"


def test_classes_without_audited_images_do_not_count():
    # 3 of the 5 classes with images are tested: PASS, whatever the 5 empty classes.
    assert run_outcome(verdicts(3, 2, empty=5), "none") == "PASS"
    assert run_outcome(verdicts(2, 3, empty=5), "none") == INCONCLUSIVE
    assert run_outcome(verdicts(0, 0, empty=10), "none") == NO_IMAGES


def test_the_gate_order_and_levels():
    assert OUTCOME_ORDER == ("PASS", "INCONCLUSIVE", "WARN", "FAIL")
    gates = {
        level: [outcome for outcome in (*OUTCOME_ORDER, NO_IMAGES) if reaches(outcome, level)]
        for level in (*FAIL_ON_LEVELS, "never", None)
    }
    assert gates == {
        "inconclusive": ["INCONCLUSIVE", "WARN", "FAIL"],
        "warn": ["WARN", "FAIL"],  # an INCONCLUSIVE run passes --fail-on warn
        "fail": ["FAIL"],
        "never": [],
        None: [],
    }
    # One list of levels: the run's --fail-on, the schedule's and schedule.fail_on.
    choices = next(a.choices for a in parser()._actions if a.dest == "fail_on")
    assert tuple(choices) == FAIL_ON_LEVELS == ("inconclusive", "warn", "fail")
    (literal, _) = typing.get_args(ScheduleSection.model_fields["fail_on"].annotation)
    assert typing.get_args(literal) == (*FAIL_ON_LEVELS, "never")


def test_the_gate_line_names_the_untested_classes():
    classes = [{**entry, "status": "ok", "reasons": []} for entry in verdicts(3, 7)]
    report = {
        "outcome": run_outcome(classes, "none"),
        "status_counts": {"bias-driven": 0, "suspected": 0, "ok": 10},
        "classes": classes,
        "slices": {"tests": []},
        "policy": {"min_support": 20},
    }
    assert format_gate(report) == (
        "INCONCLUSIVE: 0 bias-driven, 0 suspected, 10 ok; 7 of 10 classes untested: c3, c4, "
        "c5, c6, c7, c8, c9 (fewer than 20 measured images for any test; their ok is no "
        "evidence of health)"
    )
    # A PASS with some untested classes keeps its NOTE line.
    classes = [{**entry, "status": "ok", "reasons": []} for entry in verdicts(7, 3)]
    report |= {"outcome": run_outcome(classes, "none"), "classes": classes}
    assert format_gate(report).splitlines() == [
        "PASS: 0 bias-driven, 0 suspected, 10 ok",
        "  NOTE  3 of 10 classes untested: c7, c8, c9 (fewer than 20 measured images for any "
        "test; their ok is no evidence of health)",
    ]


# ------------------------------------------------------------ a real, too small, audit


def write_config(root, store, **extra) -> str:
    """40 demo images over 10 classes (the first one named HOSTILE): no class reaches
    the default min_support of 20 images, so no test runs."""
    data = root / "data"
    if not data.exists():
        manifest = write_dataset(make_demo_set(40, seed=5), data)
        table = pd.read_csv(manifest)
        table["label"] = table["label"].astype(str).replace({"0": HOSTILE})
        table.to_csv(manifest, index=False)
        ink_model().save(root / "ink.keras")
    config = {
        "model": {
            "path": str(root / "ink.keras"),
            "class_names": [HOSTILE, *(str(digit) for digit in range(1, 10))],
        },
        "dataset": {"manifest": str(data / "manifest.csv")},
        "output": {"store": str(store)},
        "policy": {"intervention_samples": 10},
        "trust": {"samples": 0},
        **extra,
    }
    path = root / "audit.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("inconclusive")
    config = write_config(root, root / "runs")
    result = run_audit(load_config(config), progress=False)
    return config, result.run_dir


def test_the_report_of_a_small_audit_is_inconclusive(small):
    _, run_dir = small
    report = json.loads((run_dir / "report.json").read_text())
    assert report["outcome"] == INCONCLUSIVE and report["severity"] == "none"
    audited = [entry for entry in report["classes"] if entry["n"]]
    assert len(audited) == 10 and not any(entry["tested"] for entry in audited)
    markdown = (run_dir / "report.md").read_text()
    assert markdown.startswith(f"## Bias audit {INCONCLUSIVE}: ")
    [line] = [line for line in markdown.splitlines() if line.startswith(f"**{INCONCLUSIVE}:**")]
    assert f"nothing flagged, but 10 of 10 classes untested: {HOSTILE}, 1, 2" in unescaped(line)
    assert "fewer than 20 measured images for any test" in line and HOSTILE not in line
    assert_inert(line.split("untested:")[1])
    assert markdown.count("classes untested:") == 1  # said once, under the title
    page = (run_dir / "report.html").read_text()
    assert f"<h1>Bias audit: <span class='outcome inconclusive'>{INCONCLUSIVE}</span></h1>" in page
    assert ".outcome.inconclusive{" in page
    assert f"<p class='note inconclusive'><b>{INCONCLUSIVE}</b>: nothing flagged, but 10 of" in page
    assert render_markdown(report) == markdown and render_html(report, run_dir) == page


def test_fail_on_inconclusive_fails_a_small_audit_and_warn_passes_it(small, capsys):
    config, _ = small
    argv = ["run", config, "--resume", "--no-progress"]  # the fixture's run, reused
    assert main([*argv, "--fail-on", "inconclusive"]) == EXIT_POLICY
    gate = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("INC"))
    assert gate.startswith(
        f"{INCONCLUSIVE}: 0 bias-driven, 0 suspected, 10 ok; 10 of 10 classes untested: "
        f"{HOSTILE}, 1, "
    )
    assert main([*argv, "--fail-on", "warn"]) == EXIT_OK
    assert main([*argv, "--fail-on", "fail"]) == EXIT_OK
    assert main(argv) == EXIT_OK


def test_history_lists_the_outcome(small, capsys):
    config, run_dir = small
    assert main(["history", "--store", str(run_dir.parent)]) == 0
    [row] = [line for line in capsys.readouterr().out.splitlines() if run_dir.name in line]
    assert row.split()[4] == INCONCLUSIVE


def passed_copy(run_dir, old):
    """The run copied to ``old`` as an earlier run whose classes were all tested: PASS."""
    shutil.copytree(run_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest |= {"run_id": old.name, "started": "2000-01-01T00:00:00"}
    (old / "manifest.json").write_text(json.dumps(manifest))
    report = json.loads((old / "report.json").read_text())
    for entry in report["classes"]:
        entry["tested"] = True
    (old / "report.json").write_text(json.dumps(report | {"outcome": "PASS"}))
    return old


def test_compare_notes_a_run_that_turned_inconclusive(small, tmp_path, capsys):
    _, run_dir = small
    old = passed_copy(run_dir, tmp_path / "old")
    result = compare_runs(old, run_dir, resamples=50)
    assert format_comparison(result).splitlines()[0].endswith(f"({INCONCLUSIVE})")
    [note] = [n for n in result["notes"] if INCONCLUSIVE in n]
    assert note.startswith(f"note: the new run is {INCONCLUSIVE} (the old one PASS): 10 of 10")
    assert main(["compare", str(old), str(run_dir)]) == EXIT_OK  # noted, not gated
    assert not compare_runs(run_dir, run_dir, resamples=50)["notes"]  # no news


def test_the_schedule_gates_on_inconclusive(tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    path = write_config(tmp_path, tmp_path / "runs", schedule={"models": str(models)})
    shutil.copy(tmp_path / "ink.keras", models / "ink_v1.keras")
    assert load_config(path).schedule.fail_on == "fail"  # the default
    assert main(["schedule", "run", path]) == 0
    out = capsys.readouterr().out
    assert f"ink_v1.keras: {INCONCLUSIVE} (audited, " in out
    assert f"; 10 of 10 classes untested: {HOSTILE}, 1, 2" in out
    assert main(["schedule", "run", path, "--fail-on", "inconclusive"]) == 1
    assert f"ink_v1.keras, is {INCONCLUSIVE} (fail_on: inconclusive)" in capsys.readouterr().err
    assert main(["schedule", "run", path, "--fail-on", "warn"]) == 0
    for fail_on, code in (("inconclusive", 1), ("warn", 0)):
        path = write_config(
            tmp_path, tmp_path / "runs", schedule={"models": str(models), "fail_on": fail_on}
        )
        assert main(["schedule", "run", path]) == code, fail_on  # reused: the same answer
    assert "(reused, " in capsys.readouterr().out


def test_the_dashboard_shows_inconclusive_with_its_reason(small, monkeypatch):
    _, run_dir = small
    monkeypatch.setenv("BIAS_AUDIT_STORE", str(run_dir.parent))
    page = AppTest.from_file(APP, default_timeout=60)
    page.run()
    assert not page.exception, page.exception
    runs = page.dataframe[0].value.set_index("run_id")
    assert runs.at[run_dir.name, "outcome"] == INCONCLUSIVE
    assert runs.at[run_dir.name, "untested"] == "10 of 10"
    assert page.warning[0].value.startswith(f"{INCONCLUSIVE}: nothing flagged, but most")
    page.switch_page("views/classes.py").run()
    assert not page.exception, page.exception
    assert page.caption[0].value.endswith(f"outcome {INCONCLUSIVE}")
    [warning] = [w.value for w in page.warning]
    assert warning.startswith(f"{INCONCLUSIVE}: nothing flagged, but 10 of 10 classes untested")
    assert HOSTILE not in warning and escape_markdown(HOSTILE) in warning
    assert set(page.dataframe[0].value["status"]) == {"ok (untested)"}


def test_the_dashboard_compare_page_notes_it_escaped(small, tmp_path, monkeypatch):
    _, run_dir = small
    store = tmp_path / "store"
    shutil.copytree(run_dir, store / run_dir.name)
    passed_copy(run_dir, store / "old")
    monkeypatch.setenv("BIAS_AUDIT_STORE", str(store))
    page = AppTest.from_file(APP, default_timeout=60)
    page.run()
    page.switch_page("views/compare.py").run()
    assert not page.exception, page.exception
    assert [metric.value for metric in page.metric] == ["PASS", INCONCLUSIVE]
    [warning] = [w.value for w in page.warning if INCONCLUSIVE in w.value]
    assert warning.startswith(f"the new run is {INCONCLUSIVE} \\(the old one PASS\\)")
    assert HOSTILE not in warning and escape_markdown(HOSTILE) in warning
