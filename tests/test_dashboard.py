"""The dashboard: every page in Streamlit's AppTest, and in a real headless browser."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from test_report import HOSTILE, REGION, assert_inert, hostile_run

from audit.report.text import unreadable_note
from audit.run import run_audit
from audit.runs.decisions import Decision, model_line, read_decisions, record_decision
from dashboard.store import escape_markdown

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def store(biased_demo, tmp_path_factory):
    """A store with the biased demo run and a second (HiResCAM) run of the same model."""
    files, config, result = biased_demo
    root = tmp_path_factory.mktemp("store")
    shutil.copytree(result.run_dir, root / result.run_dir.name)
    second = config.model_copy(
        update={
            "model": config.model.model_copy(update={"method": "hirescam"}),
            "output": config.output.model_copy(update={"store": root}),
        }
    )
    run_audit(second, progress=False)
    return root


def app(store, monkeypatch, page=None):
    monkeypatch.setenv("BIAS_AUDIT_STORE", str(store))
    test = AppTest.from_file(APP, default_timeout=60)
    test.run()
    if page:
        test.switch_page(f"views/{page}.py").run()
    assert not test.exception, test.exception
    return test


def first_run(store):
    return sorted(p.name for p in Path(store).iterdir() if (p / "report.json").exists())[0]


def test_runs_page_lists_every_run_with_its_flags(store, monkeypatch):
    page = app(store, monkeypatch)
    runs = page.dataframe[0].value
    assert len(runs) == 2 and set(runs["bias_driven"]) >= {2}
    assert set(runs["model_line"]) == {"demo_model"}
    assert page.sidebar.selectbox[0].options == runs["run_id"].tolist()


def test_classes_page_shows_the_report_numbers_and_sorts(store, monkeypatch):
    page = app(store, monkeypatch, "classes")
    run = page.sidebar.selectbox[0].value
    report = json.loads((Path(store) / run / "report.json").read_text())
    table = page.dataframe[0].value
    assert table["status"].iloc[0] == "bias-driven"  # sorted by severity
    seven = table[table["class"] == "7"].iloc[0]
    expected = next(e for e in report["classes"] if e["class_name"] == "7")
    assert seven["mass_background"] == pytest.approx(expected["mass"]["background"]["mean"])
    assert seven["n"] == expected["n"]
    page.radio[0].set_value("predicted label").run()
    assert "precision" in page.dataframe[0].value.columns
    page.selectbox[0].set_value("class").run()
    assert page.dataframe[0].value["class"].tolist() == sorted(table["class"])
    slices = page.dataframe[1].value.set_index("value")
    assert bool(slices.at["stripes", "flagged"]) and not slices["flagged"].drop("stripes").any()
    test = next(t for t in report["slices"]["tests"] if t["value"] == "stripes")
    for name in ("effect_low", "effect_high", "q_value"):  # the flag's difference CI and q
        assert slices.at["stripes", name] == pytest.approx(test[name])
    # The attribute's worst group is named once, with its CI, not repeated per row.
    worst = [c.value for c in page.caption if c.value.startswith("Worst group of")]
    group = next(g for g in report["slices"]["groups"] if g["kind"] == "slice")
    low, high = group["worst_group_accuracy_low"], group["worst_group_accuracy_high"]
    assert worst == [
        f"Worst group of background\\_type: {group['worst_group_value']}, accuracy "
        f"{group['worst_group_accuracy']:.2f} [{low:.2f}, {high:.2f}] (the lowest among "
        "values with enough rows)"
    ]


def test_classes_page_shows_each_mean_with_its_ci(store, monkeypatch):
    page = app(store, monkeypatch, "classes")
    report = json.loads((Path(store) / page.sidebar.selectbox[0].value / "report.json").read_text())
    seven = page.dataframe[0].value.set_index("class").loc["7"]
    probe = next(e for e in report["classes"] if e["class_name"] == "7")["interventions"]
    assert seven["bg_gap_low"] <= seven["bg_gap"] <= seven["bg_gap_high"]
    assert seven["bg_gap_low"] == pytest.approx(probe["bg_gap_low"])
    assert seven["bg_gap_high"] == pytest.approx(probe["bg_gap_high"])
    slices = page.dataframe[1].value.set_index("value")
    groups = report["slices"]["groups"]
    group = next(g for g in groups if g["kind"] == "slice" and g["value"] == "stripes")
    for name in ("mass_background", "mass_background_low", "mass_background_high"):
        assert slices.at["stripes", name] == pytest.approx(group[name])


def test_class_detail_filters_change_the_gallery(store, monkeypatch):
    page = app(store, monkeypatch, "class_detail")
    assert page.selectbox[0].value in ("3", "7")  # the worst class comes first
    count = int(page.caption[1].value.split()[0])
    page.selectbox[1].set_value("incorrect").run()
    incorrect = int(page.caption[1].value.split()[0])
    page.selectbox[1].set_value("correct").run()
    correct = int(page.caption[1].value.split()[0])
    assert incorrect + correct == count and 0 < correct < count
    page.selectbox[2].set_value("background_type = stripes").run()
    assert int(page.caption[1].value.split()[0]) < correct
    assert not page.exception


def test_class_detail_opens_on_the_classes_page_first_row(store, monkeypatch):
    first = app(store, monkeypatch, "classes").dataframe[0].value["class"].iloc[0]
    assert app(store, monkeypatch, "class_detail").selectbox[0].value == first


def test_class_detail_gives_the_class_numbers_and_interventions_with_cis(store, monkeypatch):
    page = app(store, monkeypatch, "class_detail")
    report = json.loads((Path(store) / page.sidebar.selectbox[0].value / "report.json").read_text())
    entry = next(e for e in report["classes"] if e["class_name"] == page.selectbox[0].value)
    view, probe = entry["true_label"], entry["interventions"]
    texts = [t.value for t in page.text]
    accuracy = f"{view['accuracy']:.2f} [{view['accuracy_low']:.2f}, {view['accuracy_high']:.2f}]"
    assert any(t.startswith(f"{view['n']} images, accuracy {accuracy}") for t in texts)
    assert any(t.startswith(f"Interventions on {probe['n_probe']} correct images") for t in texts)
    assert any(t.startswith(f"Transplant test on {probe['n_transplant']} images") for t in texts)
    assert f"Evidence: {entry['evidence']}" in texts  # every test of the class, in one line
    # 48 px: no Guided Grad-CAM pictures, and the page says why.
    assert not any(s.value.startswith("Guided Grad-CAM") for s in page.subheader)
    assert escape_markdown(report["guided_note"]) in [c.value for c in page.caption]
    rates = page.dataframe[-1].value.set_index("intervention")
    swapped = rates.loc["background swapped (Mixed-Rand)"]
    assert swapped["still predicted"] == pytest.approx(probe["rate_mixed_rand"])
    assert swapped["low"] == pytest.approx(probe["rate_mixed_rand_low"])
    assert swapped["high"] == pytest.approx(probe["rate_mixed_rand_high"])
    assert len(rates) == 3  # a bias-driven class went through the diagnostics too
    # A class without a finding lists only what ran, not rows of None.
    clean = next(e for e in report["classes"] if e["status"] == "ok")
    page.selectbox[0].set_value(clean["class_name"]).run()
    rates = page.dataframe[-1].value
    assert rates["intervention"].tolist() == ["background swapped (Mixed-Rand)"]


def test_compare_page_shows_deltas(store, monkeypatch):
    page = app(store, monkeypatch, "compare")
    deltas = page.dataframe[-1].value  # after the new, resolved and eased flags
    assert set(deltas["class_name"]) == {str(d) for d in range(10)}
    assert len(page.metric) == 2
    # The store's two runs are Grad-CAM and HiResCAM of one model: said, not mixed silently.
    warnings = " ".join(w.value for w in page.warning)
    assert "different settings" in warnings and "'hirescam'" in warnings


def test_a_decision_is_persisted_and_shown_after_a_reload(store, monkeypatch):
    page = app(store, monkeypatch, "decisions")
    page.text_input[0].input("Ada <b>Reviewer</b>")
    page.selectbox[1].set_value("retrain-rebalanced")
    page.text_area[0].input("rebalance stripes across digits")
    page.button[0].click().run()
    assert not page.exception and page.success[0].value == "Decision recorded."
    decisions = read_decisions(store)
    assert decisions[-1].reviewer == "Ada <b>Reviewer</b>"
    reloaded = app(store, monkeypatch, "decisions")
    shown = reloaded.dataframe[0].value
    assert shown["reviewer"].iloc[0] == "Ada <b>Reviewer</b>"  # shown as text, not HTML
    # Accepting without a reason is refused, and nothing is written.
    reloaded.selectbox[1].set_value("accept")
    reloaded.text_input[0].input("Bob")
    reloaded.button[0].click().run()
    assert reloaded.warning and len(read_decisions(store)) == len(decisions)


def copied(store, tmp_path, runs=None):
    """A private copy of the store (or of some of its runs) that a test may change."""
    copy = tmp_path / "store"
    for run in sorted(p for p in Path(store).iterdir() if (p / "manifest.json").exists()):
        if runs is None or run.name in runs:
            shutil.copytree(run, copy / run.name)
    return copy


def add_unfinished_run(store, status="running"):
    """A newer run killed (or still running) before its report: a manifest, no report."""
    manifest = json.loads((Path(store) / first_run(store) / "manifest.json").read_text())
    run_id = "29991231T000000-unfinished"
    manifest |= {"run_id": run_id, "started": "2999-12-31T00:00:00+00:00", "status": status}
    (Path(store) / run_id).mkdir()
    (Path(store) / run_id / "manifest.json").write_text(json.dumps(manifest))
    return run_id


def test_an_unfinished_run_is_listed_but_never_chosen_by_default(store, tmp_path, monkeypatch):
    store = copied(store, tmp_path)
    unfinished = add_unfinished_run(store)
    page = app(store, monkeypatch)
    runs = page.dataframe[0].value.set_index("run_id")
    assert runs.index[0] == unfinished  # newest first, with its status
    assert runs.at[unfinished, "status"] == "running" and runs.at[unfinished, "outcome"] == "n/a"
    assert page.sidebar.selectbox[0].value == runs.index[1]  # the newest finished run
    for view in ("classes", "class_detail", "decisions"):
        page.switch_page(f"views/{view}.py").run()
        assert not page.exception and not page.warning, view
        page.sidebar.selectbox[0].set_value(unfinished).run()
        assert not page.exception, view
        assert page.warning[0].value == (
            f"Run {escape_markdown(unfinished)} is still running or was interrupted (status "
            "running) and has no report yet: choose a finished run in the sidebar."
        )
        assert not page.dataframe and not page.title  # the page stopped
        page.sidebar.selectbox[0].set_value(runs.index[1]).run()


def test_new_runs_and_rewritten_reports_show_without_a_restart(store, tmp_path, monkeypatch):
    older, newer = sorted(p.name for p in Path(store).iterdir() if (p / "report.json").exists())
    copy = copied(store, tmp_path, runs={older})
    page = app(copy, monkeypatch)
    assert page.dataframe[0].value["run_id"].tolist() == [older]
    shutil.copytree(Path(store) / newer, copy / newer)  # a run finished meanwhile
    page.run()
    assert page.dataframe[0].value["run_id"].tolist() == [newer, older]
    page.switch_page("views/classes.py").run()
    page.sidebar.selectbox[0].set_value(older).run()
    assert page.caption[0].value.endswith("outcome FAIL")
    # `bias-audit report RUN` rewrites the report while the dashboard runs.
    path = copy / older / "report.json"
    path.write_text(path.read_text().replace('"outcome": "FAIL"', '"outcome": "WARN"'))
    page.run()
    assert page.caption[0].value.endswith("outcome WARN")
    page.switch_page("views/runs.py").run()
    assert page.dataframe[0].value.set_index("run_id").at[older, "outcome"] == "WARN"


def test_the_trend_shows_points_with_a_single_run(store, tmp_path, monkeypatch):
    store = copied(store, tmp_path, runs={first_run(store)})
    page = app(store, monkeypatch)
    [chart] = page.get("vega_lite_chart")
    spec = json.loads(chart.proto.spec)
    assert spec["mark"] == {"type": "line", "point": True}


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory):
    """A store with one small run whose predicted class and spurious region are hostile."""
    return hostile_run(tmp_path_factory.mktemp("hostile")).parent


def markdown_texts(page) -> list[str]:
    """Every string the page hands to Streamlit's Markdown renderer."""
    kinds = ("title", "header", "subheader", "markdown", "caption")
    kinds += ("info", "warning", "error", "success")
    texts = [element.value for kind in kinds for element in getattr(page, kind)]
    texts += [element.label for element in page.metric]
    return texts + [caption for image in page.image for caption in image.captions]


