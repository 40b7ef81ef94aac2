"""Nothing crashes, hangs or is left half-done: planted faults and hostile inputs, each
with its outcome (exit code, run status, message, nothing lost).

The store's own faults (torn decisions, corrupt manifests, planted run ids) are in
test_reliability_store.py, hostile images and manifests in test_reliability_inputs.py.
"""

import errno
import json
from pathlib import Path

import keras
import pandas as pd
import pytest
from conftest import ink_model
from test_dashboard import app

from audit.cli import main as cli
from audit.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE
from audit.report.markdown import render_markdown
from audit.runs.store import RunStore, run_state
from pipelines.demo import write_dataset
from pipelines.demo_data import make_demo_set


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 48 px model that looks at the digits' strokes and 40 demo images."""
    root = tmp_path_factory.mktemp("reliability")
    manifest = write_dataset(make_demo_set(40, seed=3), root / "data")
    ink_model().save(root / "ink.keras")
    return root / "ink.keras", manifest


def run(model, manifest, store, *extra) -> int:
    # Batches of 4: 40 images make three chunks (16 rows each), so a fault can strike
    # between chunks.
    argv = ["run", "--model", str(model), "--data", str(manifest), "--out", str(store)]
    return cli.main([*argv, "--batch-size", "4", "--no-progress", "--fail-on", "warn", *extra])


def only_run(store: Path) -> RunStore:
    [folder] = [p for p in Path(store).iterdir() if (p / "manifest.json").exists()]
    return RunStore(folder)


@pytest.fixture(scope="module")
def clean_rows(inputs, tmp_path_factory):
    """The rows of an audit that nothing interrupted: what a resumed run must equal."""
    store = tmp_path_factory.mktemp("clean")
    assert run(*inputs, store) in (0, 1)
    return only_run(store).images()


def assert_same_rows(ours: pd.DataFrame, clean: pd.DataFrame) -> None:
    assert len(ours) == len(clean) == 40
    pd.testing.assert_frame_equal(ours, clean, check_exact=False, rtol=1e-5, atol=1e-6)


def test_an_internal_error_exits_3_marks_the_run_failed_and_resume_finishes_it(
    inputs, clean_rows, tmp_path, monkeypatch, capsys
):
    import audit.run

    def planted(*args, **kwargs):
        raise RuntimeError("planted fault in the analysis")

    monkeypatch.setattr(audit.run, "analyse", planted)
    assert run(*inputs, tmp_path) == EXIT_ERROR  # not 1, the policy's code
    error = capsys.readouterr().err
    assert "internal error: RuntimeError: planted fault in the analysis" in error
    assert "not a verdict on the model" in error and "Traceback" in error
    stopped = only_run(tmp_path)
    manifest = stopped.manifest()
    assert manifest["status"] == run_state(stopped.root) == "failed"
    assert manifest["failure"]["error"] == "RuntimeError"
    assert manifest["failure"]["message"] == "planted fault in the analysis"
    assert f"The run {stopped.root} is marked failed" in error
    # The history and the dashboard say it failed, and why.
    assert cli.main(["history", "--store", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert " failed " in listing
    assert "    stopped on an error: RuntimeError: planted fault in the analysis" in listing
    page = app(tmp_path, monkeypatch)
    [row] = page.dataframe[0].value.to_dict("records")
    assert row["status"] == "failed"
    assert row["failure"] == "RuntimeError: planted fault in the analysis"
    page.switch_page("views/classes.py").run()
    assert "stopped on an error and has no report: RuntimeError: planted fault" in (
        page.warning[0].value.replace("\\", "").replace("\u2060", "")
    )
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="continuing run .* which failed on .*planted fault"):
        assert run(*inputs, tmp_path, "--resume") in (0, 1)
    manifest = stopped.manifest()
    assert manifest["status"] == "complete" and "failure" not in manifest
    assert_same_rows(stopped.images(), clean_rows)


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (errno.ENOSPC, "the disk is full: free some space"),
        (errno.EROFS, "the file system is read-only"),
    ],
)
def test_a_full_or_read_only_disk_mid_run_says_how_to_continue_and_loses_nothing(
    inputs, clean_rows, tmp_path, monkeypatch, capsys, code, says
):
    written = RunStore.write_chunk

    def full_after_one(self, chunk, *args):
        if chunk >= 1:
            raise OSError(code, "planted", str(self.part_path(chunk)))
        written(self, chunk, *args)

    monkeypatch.setattr(RunStore, "write_chunk", full_after_one)
    assert run(*inputs, tmp_path) == EXIT_ERROR
    error = capsys.readouterr().err
    stopped = only_run(tmp_path)
    assert f"stopped writing {stopped.part_path(1)}: {says}" in error
    assert "--resume" in error and "Traceback" not in error  # the machine's, not a bug
    assert stopped.manifest()["status"] == "failed"
    assert stopped.done_chunks() == {0}  # the chunk written before the fault is kept
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="continuing run .* which failed"):
        assert run(*inputs, tmp_path, "--resume") in (0, 1)
    assert stopped.manifest()["status"] == "complete"
    assert_same_rows(stopped.images(), clean_rows)


