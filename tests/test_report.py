"""report.md and report.html: escaping, numbers with their CIs, unreadable dataset images."""

import copy
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import ink_model

from audit.config import build_config
from audit.report.html import render_html
from audit.report.markdown import render_markdown
from audit.run import run_audit
from pipelines.demo import write_dataset
from pipelines.demo_data import make_demo_set

HOSTILE = (
    "[x](https://evil.example) **b** ~~gone~~ $x$ :smile: :material/home: a\\*b "
    "www.evil.example me@evil.example"
)
REGION = "bg__bold__"  # a valid region name that Markdown would make bold


def hostile_run(root: Path) -> Path:
    """A small audit (about 3 s) whose predicted class and spurious region have hostile names.

    The ink model predicts the last class for every image, so the odd digits (labelled
    with the hostile name) are its correct images and get gallery rows and examples.
    """
    data = make_demo_set(40, seed=5)
    data = type(data)(data.images, data.labels % 2, data.masks, data.backgrounds)
    manifest = write_dataset(data, root / "data")
    class_names = [*(str(digit) for digit in range(9)), HOSTILE]
    table = pd.read_csv(manifest)
    table["label"] = [class_names[9 * (int(label) % 2)] for label in table["label"]]
    table.to_csv(manifest, index=False)
    ink_model().save(root / "ink.keras")
    config = build_config(
        {
            "model": {"path": str(root / "ink.keras"), "class_names": class_names},
            "dataset": {"manifest": str(manifest)},
            "output": {"store": str(root / "runs")},
            "regions": [
                {"name": "object", "source": "mask", "role": "expected"},
                {"name": REGION, "source": "background", "role": "spurious"},
            ],
            "policy": {"intervention_samples": 10, "min_support": 5},
            # A 48 px model: Guided Grad-CAM only when asked for below 64 px.
            "trust": {"guided_min_side": 0},
        }
    )
    return run_audit(config, progress=False).run_dir


def unescaped(markdown: str) -> str:
    """What a Markdown renderer shows as text: escapes and word joiners removed."""
    return re.sub(r"\\(.)", r"\1", markdown).replace("\u2060", "")


def assert_inert(markdown: str) -> None:
    """No live link, emphasis, strikethrough, math or shortcode in Markdown text."""
    bare = re.sub(r"\\.", "", markdown)  # what is left once the escaped characters go
    assert not re.search(r"[][*_~$`<>|]|:\w|www\.", bare), markdown
    assert not re.search("@(?!\u2060)", markdown), markdown  # an e-mail autolink


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return hostile_run(tmp_path_factory.mktemp("hostile"))


@pytest.fixture
def report(run_dir):
    return json.loads((run_dir / "report.json").read_text())


def hostile_row(markdown: str) -> str:
    return next(line for line in markdown.splitlines() if "evil" in line and line.startswith("|"))


def test_markdown_keeps_hostile_names_as_text(report):
    markdown = render_markdown(report)
    row = hostile_row(markdown)
    name = row.split(" | ")[0].removeprefix("| ")
    assert_inert(name)
    assert unescaped(name) == HOSTILE  # escaped, not mangled
    header = next(line for line in markdown.splitlines() if line.startswith("| class"))
    assert "__bold__" not in header and unescaped(header).count(REGION) == 1


def test_markdown_model_name_is_a_code_span_without_backslashes(report):
    report = copy.deepcopy(report)
    report["model"]["path"] = "/models/demo_model_v2.keras"
    assert "Model `demo_model_v2.keras` (layer" in render_markdown(report)
    report["model"]["path"] = "/models/odd`name.keras"
    assert "Model ``odd`name.keras`` (layer" in render_markdown(report)
    report["model"]["path"] = "/models/`edge.keras"  # a leading backtick needs the spaces
    assert "Model `` `edge.keras `` (layer" in render_markdown(report)