def test_hostile_names_are_escaped_on_every_page(hostile_store, monkeypatch):
    page = app(hostile_store, monkeypatch, "class_detail")
    page.selectbox[0].set_value(HOSTILE).run()
    captions = page.image[0].captions
    assert captions and all(escape_markdown(HOSTILE) in caption for caption in captions)
    assert f"most mass on {escape_markdown(REGION)})" in page.caption[1].value
    for view in ("runs", "classes", "class_detail", "decisions"):
        page.switch_page(f"views/{view}.py").run()
        assert not page.exception, view
        for text in markdown_texts(page):
            for name in (HOSTILE, REGION):
                assert name not in text, (view, text)
            for hostile in (escape_markdown(HOSTILE), escape_markdown(REGION)):
                if hostile in text:
                    assert_inert(hostile)


def test_unreadable_images_are_noted_in_the_gallery(hostile_store, monkeypatch):
    page = app(hostile_store, monkeypatch, "class_detail")
    page.selectbox[0].set_value(HOSTILE).run()
    shown = len(page.image[0].captions)
    assert shown and not page.warning
    root = hostile_store.parent / "data"
    root.rename(root.with_name("moved"))
    try:
        page.run()
        assert page.warning[0].value == escape_markdown(unreadable_note(shown, root))
        # The Guided Grad-CAM pictures are in the run folder: still shown.
        assert page.subheader[0].value.startswith("Guided Grad-CAM")
        assert not any("predicted" in text for text in page.image[0].captions)  # no gallery
    finally:
        root.with_name("moved").rename(root)
    page.run()  # the images are back, and read again
    assert not page.warning and len(page.image[0].captions) == shown