def test_a_store_that_cannot_be_written_is_a_usage_error(inputs, tmp_path, monkeypatch, capsys):
    import audit.checks

    # Root ignores permission bits, so the check (os.access, as on a read-only mount)
    # is told so.
    monkeypatch.setattr(audit.checks.os, "access", lambda path, mode: False)
    assert run(*inputs, tmp_path / "runs") == EXIT_USAGE
    assert "cannot be written" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_exits_130_and_leaves_the_run_resumable(inputs, tmp_path, monkeypatch, capsys):
    import audit.run

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(audit.run, "analyse", interrupt)
    assert run(*inputs, tmp_path) == EXIT_INTERRUPTED
    assert "--resume" in capsys.readouterr().err
    assert run_state(only_run(tmp_path).root) == "interrupted"  # no process holds it


def test_every_command_exits_3_on_an_internal_error(monkeypatch, tmp_path, capsys):
    import audit.runs.history

    def planted(*args, **kwargs):
        raise ValueError("planted")

    monkeypatch.setattr(audit.runs.history, "history", planted)
    assert cli.main(["history", "--store", str(tmp_path)]) == EXIT_ERROR
    assert "bias-audit history: internal error: ValueError: planted" in capsys.readouterr().err


def test_a_resumed_run_leaves_no_temporary_files(inputs, clean_rows, tmp_path, monkeypatch):
    import audit.run

    def planted(*args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setattr(audit.run, "analyse", planted)
    assert run(*inputs, tmp_path) == EXIT_ERROR
    stopped = only_run(tmp_path)
    # What writes killed mid-file leave (atomic_write's temporary names).
    planted_files = [
        stopped.root / "parts" / ".part-000001.parquet.k1ll3d.tmp",
        stopped.root / "cams" / ".part-000002.npz.k1ll3d.tmp",
        stopped.root / ".images.parquet.k1ll3d.tmp",
        stopped.root / ".report.json.k1ll3d.tmp",
    ]
    for path in planted_files:
        path.write_bytes(b"torn")
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="continuing run .* which failed"):
        assert run(*inputs, tmp_path, "--resume") in (0, 1)
    assert not [path for path in planted_files if path.exists()]
    assert not list(stopped.root.rglob("*.tmp"))
    assert_same_rows(stopped.images(), clean_rows)


def lambda_model(path: Path) -> Path:
    """A 64 px model with a Lambda layer (stored as code: safe mode refuses it)."""
    inputs = keras.Input((64, 64, 3))
    x = keras.layers.Lambda(lambda t: t * 1.0, name="scale")(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x)).save(path)
    return path


