"""Bias verdicts end to end: planted shortcuts found, clean models cleared, reports, gates."""

import json
import re
import shutil

import numpy as np
import pytest
from conftest import ink_model

from audit.cli.main import main as cli_main
from audit.config import ConfigError, build_config
from audit.report.markdown import render_markdown
from audit.report.write import write_reports
from audit.run import run_audit
from audit.runs.compare import compare_runs
from pipelines.demo import SHORTCUTS, train_demo_model, write_dataset
from pipelines.demo_data import make_demo_set


def report_of(run_dir):
    return json.loads((run_dir / "report.json").read_text())


@pytest.mark.slow
def test_planted_shortcuts_are_bias_driven_by_class_and_slice(biased_demo):
    _, _, result = biased_demo
    report = report_of(result.run_dir)
    assert report["schema_version"] == 1 and report["outcome"] == "FAIL"
    status = {entry["class_name"]: entry for entry in report["classes"]}
    for digit in SHORTCUTS:
        entry = status[str(digit)]
        assert entry["status"] == "bias-driven", entry["reasons"]
        assert entry["intervention_evidence"]
        # The predicted-label view flags it too: what makes the model *say* the class.
        predicted = [t for t in entry["tests"] if t["kind"] == "pred" and t["flagged"]]
        assert predicted and predicted[0]["q_value"] < 0.05
        assert entry["mass"]["background"]["low"] <= entry["mass"]["background"]["mean"]
        assert entry["interventions"]["bg_gap"] > 0.2
    others = [e for name, e in status.items() if int(name) not in SHORTCUTS]
    assert not any(e["status"] == "bias-driven" for e in others)
    flagged_slices = {t["value"] for t in report["slices"]["tests"] if t["flagged"]}
    assert "stripes" in flagged_slices
    # Every class carries its numbers, each with its 95% CI, from the real run; the
    # strategies and the CAMs are in the store.
    assert all(e["true_label"]["n"] > 0 and e["examples"] for e in report["classes"])

    def within(view, name):
        return view[f"{name}_low"] <= view[name] <= view[f"{name}_high"]

    for entry in report["classes"]:
        view = entry["true_label"]
        assert within(entry, "accuracy") and within(entry["predicted_label"], "precision")
        assert isinstance(view["n_zero_map"], int)
        assert within(view, "loc_error") and within(view, "loc_iou")
        for ci in (view["counterfactual_mass_ci"]["background"], view["pointing_ci"]["object"]):
            assert ci["low"] <= ci["mean"] <= ci["high"]
    text = (result.run_dir / "report.html").read_text()
    assert re.search(r"localisation error \d\.\d\d \[\d\.\d\d, \d\.\d\d\]", text)
    assert (result.run_dir / "strategies.parquet").exists()
    html = (result.run_dir / "report.html").read_text()
    assert "data:image/png;base64," in html and "bias-driven" in html
    assert "http://" not in html and "https://" not in html  # self-contained
    assert len(html) < 2_000_000


@pytest.mark.slow
def test_models_trained_without_the_shortcut_are_not_bias_driven(tmp_path, biased_demo):
    _, _, biased = biased_demo
    for seed in (1, 2, 3):
        root = tmp_path / f"seed{seed}"
        model = train_demo_model(make_demo_set(4000, seed=seed + 10), epochs=14, seed=seed)
        root.mkdir()
        model.save(root / "clean.keras")
        manifest = write_dataset(make_demo_set(600, seed=seed + 20), root / "data")
        config = build_config(
            {
                "model": {"path": str(root / "clean.keras")},
                "dataset": {"manifest": str(manifest)},
                "output": {"store": str(root / "runs")},
            }
        )
        result = run_audit(config, progress=False)
        report = report_of(result.run_dir)
        statuses = {e["class_name"]: e["status"] for e in report["classes"]}
        assert "bias-driven" not in statuses.values(), (seed, statuses)
        assert not any(t["flagged"] for t in report["slices"]["tests"]), seed
        assert report["outcome"] in ("PASS", "WARN")  # suspects warn, never fail
    # Comparing a clean run with the biased one: the biased run adds flags.
    comparison = compare_runs(result.run_dir, biased.run_dir)
    assert any(flag.startswith("class 7") for flag in comparison["new_flags"])
    # Each delta comes with its CI: class 7's background mass rose with the shortcut.
    seven = comparison["deltas"].set_index("class_name").loc["7"]
    assert seven["delta_low"] < seven["delta"] < seven["delta_high"]
    assert seven["delta_low"] > 0 and seven["q_value"] < 0.05
    assert cli_main(["compare", str(result.run_dir), str(biased.run_dir)]) == 1
    reverse = compare_runs(biased.run_dir, result.run_dir)
    # Class 7 is resolved (ok now) or eased (suspected now), never new.
    eased = reverse["resolved_flags"] | reverse["eased_flags"]
    assert any(flag.startswith("class 7: ") for flag in eased)
    assert not any(flag.startswith("class 7") for flag in reverse["new_flags"])
    # These runs audited other images: said; runs of other classes: refused (exit 2).
    assert "different datasets" in " ".join(comparison["notes"])
    other = tmp_path / "other_classes"
    shutil.copytree(biased.run_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["class_names"] = list("abcdefghij")
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="the runs audited different classes"):
        compare_runs(result.run_dir, other)
    assert cli_main(["compare", str(result.run_dir), str(other)]) == 2


