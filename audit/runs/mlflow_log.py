"""Optional MLflow logging: a finished run's verdicts as metrics and its reports as artifacts.

Enabled by ``output.mlflow: true`` (or ``--mlflow``) when the ``mlflow`` package is
installed; it logs to the tracking URI MLflow is configured with (``MLFLOW_TRACKING_URI``),
inside the active MLflow run or a new one named after the audit run.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

from audit.runs.store import atomic_write

ARTIFACTS = ("report.json", "report.md", "report.html", "classes.parquet", "flags.parquet")
# Written into the run folder once the run is logged: a reused run is logged only once.
LOGGED = "mlflow.json"
MISSING = "output.mlflow is on but mlflow is not installed: pip install mlflow"


def require_mlflow() -> None:
    """Fail before the audit, not after it, when MLflow logging cannot happen."""
    if "mlflow" in sys.modules:  # imported already (None: an import known to fail)
        found = sys.modules["mlflow"] is not None
    else:
        found = importlib.util.find_spec("mlflow") is not None
    if not found:
        raise ImportError(MISSING)


def log_run(run_dir: Path, *, once: bool = False) -> bool:
    """Log one finished audit run to MLflow; returns whether it logged.

    ``once``: skip a run already logged (a reused run of a scheduled audit).
    """
    run_dir = Path(run_dir)
    if once and (run_dir / LOGGED).exists():
        return False
    try:
        mlflow = importlib.import_module("mlflow")
    except ImportError:
        raise ImportError(MISSING) from None
    report = json.loads((run_dir / "report.json").read_text())
    active = mlflow.active_run()
    started = active is None
    if started:
        mlflow.start_run(run_name=f"bias-audit {report['run_id']}")
    try:
        mlflow.set_tags(
            {"bias_audit.run_id": report["run_id"], "bias_audit.outcome": report["outcome"]}
        )
        mlflow.log_params(
            {
                "bias_audit.model": report["model"]["path"],
                "bias_audit.layer": report["model"]["layer"],
                "bias_audit.method": report["model"]["method"],
            }
        )
        metrics = {
            f"bias_audit.{status.replace('-', '_')}": count
            for status, count in report["status_counts"].items()
        }
        if report.get("accuracy") is not None:
            metrics["bias_audit.accuracy"] = report["accuracy"]
        spurious = [r["name"] for r in report["regions"] if r["role"] == "spurious"]
        for entry in report["classes"]:
            for region in spurious:
                mean = entry["mass"][region]["mean"]
                if mean is not None:
                    metrics[f"bias_audit.mass_{region}.{entry['class_index']}"] = mean
        mlflow.log_metrics(metrics)
        logged = getattr(getattr(mlflow.active_run(), "info", None), "run_id", None)
        for name in ARTIFACTS:
            if (run_dir / name).exists():
                mlflow.log_artifact(str(run_dir / name), artifact_path="bias-audit")
    finally:
        if started:
            mlflow.end_run()
    text = json.dumps({"mlflow_run_id": logged})
    atomic_write(run_dir / LOGGED, lambda tmp: Path(tmp).write_text(text))
    return True