def test_unsafe_model_holds_for_the_guided_clone_and_on_resume(inputs, tmp_path, capsys):
    model = lambda_model(tmp_path / "lambda.keras")
    _, manifest = inputs
    assert run(model, manifest, tmp_path / "runs") == EXIT_USAGE
    assert "refused in safe mode" in capsys.readouterr().err
    assert run(model, manifest, tmp_path / "runs", "--unsafe-model") in (0, 1)
    done = only_run(tmp_path / "runs")
    report = json.loads((done.root / "report.json").read_text())
    assert report["guided_note"] is None  # 64 px: the pictures are drawn
    examples = {e["row"] for entry in report["classes"] for e in entry["examples"]}
    assert examples and examples == {int(p.stem) for p in (done.root / "guided").glob("*.png")}
    assert run(model, manifest, tmp_path / "runs", "--unsafe-model", "--resume") in (0, 1)


def test_a_named_function_lambda_is_not_called_a_safe_mode_refusal(inputs, tmp_path, capsys):
    def scale(tensor):
        return tensor * 1.0

    entry = keras.Input((48, 48, 3))
    x = keras.layers.Lambda(scale)(keras.layers.Conv2D(4, 3, activation="relu")(entry))
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(entry, keras.layers.Dense(10)(x)).save(tmp_path / "named.keras")
    _, manifest = inputs
    assert run(tmp_path / "named.keras", manifest, tmp_path, "--unsafe-model") == EXIT_USAGE
    error = capsys.readouterr().err
    assert "calls the Python function 'scale'" in error and "stores only its name" in error
    assert "refused in safe mode" not in error


def test_a_savedmodel_folder_names_the_fix(inputs, tmp_path, capsys):
    model = ink_model()
    model.export(tmp_path / "saved", verbose=False)
    _, manifest = inputs
    assert run(tmp_path / "saved", manifest, tmp_path / "runs", "--size", "48", "48") == 2
    error = capsys.readouterr().err
    assert "wraps a TensorFlow SavedModel" in error and "model.save('model.keras')" in error
    assert "explain() first" not in error


def test_a_dense_layer_as_target_says_it_has_no_map(inputs, tmp_path, capsys):
    _, manifest = inputs
    model = tmp_path / "ink.keras"
    ink_model().save(model)
    assert run(model, manifest, tmp_path, "--layer", "classes") == EXIT_USAGE
    error = capsys.readouterr().err
    assert "layer 'classes' outputs a 2-D tensor" in error and "ink" in error
    assert "skip connection" not in error


def test_line_breaks_in_names_keep_the_report_tables_whole(inputs, tmp_path):
    model, manifest = inputs
    table = pd.read_csv(manifest)
    table["background_type"] = table["background_type"] + "\nsecond line"
    table.to_csv(tmp_path / "broken.csv", index=False)
    root = str(Path(manifest).parent)
    assert run(model, tmp_path / "broken.csv", tmp_path / "runs", "--root", root) in (0, 1)
    report = json.loads((only_run(tmp_path / "runs").root / "report.json").read_text())
    values = {g["value"] for g in report["slices"]["groups"] if g["kind"] == "slice"}
    assert values and all("\nsecond line" in value for value in values)
    for entry in report["classes"]:
        entry["class_name"] = f"digit\n{entry['class_index']}\r\nline"
    # A slice value drives a class (as docs/flags.md's associations report it).
    value = sorted(values)[0]
    report["slices"]["drives"] = [
        {"attribute": "background_type", "value": value, "class_name": "digit\n3", "rd": 0.2}
        | dict.fromkeys(("rate_slice", "rate_rest", "accuracy_slice", "accuracy_rest"), 0.5)
        | {"rd_low": 0.1, "rd_high": 0.3, "q_value": 0.01}
    ]
    markdown = render_markdown(report)
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    assert rows and all(line.endswith("|") for line in rows)
    assert "| digit 3 line |" in markdown
    shown = value.replace("\n", " ")
    assert any(
        line.startswith(f"- background\\_type={shown} drives") for line in markdown.splitlines()
    )