def test_markdown_and_html_show_each_mean_with_its_ci(report, run_dir):
    report = copy.deepcopy(report)
    entry = next(e for e in report["classes"] if e["class_name"] == HOSTILE)
    entry["mass"][REGION] = {"mean": 0.75, "low": 0.71, "high": 0.79}
    entry["true_label"]["lift"][REGION] = {"mean": 1.5, "low": 1.25, "high": 1.75}
    entry["true_label"]["mass"][REGION] = {"mean": 0.62, "low": 0.55, "high": 0.69}
    entry["interventions"] |= {"bg_gap": 0.4, "bg_gap_low": 0.3, "bg_gap_high": 0.5}
    entry["interventions"] |= {
        "rate_mixed_rand": 0.6,
        "rate_mixed_rand_low": 0.45,
        "rate_mixed_rand_high": 0.73,
    }
    entry["interventions"] |= {
        "transplant_excess": 0.2,
        "transplant_excess_low": 0.1,
        "transplant_excess_high": 0.3,
    }
    row = hostile_row(render_markdown(report))
    assert row.endswith("| 0.75 [0.71, 0.79] | 0.40 [0.30, 0.50] | 0.20 [0.10, 0.30] |")
    page = render_html(report, run_dir)
    summary = page[page.index("<h2>Summary</h2>") : page.index("</table>")]
    assert (
        "<td>0.75 [0.71, 0.79]</td><td>0.40 [0.30, 0.50]</td><td>0.20 [0.10, 0.30]</td>" in summary
    )
    assert "<td>1.50 [1.25, 1.75]</td>" in page  # lift in the class card
    # The card's mass bars print their CI beside the bar, not only in the tooltip.
    assert 'font-size="11">0.62 [0.55, 0.69]</text>' in page
    assert "BG-gap 0.40 [0.30, 0.50]" in page  # the interventions sentence
    assert "background swapped 0.60 [0.45, 0.73]" in page
    group = next(g for g in report["slices"]["groups"] if g["kind"] == "slice")
    slices = page[page.index("<h2>Slices</h2>") :]
    low, high = group[f"mass_{REGION}_low"], group[f"mass_{REGION}_high"]
    assert f"{group[f'mass_{REGION}']:.2f} [{low:.2f}, {high:.2f}]</td>" in slices


def test_a_class_without_numbers_shows_na_not_a_crash(report, run_dir):
    # One class with correct images: no other background to swap in, so no BG-gap.
    entry = next(e for e in report["classes"] if e["class_name"] == HOSTILE)
    assert entry["interventions"]["bg_gap"] is None
    page = render_html(report, run_dir)
    assert "background swapped n/a; BG-gap n/a." in page
    # Diagnostics that did not run are said to be not run, not shown as n/a.
    assert "object only n/a" not in page
    assert "diagnostics run only for classes with a finding" in page
    assert "| 1 | ok (untested) | 0 | n/a | n/a | n/a |" in render_markdown(report)


def test_accuracy_and_flagged_slices_come_with_their_intervals(report, run_dir):
    report = copy.deepcopy(report)
    entry = report["classes"][0]
    entry.update(accuracy=0.5, accuracy_low=0.4, accuracy_high=0.6)
    assert f"| {entry['n']} | 0.50 [0.40, 0.60] |" in render_markdown(report)
    page = render_html(report, run_dir)
    assert f"<td>{entry['n']}</td><td>0.50 [0.40, 0.60]</td>" in page
    # A flagged slice is listed in both reports with its difference CI, names escaped.
    test = {
        "attribute": "<b>site</b>",
        "value": "a",
        "statistic": "mass",
        "region": REGION,
        "group_mean": 0.6,
        "reference_mean": 0.4,
        "effect_low": 0.1,
        "effect_high": 0.3,
        "q_value": 0.001,
        "flagged": True,
    }
    report["slices"]["tests"] = [test]
    page = render_html(report, run_dir)
    assert "Flagged slices" in page and "<b>site</b>" not in page
    assert "&lt;b&gt;site&lt;/b&gt; = a: mass on" in page
    assert "0.600 vs 0.400 (difference CI [0.100, 0.300], q=0.001; warn)" in page
    markdown = render_markdown(report)
    assert "(difference CI [0.100, 0.300], q=0.001; warn)" in markdown
    # Each attribute's worst group is named once, with its accuracy's CI.
    group = next(g for g in report["slices"]["groups"] if g["kind"] == "slice")
    group.update(
        worst_group_value="<i>w</i>",
        worst_group_accuracy=0.5,
        worst_group_accuracy_low=0.25,
        worst_group_accuracy_high=0.75,
    )
    page = render_html(report, run_dir)
    worst = f"{group['attribute']} = &lt;i&gt;w&lt;/i&gt;, accuracy 0.50 [0.25, 0.75]"
    assert page.count(worst) == 1