def test_classes_page_shows_the_decision_in_force(store, tmp_path, monkeypatch):
    store = copied(store, tmp_path)
    page = app(store, monkeypatch, "classes")
    result = json.loads((store / page.sidebar.selectbox[0].value / "report.json").read_text())
    line = model_line(result["model"]["path"])

    def decide(choice, note=""):
        record_decision(store, Decision(line, "7", choice, "Ada", note, "later-run"))
        page.run()
        classes = page.dataframe[0].value.set_index("class")
        return classes.at["7", "decision"]

    assert decide("collect-data") == "collect-data"  # recorded after the report was written
    assert decide("accept", "known shortcut, guarded downstream") == "accept"


def test_a_refused_decision_keeps_the_form_and_a_recorded_one_clears_the_note(
    store, tmp_path, monkeypatch
):
    store = copied(store, tmp_path)
    page = app(store, monkeypatch, "decisions")
    page.selectbox[1].set_value("accept")
    page.text_input[0].input("Bob")
    page.button[0].click().run()
    assert page.warning[0].value == escape_markdown(
        "accepting a flagged class needs a reason in the note"
    )
    assert page.text_input[0].value == "Bob" and page.selectbox[1].value == "accept"
    assert not read_decisions(store)
    page.text_area[0].input("watermark removed downstream")
    page.button[0].click().run()
    assert page.success[0].value == "Decision recorded." and not page.warning
    assert read_decisions(store)[-1].note == "watermark removed downstream"
    assert page.text_area[0].value == "" and page.text_input[0].value == "Bob"


