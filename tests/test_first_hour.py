"""A newcomer's data from the quick form: box-only manifests, text labels, --class-names."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from audit.cli.main import main
from audit.cli.run import _class_names
from audit.config import ConfigError

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def box_manifest(files, folder, rows: int = 240):
    """The demo's audit set as teams often have it: text labels and boxes, no masks."""
    table = pd.read_csv(files.manifest).head(rows)
    root = files.manifest.parent
    boxes = []
    for mask_path in table["mask_path"]:
        ys, xs = np.nonzero(np.asarray(Image.open(root / mask_path)) > 127)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    table[["x_min", "y_min", "x_max", "y_max"]] = np.array(boxes)
    table["label"] = [WORDS[int(label)] for label in table["label"]]
    table["path"] = [str(root / path) for path in table["path"]]  # absolute paths
    manifest = folder / "boxes.csv"  # beside the images: paths must stay under its folder
    table.drop(columns=["mask_path"]).to_csv(manifest, index=False)
    return manifest


@pytest.mark.slow
def test_a_box_only_manifest_with_text_labels_audits_from_the_quick_form(
    biased_demo, tmp_path, capsys
):
    files, _, _ = biased_demo
    manifest = box_manifest(files, files.manifest.parent)
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(WORDS) + "\n")
    argv = ["run", "--model", str(files.model), "--data", str(manifest)]
    argv += ["--class-names", str(names), "--out", str(tmp_path / "runs"), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "the dataset has no masks, so the expected region is its boxes" in printed
    (run_dir,) = (p.parent for p in (tmp_path / "runs").glob("*/manifest.json"))
    manifest_json = json.loads((run_dir / "manifest.json").read_text())
    assert [r["source"] for r in manifest_json["regions"]] == ["box", "background"]
    assert manifest_json["class_names"] == WORDS
    report = json.loads((run_dir / "report.json").read_text())
    assert report["counts"]["ok"] == 240 and report["counts"]["skipped"] == 0
    # The boxes are measured: every class has its object mass with a CI.
    assert all(c["mass"]["object"]["mean"] is not None for c in report["classes"] if c["n"])


def test_class_names_are_a_comma_list_or_a_file(tmp_path):
    assert _class_names("cat, dog,bird") == ["cat", "dog", "bird"]
    names = tmp_path / "names.txt"
    names.write_text("cat\n\ndog\n")
    assert _class_names(str(names)) == ["cat", "dog"]
    with pytest.raises(ConfigError, match="without empty names"):
        _class_names("cat,,dog")


def test_masks_missing_everywhere_says_what_the_data_needs(biased_demo, tmp_path, capsys):
    files, _, _ = biased_demo
    table = pd.read_csv(files.manifest).head(20).drop(columns=["mask_path"])
    table["path"] = [str(files.manifest.parent / path) for path in table["path"]]
    manifest = tmp_path / "labels_only.csv"
    table.to_csv(manifest, index=False)
    argv = ["run", "--model", str(files.model), "--data", str(manifest)]
    assert main([*argv, "--out", str(tmp_path / "runs"), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "needs object masks" in error and "x_min, y_min, x_max, y_max" in error
    assert "no map metrics, flags or interventions" in error


def test_a_missing_model_or_manifest_exits_2_in_a_second_before_keras(tmp_path):
    import subprocess
    import sys
    import time

    (tmp_path / "d.csv").write_text("path,label\na.png,0\n")
    (tmp_path / "m.keras").write_text("")
    cases = {
        "model.path (--model): model file not found": ["--model", str(tmp_path / "no.keras")],
        "dataset.manifest (--data): manifest not found": ["--data", str(tmp_path / "no.csv")],
    }
    for message, flags in cases.items():
        argv = ["--model", str(tmp_path / "m.keras"), "--data", str(tmp_path / "d.csv"), *flags]
        code = (
            "import sys\nfrom audit.cli.main import main\n"
            f"code = main(['run', *{argv!r}])\n"
            "assert 'keras' not in sys.modules, 'Keras was imported'\nsys.exit(code)\n"
        )
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr
        assert time.perf_counter() - started < 5  # about 0.7 s here; Keras alone takes 5


def test_demo_help_answers_without_importing_keras():
    import subprocess
    import sys

    code = (
        "import sys\nfrom audit.cli.main import main\n"
        "try:\n    main(['demo', '--help'])\nexcept SystemExit as done:\n    code = done.code\n"
        "assert 'keras' not in sys.modules, 'Keras was imported'\nsys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--epochs EPOCHS  training epochs" in done.stdout


@pytest.mark.slow
def test_absolute_paths_outside_the_manifest_folder_and_a_root_flag(biased_demo, tmp_path):
    files, _, _ = biased_demo
    images = files.manifest.parent
    table = pd.read_csv(files.manifest).head(60)
    # A catalogue export kept apart from the images: absolute paths elsewhere.
    absolute = table.assign(
        path=[str(images / p) for p in table["path"]],
        mask_path=[str(images / p) for p in table["mask_path"]],
    )
    (tmp_path / "exports").mkdir()
    absolute.to_csv(tmp_path / "exports" / "absolute.csv", index=False)
    # Relative paths kept apart from the images: --root says where they start.
    table.to_csv(tmp_path / "exports" / "relative.csv", index=False)
    base = ["run", "--model", str(files.model), "--no-progress", "--limit", "60"]
    for name, extra in (("absolute", []), ("relative", ["--root", str(images)])):
        data = ["--data", str(tmp_path / "exports" / f"{name}.csv")]
        out = ["--out", str(tmp_path / name)]
        assert main([*base, *data, *out, *extra]) == 0
        (run_dir,) = (p.parent for p in (tmp_path / name).glob("*/manifest.json"))
        report = json.loads((run_dir / "report.json").read_text())
        assert report["counts"]["ok"] == 60, report["skipped_rows"][:2]
    # Confinement is an opt-in: with it, the absolute paths outside the folder are skipped.
    confined = tmp_path / "confined.yaml"
    confined.write_text(
        f"model: {{path: {files.model}}}\n"
        f"dataset: {{manifest: {tmp_path / 'exports' / 'absolute.csv'}, confine: true}}\n"
        f"output: {{store: {tmp_path / 'confined'}}}\n"
    )
    assert main(["run", str(confined), "--no-progress"]) == 2  # every row skipped
