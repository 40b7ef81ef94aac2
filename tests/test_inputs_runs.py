"""Runs from the command line on awkward inputs: baselines, class folders with masks."""

import json
import shutil

import pandas as pd
import pytest
from conftest import ink_model

from audit.cli.main import main
from audit.runs.store import baseline_mismatch, latest_run
from pipelines.demo import write_dataset
from pipelines.demo_data import make_demo_set

REGIONS = [
    {"name": "object", "source": "mask", "role": "expected"},
    {"name": "background", "source": "background", "role": "spurious"},
]


def _manifest(run_dir, started, status="complete", fingerprint="f1", regions=REGIONS, names="ab"):
    run_dir.mkdir(parents=True)
    payload = {
        "run_id": run_dir.name,
        "status": status,
        "started": started,
        "dataset": {"fingerprint": fingerprint},
        "regions": regions,
        "class_names": list(names),
    }
    (run_dir / "manifest.json").write_text(json.dumps(payload))


def test_latest_run_keeps_runs_of_the_same_dataset_regions_and_classes(tmp_path):
    _manifest(tmp_path / "match_old", "2026-01-01")
    _manifest(tmp_path / "match", "2026-01-02")
    _manifest(tmp_path / "running", "2026-01-03", status="running")
    _manifest(tmp_path / "other_data", "2026-01-04", fingerprint="f2")
    _manifest(tmp_path / "other_regions", "2026-01-05", regions=REGIONS[:1])
    _manifest(tmp_path / "other_classes", "2026-01-06", names="ba")
    wanted = {"fingerprint": "f1", "regions": REGIONS, "class_names": ["a", "b"]}
    assert latest_run(tmp_path, complete=True, **wanted) == tmp_path / "match"
    assert latest_run(tmp_path, complete=True) == tmp_path / "other_classes"  # no filter
    assert latest_run(tmp_path, complete=True, **(wanted | {"fingerprint": "f3"})) is None
    reasons = {
        run: baseline_mismatch(json.loads((tmp_path / run / "manifest.json").read_text()), **wanted)
        for run in ("match", "other_data", "other_regions", "other_classes")
    }
    assert reasons == {
        "match": None,
        "other_data": "dataset",
        "other_regions": "regions",
        "other_classes": "class names",
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A manifest of 24 demo images with masks, the same images as class folders with a
    parallel masks tree, the ink model, and a cheap config (no trust checks or
    interventions)."""
    root = tmp_path_factory.mktemp("inputs")
    manifest = write_dataset(make_demo_set(24, seed=5), root / "flat")
    for row in pd.read_csv(manifest, dtype=str).itertuples():
        for kind, column in (("images", row.path), ("masks", row.mask_path)):
            target = root / "tree" / kind / row.label / column.split("/")[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(manifest.parent / column, target)
    model = root / "ink.keras"
    ink_model().save(model)
    config = root / "audit.yaml"
    config.write_text(
        f"model: {{path: {model}}}\n"
        f"dataset: {{manifest: {manifest}}}\n"
        "policy: {intervention_samples: 0, bootstrap_resamples: 100}\n"
        "trust: {samples: 0, guided_examples: false}\n"
        "batch_size: 8\n"
    )
    return root, config


def _run(config, store, *flags):
    return main(["run", str(config), "--out", str(store), "--no-progress", *flags])


def test_class_folders_with_masks_and_a_matching_latest_baseline(data, tmp_path, capsys):
    root, config = data
    store = tmp_path / "runs"
    assert _run(config, store, "--run-id", "first") == 0
    # --data switches the file's manifest to class folders; --masks gives their masks.
    tree = ["--data", str(root / "tree" / "images"), "--masks", str(root / "tree" / "masks")]
    assert _run(config, store, *tree, "--run-id", "folders") == 0
    folders = pd.read_parquet(store / "folders" / "images.parquet")
    assert len(folders) == 24 and (folders["status"] == "ok").all()
    assert folders["mass_object"].median() > 0.9  # the ink model looks at the masked digit
    manifest = json.loads((store / "folders" / "manifest.json").read_text())
    assert manifest["dataset"]["source"] == "folders:images"
    capsys.readouterr()
    # The newest complete run audited other data: latest takes the matching one.
    assert _run(config, store, "--baseline", "latest", "--run-id", "again") == 0
    out = capsys.readouterr().out
    assert f"baseline: {store / 'first'} (the newest complete run" in out
    assert json.loads((store / "again" / "manifest.json").read_text())["baseline"] == str(
        store / "first"
    )
    # A run flagged against a baseline is never reused for one without: resuming the
    # same config returns the plain run, not the newer baseline-relative one.
    from audit.config import load_config
    from audit.run import run_audit

    plain = load_config(config, {"output": {"store": str(store)}})
    resumed = run_audit(plain, resume=True, progress=False)
    assert resumed.reused and resumed.run_dir == store / "first"
    # Other data (the first 10 rows only) and no matching run: a clear refusal, no run.
    assert _run(config, store, "--limit", "10", "--baseline", "latest", "--run-id", "x") == 2
    err = capsys.readouterr().err
    assert "--baseline latest: no complete run in" in err and "audited this dataset" in err
    assert "the complete runs there differ: 3 in dataset" in err  # first, folders, again
    assert not (store / "x").exists()


def test_a_run_id_that_is_a_path_is_refused_before_anything_is_written(data, tmp_path, capsys):
    _, config = data
    store = tmp_path / "store" / "runs"
    assert _run(config, store, "--run-id", "../escape") == 2
    assert "output.run_id (--run-id): '../escape' is not a plain folder name" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "store").exists()


def test_bad_cells_and_files_are_skipped_rows_and_the_audit_goes_on(data, tmp_path, capsys):
    import numpy as np
    from PIL import Image
    from test_data import _bomb_png

    root, config = data
    flat = root / "flat"
    table = pd.read_csv(flat / "manifest.csv", dtype=str).head(8)
    _bomb_png(flat / "images" / "bomb.png")
    grey = np.asarray(Image.open(flat / table.path[0]).convert("L")).astype("uint16") * 257
    Image.fromarray(grey).save(flat / "images" / "grey16.png")
    extra = [
        {"path": "images/bomb.png", "label": "1", "mask_path": table.mask_path[0]},
        {"path": None, "label": "1", "mask_path": table.mask_path[0]},
        {"path": table.path[1], "label": "1", "mask_path": None},
        {"path": "images/grey16.png", "label": table.label[0], "mask_path": table.mask_path[0]},
    ]
    bad = pd.concat([table, pd.DataFrame(extra)], ignore_index=True)
    bad.to_csv(flat / "bad.csv", index=False)
    store = tmp_path / "runs"
    assert _run(config, store, "--data", str(flat / "bad.csv"), "--run-id", "bad") == 0
    images = pd.read_parquet(store / "bad" / "images.parquet").set_index("row")
    assert images.loc[8, "skip_reason"].startswith("image too large: ")
    assert images.loc[9, "skip_reason"].startswith("the manifest row has no path")
    assert "needs an object mask and the row has none" in images.loc[10, "skip_reason"]
    # The 16-bit copy is audited as its 8-bit original, not as a white square.
    assert images.loc[11, "status"] == "ok"
    assert images.loc[11, "pred"] == images.loc[0, "pred"]
    assert images.loc[11, "mass_object"] == pytest.approx(images.loc[0, "mass_object"], abs=0.02)
    # The skipped rows are named, with their paths and reasons, in the CLI's summary and
    # in the reports, and counted by kind.
    printed = capsys.readouterr().out
    assert "    row 8: images/bomb.png: image too large: " in printed
    assert "    row 9: (no path): the manifest row has no path" in printed
    report = json.loads((store / "bad" / "report.json").read_text())
    assert [r["row"] for r in report["skipped_rows"]] == [8, 9, 10]
    assert report["skipped_rows"][2]["path"] == table.path[1]
    markdown = (store / "bad" / "report.md").read_text()
    assert "### Skipped rows" in markdown and "| 10 | " in markdown
    assert "- 1 x the manifest row has no path" in markdown
    page = (store / "bad" / "report.html").read_text()
    assert "<h2>Skipped rows (3)</h2>" in page and "images/bomb.png</td>" in page


def test_preprocess_size_with_a_flexible_model_and_against_a_fixed_one(data, tmp_path, capsys):
    import keras

    root, config = data
    flexible = keras.Sequential(
        [
            keras.Input((None, None, 3)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )
    flexible.save(tmp_path / "flexible.keras")
    store = tmp_path / "runs"
    model = ["--model", str(tmp_path / "flexible.keras")]
    assert _run(config, store, *model, "--size", "40", "24", "--run-id", "flex") == 0
    images = pd.read_parquet(store / "flex" / "images.parquet")
    assert (images["status"] == "ok").all()
    # A fixed-size model (the ink model is 48x48) and another size: exit 2, no run.
    assert _run(config, store, "--size", "32", "32", "--run-id", "bad") == 2
    assert "preprocess.size [32, 32] differs from the model's input size [48, 48]" in (
        capsys.readouterr().err
    )
    assert not (store / "bad").exists()


def test_setup_errors_exit_2_before_a_run_folder_is_made(data, tmp_path, capsys):
    """A slice column named like a result column, a manifest without rows, a store path
    that is a file, a config that is a folder or not UTF-8: exit 2, a clear message."""
    root, config = data
    flat = root / "flat"
    table = pd.read_csv(flat / "manifest.csv", dtype=str).head(4)
    table.assign(mass_object="x").to_csv(flat / "clash.csv", index=False)
    table.head(0).to_csv(flat / "empty.csv", index=False)
    store = tmp_path / "runs"
    assert _run(config, store, "--data", str(flat / "clash.csv")) == 2
    assert "column(s) mass_object, which are names of result columns" in capsys.readouterr().err
    assert _run(config, store, "--data", str(flat / "empty.csv")) == 2
    assert "(manifest:empty.csv) has no rows" in capsys.readouterr().err
    assert not store.exists()
    (tmp_path / "file").write_text("")
    assert _run(config, tmp_path / "file" / "runs") == 2
    assert f"must be a folder, but {tmp_path / 'file'} is a file" in capsys.readouterr().err
    assert main(["run", str(tmp_path), "--no-progress"]) == 2
    assert "is a folder; give the config's YAML file" in capsys.readouterr().err
    (tmp_path / "latin1.yaml").write_bytes(b"# caf\xe9\nmodel: {path: m.keras}\n")
    assert main(["run", str(tmp_path / "latin1.yaml"), "--no-progress"]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err