def test_the_run_summary_gives_each_class_number_with_its_ci(report):
    from audit.report.summary import class_table

    table = class_table(report).set_index("class")
    for entry in report["classes"]:
        view, row = entry["true_label"], table.loc[entry["class_name"]]
        low, high = view["accuracy_low"], view["accuracy_high"]
        if view["accuracy"] is None:  # a class with no image
            assert row["accuracy"] == "n/a"
            continue
        assert row["accuracy"] == f"{view['accuracy']:.2f} [{low:.2f}, {high:.2f}]"
        mass = view["mass"][REGION]
        if mass["mean"] is None:
            assert row[f"mass_{REGION}"] == "n/a"
        elif mass["low"] is not None:
            expected = f"{mass['mean']:.2f} [{mass['low']:.2f}, {mass['high']:.2f}]"
            assert row[f"mass_{REGION}"] == expected


def test_zero_maps_are_shown_next_to_the_class_count(report, run_dir):
    report = copy.deepcopy(report)
    entry = report["classes"][0]
    entry["true_label"]["n_zero_map"] = 3
    row = f"| {entry['n']} (3 zero maps among the correct) |"
    assert row in render_markdown(report)
    assert f"<td>{entry['n']} (3 zero maps among the correct)</td>" in render_html(report, run_dir)


def test_guided_pictures_are_the_examples_when_asked_for_below_the_readable_size(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    assert report["guided_note"] is None  # trust.guided_min_side: 0
    examples = {e["row"] for entry in report["classes"] for e in entry["examples"]}
    pictures = {int(path.stem) for path in (run_dir / "guided").glob("*.png")}
    assert examples and pictures == examples


def test_unreadable_dataset_images_are_noted_and_guided_pictures_kept(report, run_dir):
    page = render_html(report, run_dir)
    guided = page.count("Guided Grad-CAM, row")
    overlays = page.count("<figcaption class='overlay'>")
    assert guided and overlays and "could not be read" not in page
    assert "could not be read" not in render_markdown(report)
    root = Path(report["dataset"]["root"])
    shutil.move(root, root.with_name("moved"))
    try:
        page = render_html(report, run_dir)
        markdown = render_markdown(report)
    finally:
        shutil.move(root.with_name("moved"), root)
    examples = sum(len(e["examples"]) for e in report["classes"])
    note = f"{examples} example images could not be read from {root}"
    assert f"<p class='note'>{note}: " in page
    assert page.count("Guided Grad-CAM, row") == guided  # stored in the run folder
    assert page.count("<figcaption class='overlay'>") == 0  # only the guided pictures are left
    assert page.count("<figcaption class='guided'>") == guided
    assert f"**Note:** {note}: report.html shows no overlay" in unescaped(markdown)


def test_a_relative_dataset_root_is_named_as_such(report, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = copy.deepcopy(report)
    report["dataset"]["root"] = "data"
    markdown = unescaped(render_markdown(report))
    assert f"could not be read from data (a relative path, looked up from {tmp_path})" in markdown


def test_verdicts_are_stored_once_and_reports_read_them(run_dir, tmp_path):
    import subprocess
    import sys

    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    verdicts = pd.read_parquet(copy / "verdicts.parquet")
    assert len(verdicts) == 10 and set(verdicts["status"]) <= {"ok", "suspected", "bias-driven"}
    # A verdict changed in the table shows in the report: it is read, not recomputed.
    verdicts.loc[verdicts["class_index"] == 0, "status"] = "suspected"
    verdicts.to_parquet(copy / "verdicts.parquet")
    code = (
        "import sys; from pathlib import Path; import dashboard.store; "
        "from audit.report.build import build_report; "
        f"report = build_report(Path({str(copy)!r})); "
        "print([c['status'] for c in report['classes'] if c['class_index'] == 0][0], "
        "'keras' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    # The reports and the dashboard's reads need no Keras.
    assert out.stdout.split() == ["suspected", "False"], out.stderr[-2000:]
