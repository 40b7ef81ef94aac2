"""Optional MLflow logging, checked against a recording stand-in for the mlflow API."""

import sys
import types

import pytest
from conftest import ink_model

from audit.config import build_config
from audit.run import run_audit
from pipelines.demo import write_dataset
from pipelines.demo_data import make_demo_set


class RecordingMlflow(types.ModuleType):
    """The part of mlflow's fluent API the audit uses, recording every call."""

    def __init__(self):
        super().__init__("mlflow")
        self.calls = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return None  # active_run(): no run yet

        return record


def test_a_run_is_logged_to_mlflow_when_asked(tmp_path, monkeypatch):
    fake = RecordingMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    manifest = write_dataset(make_demo_set(24, seed=9), tmp_path / "data")
    ink_model().save(tmp_path / "ink.keras")
    config = build_config(
        {
            "model": {"path": str(tmp_path / "ink.keras"), "class_names": list("0123456789")},
            "dataset": {"manifest": str(manifest)},
            "output": {"store": str(tmp_path / "runs"), "mlflow": True},
            "policy": {"intervention_samples": 0},
        }
    )
    result = run_audit(config, progress=False)
    names = [name for name, _, _ in fake.calls]
    assert names[:2] == ["active_run", "start_run"] and names[-1] == "end_run"
    metrics = next(args[0] for name, args, _ in fake.calls if name == "log_metrics")
    assert metrics["bias_audit.accuracy"] == pytest.approx(result.images["correct"].mean())
    artifacts = [args[0] for name, args, _ in fake.calls if name == "log_artifact"]
    assert any(path.endswith("report.html") for path in artifacts)
    tags = next(args[0] for name, args, _ in fake.calls if name == "set_tags")
    assert tags["bias_audit.run_id"] == result.run_dir.name
    # Reused: a run logged once is not logged again; one made without MLflow is.
    fake.calls.clear()
    assert run_audit(config, resume=True, progress=False).reused and not fake.calls
    (result.run_dir / "mlflow.json").unlink()
    assert run_audit(config, resume=True, progress=False).reused
    assert [name for name, _, _ in fake.calls].count("log_metrics") == 1


def test_asking_for_mlflow_without_it_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    from audit.runs.mlflow_log import log_run

    with pytest.raises(ImportError, match="pip install mlflow"):
        log_run(tmp_path)


def test_mlflow_missing_fails_before_the_audit(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    from audit.cli.main import main as cli_main

    manifest = write_dataset(make_demo_set(8, seed=9), tmp_path / "data")
    ink_model().save(tmp_path / "ink.keras")
    arguments = ["run", "--model", str(tmp_path / "ink.keras"), "--data", str(manifest)]
    code = cli_main([*arguments, "--out", str(tmp_path / "runs"), "--mlflow"])
    assert code == 2 and "pip install mlflow" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing audited, no run folder
