"""Scheduled audits: audit every model version not yet audited, compare, gate.

``bias-audit schedule run CONFIG`` (or ``python -m pipelines.scheduled CONFIG``) takes
the versions named by the config's ``schedule:`` section, in version order. Each is
audited against the configured dataset with the previous version's run as the
baseline, unless a complete run with the same run key (model hash, dataset
fingerprint, config hash) is already in the store: then it is reused, never
recomputed. Each version is compared with the one before, the reports are written,
every run is in the store's history index, and the command exits with 1 when a
newly audited version reaches ``schedule.fail_on`` (with 2 when none of a newly
audited version's images could be audited: a data problem, not a verdict).

Cron, nightly at 02:00:

    0 2 * * *  cd /srv/audits && bias-audit schedule run configs/nightly.yaml >> audit.log 2>&1

An orchestrator task (Airflow, Prefect, Dagster, ...) runs the same command; the exit
code is the gate, ``STORE/history.sqlite`` and the reports are the artefacts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from audit.compare import compare_runs, format_comparison
from audit.config import AuditConfig, ConfigError, load_config
from audit.pipeline import run_audit

SEVERITY = {"PASS": 0, "WARN": 1, "FAIL": 2}
EMPTY = "NO IMAGES AUDITED"  # the outcome of a run whose every row was skipped


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def model_versions(config: AuditConfig) -> list[Path]:
    """The versions a schedule covers, oldest first."""
    schedule = config.schedule
    if schedule is None:
        raise ConfigError("the config has no schedule: section (schedule.models)")
    if isinstance(schedule.models, list):
        versions = list(schedule.models)
    else:
        if not schedule.models.is_dir():
            raise ConfigError(f"schedule.models: folder not found: {schedule.models}")
        versions = sorted(schedule.models.glob(schedule.pattern), key=_natural_key)
    missing = [v for v in versions if not v.exists()]
    if missing:
        raise ConfigError(
            f"schedule.models: model file(s) not found: {', '.join(map(str, missing))}"
        )
    if not versions:
        raise ConfigError(f"schedule.models: no model matches {schedule.pattern!r}")
    return versions


@dataclass(frozen=True)
class VersionResult:
    model: Path
    run_dir: Path
    outcome: str
    reused: bool


def run_schedule(config: AuditConfig, *, progress: bool = False) -> list[VersionResult]:
    """Audit each version (reusing finished runs); returns them oldest first."""
    results: list[VersionResult] = []
    for version in model_versions(config):
        versioned = config.model_copy(
            update={"model": config.model.model_copy(update={"path": version})}
        )
        # The previous version with audited images (an empty run has nothing to compare).
        baseline = next((r.run_dir for r in reversed(results) if r.outcome != EMPTY), None)
        # resume=True returns a complete run with the same run key as it is.
        # run_audit indexes the runs it makes; history() catches up on older ones.
        result = run_audit(versioned, resume=True, progress=progress, baseline=baseline)
        outcome = json.loads((result.run_dir / "report.json").read_text())["outcome"]
        results.append(VersionResult(version, result.run_dir, outcome, result.reused))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bias-audit schedule run",
        description="Audit every model version not yet audited; exit 1 when the policy fails, "
        "2 when a version had no image that could be audited.",
    )
    parser.add_argument("config", help="YAML audit config with a schedule: section")
    parser.add_argument("--fail-on", choices=["warn", "fail", "never"], help="override")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        results = run_schedule(config, progress=args.progress)
    except (ConfigError, FileNotFoundError) as error:
        print(f"bias-audit schedule: {error}", file=sys.stderr)
        return 2
    fail_on = args.fail_on or (config.schedule.fail_on or "never")
    threshold = {"warn": 1, "fail": 2, "never": 3}[fail_on]
    failed = empty = False
    for index, result in enumerate(results):
        state = "reused" if result.reused else "audited"
        print(f"{result.model.name}: {result.outcome} ({state}, {result.run_dir})")
        if result.outcome == EMPTY:
            print(
                f"bias-audit schedule: {result.model.name}: no image could be audited (every "
                f"row was skipped; see {result.run_dir / 'images.parquet'})",
                file=sys.stderr,
            )
            empty = empty or not result.reused
            continue
        if index and results[index - 1].outcome != EMPTY:
            print(format_comparison(compare_runs(results[index - 1].run_dir, result.run_dir)))
        if not result.reused and SEVERITY[result.outcome] >= threshold:
            failed = True
    return 2 if empty else 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
