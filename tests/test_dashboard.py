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

from audit.decisions import read_decisions
from audit.pipeline import run_audit

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
    slices = page.dataframe[1].value
    assert "stripes" in slices["value"].tolist() and "worst_group_accuracy" in slices


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


def test_compare_page_shows_deltas(store, monkeypatch):
    page = app(store, monkeypatch, "compare")
    deltas = page.dataframe[-1].value  # after the new, resolved and eased flags
    assert set(deltas["class_name"]) == {str(d) for d in range(10)}
    assert len(page.metric) == 2


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
                view.goto(f"http://127.0.0.1:{port}/{path}")
                view.get_by_text(text, exact=False).first.wait_for(timeout=60_000)
                _wait_until_rendered(view)
                assert view.locator("[data-testid='stException']").count() == 0, path
                view.screenshot(path=str(ARTIFACTS / f"dashboard-{path}.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert all((ARTIFACTS / f"dashboard-{p}.png").stat().st_size > 10_000 for p in pages)