def test_a_read_only_store_gives_a_clear_error(store, tmp_path, monkeypatch):
    def read_only(store, decision):
        raise PermissionError(13, "Permission denied", str(store / "decisions.jsonl"))

    monkeypatch.setattr("audit.runs.decisions.record_decision", read_only)
    page = app(copied(store, tmp_path), monkeypatch, "decisions")
    page.text_input[0].input("Bob")
    page.text_area[0].input("rebalance")
    page.button[0].click().run()
    assert not page.exception
    assert "Could not record the decision in" in page.error[0].value
    assert "Permission denied" in page.error[0].value
    assert page.text_area[0].value == "rebalance"  # nothing lost


def _wait_until_rendered(view, timeout: float = 60.0) -> None:
    """Streamlit marks its root element while the script runs; placeholders are skeletons."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = view.locator("[data-testid='stApp']").get_attribute("data-test-script-state")
        if state == "notRunning" and view.locator("[data-testid='stSkeleton']").count() == 0:
            time.sleep(1.0)  # charts and images paint after the script ends
            return
        time.sleep(0.25)
    pytest.fail("the page did not finish rendering")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (.ci/run installs it)")
def test_every_page_in_a_real_browser(store):
    from playwright.sync_api import sync_playwright

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "audit", "dashboard", "--store", str(store), "--port", str(port),
         "--address", "127.0.0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("the dashboard did not start")
        pages = {
            "runs": "Runs",
            "classes": "Mass on background",
            "class_detail": "Strategies",
            "compare": "Per-class deltas",
            "decisions": "Decisions for this model line",
        }
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run"],
            )  # fmt: skip
            view = browser.new_page(viewport={"width": 1400, "height": 1100})
            for path, text in pages.items():
                # The default page (Runs) lives at the root: its url_path is no route.
                view.goto(f"http://127.0.0.1:{port}/{'' if path == 'runs' else path}")
                view.get_by_text(text, exact=False).first.wait_for(timeout=60_000)
                _wait_until_rendered(view)
                assert view.locator("[data-testid='stException']").count() == 0, path
                assert view.get_by_text("Page not found").count() == 0, path
                view.screenshot(path=str(ARTIFACTS / f"dashboard-{path}.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert all((ARTIFACTS / f"dashboard-{p}.png").stat().st_size > 10_000 for p in pages)
