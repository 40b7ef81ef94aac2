"""Scheduled audits: audit every model version not yet audited, compare, gate.

``bias-audit schedule run CONFIG`` (or ``python -m pipelines.scheduled CONFIG``) takes
the versions named by the config's ``schedule:`` section, in version order. Each is
audited against the configured dataset on its own terms (its classes against each
other, as ``bias-audit run`` does, so a bias that a version keeps is still flagged),
unless a complete run with the same run key (model hash, dataset fingerprint, config
hash) is already in the store: then it is reused, never recomputed. Each version is
compared with the one before (``bias-audit compare``: per-class deltas with their
95% CIs and q-values, new, kept and resolved flags), the reports are written and every
run is in the store's history index.

The exit code is the gate, and it is a function of the store, not of what this
invocation happened to compute, so a retried task gives the same answer: 1 when the
newest version's outcome reaches ``schedule.fail_on`` (in the order PASS <
INCONCLUSIVE < WARN < FAIL of ``audit.report.outcome.OUTCOME_ORDER``), 2 when none of the
newest version's images could be audited (a data problem, not a verdict) or a
version's model file cannot be read, else 0.

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

from audit.config import AuditConfig, ConfigError, load_config
from audit.report.outcome import FAIL_ON_LEVELS, NO_IMAGES, reaches
from audit.report.text import outcome_reason


def _natural_key(path: Path) -> tuple[list, str]:
    """Version order: numbers by value, on the name without its suffix (``.keras`` sorts
    after ``.``, which put ``v2.1`` before ``v2``): v2, v2-hotfix, v2.1, v10."""
    stem = path.stem.lower()  # m_V3 is m_v3
    parts = [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", stem)]
    return parts, path.name


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
        raise ConfigError(
            f"schedule.models: no model in {schedule.models} matches schedule.pattern "
            f"{schedule.pattern!r}"
        )
    return versions


@dataclass(frozen=True)
class VersionResult:
    model: Path
    run_dir: Path
    outcome: str
    reused: bool
    reason: str | None = None  # why the outcome is INCONCLUSIVE (its untested classes)


def run_schedule(config: AuditConfig, *, progress: bool = False) -> list[VersionResult]:
    """Audit each version (reusing finished runs); returns them oldest first.

    No version is a baseline for the next: flags measured against a baseline ask
    whether a class got worse, so a bias that two versions share would pass as
    resolved. The comparison with the previous version is ``compare_runs``'s.
    """
    # Here, not at the top: a config error is reported before Keras is imported.
    from audit.engine.models import ModelStructureError
    from audit.run import run_audit

    results: list[VersionResult] = []
    for version in model_versions(config):
        versioned = config.model_copy(
            update={"model": config.model.model_copy(update={"path": version})}
        )
        try:
            # resume=True returns a complete run with the same run key as it is.
            # run_audit indexes the runs it makes; history() catches up on older ones.
            result = run_audit(versioned, resume=True, progress=progress)
        except (ConfigError, ModelStructureError, FileNotFoundError) as error:
            raise ConfigError(f"version {version.name}: {error}") from None
        report = json.loads((result.run_dir / "report.json").read_text())
        results.append(
            VersionResult(
                version, result.run_dir, report["outcome"], result.reused, outcome_reason(report)
            )
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bias-audit schedule run",
        description="Audit every model version not yet audited and compare each with the one "
        "before; exit 1 when the newest version's outcome reaches fail_on, 2 when none of its "
        "images could be audited or a version cannot be read, 3 when an audit stopped on an "
        "error (the run is marked failed; running this again continues it).",
    )
    parser.add_argument("config", help="YAML audit config with a schedule: section")
    parser.add_argument(
        "--fail-on",
        choices=[*FAIL_ON_LEVELS, "never"],
        help="override schedule.fail_on (PASS < INCONCLUSIVE < WARN < FAIL; inconclusive is "
        "the strict level)",
    )
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        results = run_schedule(config, progress=args.progress)
    except (ConfigError, FileNotFoundError) as error:
        print(f"bias-audit schedule: {error}", file=sys.stderr)
        return 2
    from audit.runs.compare import compare_runs, format_comparison

    fail_on = args.fail_on or (config.schedule.fail_on or "never")
    for index, result in enumerate(results):
        state = "reused" if result.reused else "audited"
        reason = f"; {result.reason}" if result.reason else ""
        print(f"{result.model.name}: {result.outcome} ({state}, {result.run_dir}){reason}")
        if result.outcome == NO_IMAGES:
            print(
                f"bias-audit schedule: {result.model.name}: no image could be audited (every "
                f"row was skipped; see {result.run_dir / 'images.parquet'})",
                file=sys.stderr,
            )
            continue
        # The previous version with audited images (an empty run has nothing to compare).
        previous = next((r for r in reversed(results[:index]) if r.outcome != NO_IMAGES), None)
        if previous is not None:
            print(format_comparison(compare_runs(previous.run_dir, result.run_dir)))
    newest = results[-1]
    if newest.outcome == NO_IMAGES:
        return 2
    if reaches(newest.outcome, fail_on):
        print(
            f"bias-audit schedule: the newest version, {newest.model.name}, is "
            f"{newest.outcome} (fail_on: {fail_on})",
            file=sys.stderr,
        )
        return 1
    return 0
