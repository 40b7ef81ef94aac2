"""Scheduled audits of model versions and the run history index."""

import json
import os
import shutil

import keras
import numpy as np
import pytest
import yaml
from conftest import ink_model

from audit.cli.main import main as cli_main
from audit.config import ConfigError, build_config, load_config
from audit.run import run_audit
from audit.runs.decisions import Decision, model_line, record_decision
from audit.runs.history import history
from audit.runs.schedule import model_versions, run_schedule
from audit.runs.store import file_sha256
from pipelines.demo import write_dataset
from pipelines.demo_data import make_demo_set


def save_version(folder, name, scale):
    model = ink_model()
    dense = model.get_layer("classes")
    weights, bias = dense.get_weights()
    dense.set_weights([weights * scale, bias])
    folder.mkdir(exist_ok=True)
    model.save(folder / name)


def write_config(tmp_path, manifest, models, **schedule):
    """The config file, with paths relative to its folder (as a user writes them)."""
    path = tmp_path / "nightly.yaml"
    config = {
        "model": {"class_names": [str(d) for d in range(10)]},
        "dataset": {"manifest": os.path.relpath(manifest, tmp_path)},
        "output": {"store": "runs"},
        "batch_size": 16,
        "policy": {"intervention_samples": 20},
        "schedule": {"models": os.path.relpath(models, tmp_path), **schedule},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_versions_are_audited_once_in_version_order(tmp_path, monkeypatch):
    manifest = write_dataset(make_demo_set(40, seed=4), tmp_path / "data")
    models = tmp_path / "models"
    for name, scale in (("ink_v10.keras", 3.0), ("ink_v2.keras", 2.0), ("ink_v1.keras", 1.0)):
        save_version(models, name, scale)
    (models / "notes.txt").write_text("not a model")
    config = load_config(write_config(tmp_path, manifest, models))
    assert [p.name for p in model_versions(config)] == [
        "ink_v1.keras",
        "ink_v2.keras",
        "ink_v10.keras",
    ]
    first = run_schedule(config)
    assert [r.reused for r in first] == [False, False, False]
    assert len({r.run_dir for r in first}) == 3
    again = run_schedule(config)
    assert [r.reused for r in again] == [True, True, True]  # idempotent: nothing recomputed
    assert [r.run_dir for r in again] == [r.run_dir for r in first]
    save_version(models, "ink_v11.keras", 4.0)
    third = run_schedule(config)
    assert [r.reused for r in third] == [True, True, True, False]
    # Each version is judged on its own terms (compared with its predecessor's run by
    # compare_runs, not flagged against it).
    manifest_v2 = json.loads((first[1].run_dir / "manifest.json").read_text())
    assert manifest_v2["baseline"] is None
    # The config's path spelled another way (relative, from another folder): reused.
    monkeypatch.chdir(tmp_path / "models")
    relative = run_schedule(load_config("../nightly.yaml"))
    assert [r.run_dir.resolve() for r in relative] == [r.run_dir.resolve() for r in third]
    assert all(r.reused for r in relative)
    runs = history(tmp_path / "runs")
    assert len(runs) == 4 and set(runs["model_line"]) == {"ink"}
    assert np.isfinite(runs["accuracy"]).all()


def test_the_schedule_gates_on_new_failures_and_history_shows_decisions(
    biased_demo, tmp_path, capsys
):
    files, _, _ = biased_demo
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(files.model, models / "demo_v1.keras")
    # The same bias, kept, in another file (a copy of the same file is the same audit).
    keras.saving.load_model(files.model).save(models / "demo_v2.keras")
    assert file_sha256(models / "demo_v2.keras") != file_sha256(files.model)
    config = write_config(tmp_path, files.manifest, models, fail_on="fail")
    assert cli_main(["schedule", "run", str(config)]) == 1  # the newest version FAILs
    out = capsys.readouterr().out
    assert "demo_v1.keras: FAIL (audited" in out and "demo_v2.keras: FAIL (audited" in out
    # A bias both versions have is kept, not resolved (it would be, were v2 flagged
    # against v1 as its baseline).
    kept = next(line for line in out.splitlines() if line.startswith("kept flags:"))
    assert "resolved flags: none" in out and "class 7: bias-driven" in kept
    # A retried task gives the same answer: the gate reads the store.
    assert cli_main(["schedule", "run", str(config)]) == 1
    assert "demo_v2.keras: FAIL (reused" in capsys.readouterr().out
    assert cli_main(["schedule", "run", str(config), "--fail-on", "never"]) == 0
    capsys.readouterr()
    store = tmp_path / "runs"
    run_dir = sorted(p for p in store.iterdir() if p.is_dir())[0]
    record_decision(store, Decision("demo", "7", "relabel", "Ada", "", run_dir.name))
    assert cli_main(["history", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "class 7 (bias-driven) -> relabel by Ada" in out
    assert cli_main(["history", "--store", str(tmp_path / "absent")]) == 2
    assert cli_main(["schedule", "frobnicate"]) == 2
    (models / "demo_v3.keras").write_text("not a model")  # a corrupt version
    assert cli_main(["schedule", "run", str(config)]) == 2
    assert "version demo_v3.keras: " in capsys.readouterr().err


def test_a_version_with_no_audited_image_exits_2(tmp_path, capsys):
    manifest = write_dataset(make_demo_set(6, seed=4), tmp_path / "data")
    for image in (tmp_path / "data" / "images").iterdir():
        image.unlink()  # every row is skipped: image file not found
    models = tmp_path / "models"
    for name, scale in (("ink_v1.keras", 1.0), ("ink_v2.keras", 2.0)):
        save_version(models, name, scale)
    config = write_config(tmp_path, manifest, models)
    assert cli_main(["schedule", "run", str(config)]) == 2
    out, err = capsys.readouterr()
    assert out.count("NO IMAGES AUDITED") == 2 and "no image could be audited" in err
    assert cli_main(["schedule", "run", str(config)]) == 2  # reused, the same answer
    results = run_schedule(load_config(config))
    assert results[0].run_dir != results[1].run_dir and all(r.reused for r in results)


# ------------------------------------------------------------ version order and model lines


def test_versions_sort_on_the_name_without_its_suffix(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    names = ["ink_v10.keras", "ink_v2-hotfix.keras", "ink_V2.1.keras", "ink_v2.keras"]
    for name in names:
        (models / name).write_text("a version")  # model_versions only lists the files
    schedule = {"models": str(models), "pattern": "ink_*.keras"}
    config = build_config({"model": {}, "dataset": {"manifest": "d.csv"}, "schedule": schedule})
    assert [p.name for p in model_versions(config)] == [
        "ink_v2.keras",
        "ink_v2-hotfix.keras",
        "ink_V2.1.keras",  # the case of the v does not matter
        "ink_v10.keras",
    ]
    schedule["pattern"] = "*.h5"
    config = build_config({"model": {}, "dataset": {"manifest": "d.csv"}, "schedule": schedule})
    with pytest.raises(ConfigError, match=f"no model in {models} matches schedule.pattern"):
        model_versions(config)


@pytest.mark.parametrize(
    ("path", "line"),
    [
        ("/m/cls_v3.keras", "cls"),
        ("/m/ink_v2.1.keras", "ink"),
        ("/m/model-20261101.keras", "model"),
        ("/m/model-2026-11-01.keras", "model"),
        ("/m/classifier_v10.keras", "classifier"),
        ("/m/demo_model.keras", "demo_model"),
        ("/m/vgg16.keras", "vgg16"),
        ("/m/vgg19.keras", "vgg19"),
        ("/m/resnet50_v3.keras", "resnet50"),
        ("/m/resnet101_v1.keras", "resnet101"),
        ("/m/efficientnet_b0_v2.keras", "efficientnet_b0"),
        ("/m/yolov8.keras", "yolov8"),
    ],
)
def test_a_model_line_strips_only_a_version_after_a_separator(path, line):
    assert model_line(path) == line


# ------------------------------------------------------------ reuse across kills and moves


def small_schedule(tmp_path, versions):
    """Versions of the ink model and a config over a small audit set (trust checks off)."""
    manifest = write_dataset(make_demo_set(12, seed=4), tmp_path / "data")
    models = tmp_path / "models"
    for name, scale in versions:
        save_version(models, name, scale)
    path = write_config(tmp_path, manifest, models, pattern="ink_v*.keras")
    return path, load_config(path, {"trust": {"samples": 0}})


def test_a_complete_run_is_reused_when_a_newer_run_of_it_was_killed(tmp_path, monkeypatch):
    _, config = small_schedule(tmp_path, [("ink_v1.keras", 1.0)])
    (finished,) = run_schedule(config)
    # `bias-audit run ... --model ink_v1.keras` with the same settings, killed while
    # writing its reports: a newer run of the same run key, still "running".
    versioned = config.model_copy(
        update={"model": config.model.model_copy(update={"path": finished.model})}
    )

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("audit.run.write_reports", killed)
        with pytest.raises(KeyboardInterrupt):
            run_audit(versioned, progress=False)
    store = tmp_path / "runs"
    (killed_run,) = [p for p in store.iterdir() if p.is_dir() and p != finished.run_dir]
    killed_manifest = json.loads((killed_run / "manifest.json").read_text())
    finished_manifest = json.loads((finished.run_dir / "manifest.json").read_text())
    assert killed_manifest["status"] == "running"
    assert killed_manifest["run_key"] == finished_manifest["run_key"]
    assert killed_manifest["started"] > finished_manifest["started"]
    (again,) = run_schedule(config)
    assert again.reused and again.run_dir == finished.run_dir  # not recomputed
    resumed = run_audit(versioned, resume=True, progress=False)  # `bias-audit run --resume`
    assert resumed.reused and resumed.run_dir == finished.run_dir
    assert json.loads((killed_run / "manifest.json").read_text())["status"] == "running"
    # With no complete run of the key left, the unfinished one is continued.
    shutil.rmtree(finished.run_dir)
    (continued,) = run_schedule(config)
    assert not continued.reused and continued.run_dir == killed_run
    assert json.loads((killed_run / "manifest.json").read_text())["status"] == "complete"


def test_a_moved_audit_folder_or_renamed_model_reuses_its_runs(tmp_path):
    folder = tmp_path / "audits"
    folder.mkdir()
    path, config = small_schedule(folder, [("ink_v1.keras", 1.0), ("ink_v2.keras", 2.0)])
    first = run_schedule(config)
    assert not any(r.reused for r in first)
    moved = tmp_path / "moved"
    folder.rename(moved)  # data, models, config and store together
    (moved / "models" / "ink_v1.keras").rename(moved / "models" / "ink_v01.keras")
    again = run_schedule(load_config(moved / path.name, {"trust": {"samples": 0}}))
    assert [r.model.name for r in again] == ["ink_v01.keras", "ink_v2.keras"]
    assert all(r.reused for r in again)
    assert [r.run_dir.name for r in again] == [r.run_dir.name for r in first]
    # Other settings are another audit.
    changed = load_config(moved / path.name, {"trust": {"samples": 0}, "batch_size": 8})
    assert not any(r.reused for r in run_schedule(changed))