@pytest.mark.slow
def test_gates_baselines_and_report_command(biased_demo, tmp_path, capsys):
    files, config, result = biased_demo
    store = tmp_path / "store"
    shutil.copytree(result.run_dir, store / result.run_dir.name)
    args = [
        "run",
        "--model",
        str(files.model),
        "--data",
        str(files.manifest),
        "--out",
        str(store),
        "--no-progress",
    ]
    assert cli_main([*args, "--fail-on", "fail", "--baseline", "latest"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "7: bias-driven" in out
    newest = max(p for p in store.iterdir() if p.is_dir() and p.name != result.run_dir.name)
    report = report_of(newest)
    assert report["baseline"] == str(store / result.run_dir.name)
    tests = [t for e in report["classes"] for t in e["tests"]]
    assert tests and all(t["reference"] == "baseline run, same group" for t in tests)
    # The same dataset: each slice is compared with itself image by image.
    slices = report["slices"]["tests"]
    assert slices and all(t["reference"].endswith("same images") for t in slices)
    assert all("signed-rank" in t["test"] for t in slices)
    # Same model and data as the baseline: no heatmap flag, the interventions still fail it.
    assert not any(t["flagged"] for t in tests)
    assert cli_main(["report", str(newest), "--format", "md"]) == 0
    assert (newest / "report.md").exists()
    assert cli_main(["report", str(tmp_path / "nothing")]) == 2


def test_reports_escape_hostile_class_names(tmp_path):
    hostile = [
        "<script>alert(1)</script>",
        "quote\"'&amp;",
        "ünïcødé ✓",
        "|pipe|",
        "*bold*",
        "[link](http://x)",
        "6",
        "7",
        "8",
        "9",
    ]
    data = make_demo_set(40, seed=5)
    data = type(data)(data.images, data.labels % 2, data.masks, data.backgrounds)
    manifest = write_dataset(data, tmp_path / "data")
    ink_model().save(tmp_path / "ink.keras")
    config = build_config(
        {
            "model": {"path": str(tmp_path / "ink.keras"), "class_names": hostile},
            "dataset": {"manifest": str(manifest)},
            "output": {"store": str(tmp_path / "runs")},
            "policy": {"intervention_samples": 10, "min_support": 5},
        }
    )
    # Labels are "0"/"1" in the manifest; map them onto the hostile names.
    import pandas as pd

    table = pd.read_csv(manifest)
    table["label"] = [hostile[int(label)] for label in table["label"]]
    table.to_csv(manifest, index=False)
    result = run_audit(config, progress=False)
    html = (result.run_dir / "report.html").read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "ünïcødé ✓" in html and "quote&quot;&#x27;&amp;amp;" in html
    markdown = render_markdown(report_of(result.run_dir))
    assert "<script>" not in markdown and "\\|pipe\\|" in markdown
    assert "](http" not in markdown.replace("\\]", "")
    written = write_reports(result.run_dir, formats=("json", "md"))
    assert json.loads(written["json"].read_text())["classes"][0]["class_name"] in hostile
    assert np.isfinite(report_of(result.run_dir)["accuracy"])
