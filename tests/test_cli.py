"""The command line: usage errors and the demo end to end."""

import subprocess
import sys

import pytest

from audit.cli.main import main


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_runs_end_to_end_and_shows_the_shortcut(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "audit", "demo", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "demo_model.keras").exists()
    assert (tmp_path / "audit_data" / "manifest.csv").exists()
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 30
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    # Columns: class, n, then accuracy, object mass, background mass and object lift,
    # each "mean [low, high]" (three words)
    object_mass = {digit: float(lines[digit][5]) for digit in "0123456789"}
    assert all(lines[digit][6].startswith("[") for digit in "0123456789")
    clean = [object_mass[d] for d in "01245689"]
    assert object_mass["7"] < min(clean)
    assert object_mass["3"] < sorted(clean)[len(clean) // 2]


# ---------------------------------------------------------------- sub-commands and messages


def test_schedule_help_describes_its_subcommand_and_exits_0(capsys):
    assert main(["schedule", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: bias-audit schedule run CONFIG" in out and "subcommands:" in out
    assert main(["schedule"]) == 2  # no subcommand: the same text, as an error
    assert "subcommands:" in capsys.readouterr().err


def test_method_help_lists_every_registered_method():
    from audit.cli.run import parser
    from audit.engine.cam_methods import CAM_METHODS
    from audit.engine.registry import built_in_names

    text = " ".join(parser().format_help().split())
    assert len(CAM_METHODS) == 9
    assert built_in_names() == list(CAM_METHODS)  # read from the decorators, Keras-free
    for name in CAM_METHODS:
        assert f"{name}," in text or f"{name} (default:" in text, name


def _fake_run(run_dir, status, images=False):
    import json

    import pandas as pd

    run_dir.mkdir(parents=True)
    (run_dir / "manifest.json").write_text(json.dumps({"run_id": run_dir.name, "status": status}))
    if images:
        pd.DataFrame({"row": [0], "status": ["ok"]}).to_parquet(run_dir / "images.parquet")


@pytest.mark.parametrize(
    ("status", "images"), [("running", False), ("running", True), (None, False)]
)
def test_report_on_an_unfinished_run_says_how_to_finish_it(tmp_path, capsys, status, images):
    run_dir = tmp_path / "runs" / "r1"
    _fake_run(run_dir, status, images)  # killed mid-pass, or its analysis failed
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"run {run_dir} is incomplete (status {status})" in err
    assert "bias-audit run CONFIG --resume" in err and "Traceback" not in err
    assert not (run_dir / "report.html").exists()


def test_history_says_when_no_run_matches_the_model_line(tmp_path, capsys):
    import json

    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    report = {
        "run_id": "r1",
        "outcome": "PASS",
        "accuracy": 1.0,
        "counts": {"ok": 3},
        "status_counts": {"ok": 2},
        "classes": [],
        "slices": {"tests": []},
    }
    manifest = {
        "run_key": "k",
        "started": "2026-01-01T00:00:00",
        "model": {"path": "/models/products_v3.keras", "sha256": "s"},
        "dataset": {"fingerprint": "f"},
    }
    (run_dir / "report.json").write_text(json.dumps(report))
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    assert main(["history", "--store", str(tmp_path / "runs"), "--model-line", "nope"]) == 0
    out = capsys.readouterr().out
    assert "no runs match model line nope" in out and "its model lines: products" in out
    assert main(["history", "--store", str(tmp_path / "runs"), "--model-line", "products"]) == 0
    assert "r1" in capsys.readouterr().out


def test_the_summary_lists_the_commonest_skip_reasons_and_counts_the_rest():
    from audit.report.summary import format_summary

    reasons = {f"reason {index}": 20 - index for index in range(11)}
    manifest = {
        "run_id": "r1",
        "counts": {"rows": 165, "ok": 0, "skipped": 165, "skip_reasons": reasons},
        "model": {"layer": "conv", "method": "gradcam"},
        "timings": {"total_seconds": 1.0, "pass_seconds": 0.5},
    }
    lines = format_summary({}, manifest).splitlines()
    listed = [line for line in lines if line.strip().startswith("skipped")]
    assert len(listed) == 8 and "reason 0" in listed[0] and "reason 7" in listed[-1]
    assert "… and 3 more reason(s) for 33 row(s)" in lines[-1]  # 12 + 11 + 10 rows
    # Eight reasons or fewer: no tail line.
    manifest["counts"]["skip_reasons"] = dict(list(reasons.items())[:8])
    assert "more reason" not in format_summary({}, manifest)


# ---------------------------------------------------------------- run: flags and bad inputs


def _config_with_folders(tmp_path):
    path = tmp_path / "audit.yaml"
    path.write_text("model: {path: m.keras}\ndataset: {folders: images, masks: masks, limit: 5}\n")
    return path


def test_data_keeps_a_masks_tree_for_a_new_folder_root_and_masks_sets_one(tmp_path):
    from audit.cli.run import overrides_from, parser
    from audit.config import load_config

    config_path = _config_with_folders(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "list.csv").write_text("path,label\n")

    def configured(*flags):
        return load_config(config_path, overrides_from(parser().parse_args(list(flags))))

    same_kind = configured("--data", str(tmp_path / "other")).dataset
    assert same_kind.folders == tmp_path / "other" and same_kind.masks == tmp_path / "masks"
    assert same_kind.limit == 5  # the file's other dataset keys stay
    new_masks = configured("--data", str(tmp_path / "other"), "--masks", str(tmp_path / "m2"))
    assert new_masks.dataset.masks == tmp_path / "m2"
    # Another kind of source replaces the folders, and masks (folders only) go with them.
    manifest = configured("--data", str(tmp_path / "list.csv")).dataset
    assert manifest.manifest == tmp_path / "list.csv"
    assert manifest.folders is None and manifest.masks is None


def test_config_errors_from_flags_name_the_flag(tmp_path, capsys):
    argv = ["run", "--model", "m.keras", "--data", str(tmp_path / "d.csv")]
    assert main([*argv, "--batch-size", "0", "--size", "0", "48", "--run-id", "../x"]) == 2
    err = capsys.readouterr().err
    assert "batch_size (--batch-size): Input should be greater than or equal to 1" in err
    assert "preprocess.size (--size): height and width must be at least 1 pixel" in err
    assert "output.run_id (--run-id): '../x' is not a plain folder name" in err
    assert main([*argv, "--masks", str(tmp_path / "masks")]) == 2
    assert "dataset (--data, --masks): masks goes with folders" in capsys.readouterr().err


def test_a_corrupt_model_file_exits_2_naming_it(tmp_path, capsys):
    model = tmp_path / "m.keras"
    model.write_text("garbage\n")
    (tmp_path / "d.csv").write_text("path,label\na.png,0\n")
    argv = ["run", "--model", str(model), "--data", str(tmp_path / "d.csv")]
    assert main([*argv, "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert f"bias-audit run: cannot read model {model}: not a valid .keras file" in err
    assert "File not found" not in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_config_errors_are_reported_before_keras_is_imported(tmp_path):
    """A bad config fails fast: neither `run` nor `schedule run` loads Keras first."""
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: m.keras}\ndataset: {manifest: a.csv}\nbatch_sise: 8\n")
    script = (
        "import sys\nfrom audit.cli.main import main\n"
        f"codes = [main(['run', {str(bad)!r}]), main(['schedule', 'run', {str(bad)!r}])]\n"
        "print(codes, 'keras' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.strip().splitlines()[-1] == "[2, 2] False", done.stderr
    assert done.stderr.count("batch_sise") == 2
