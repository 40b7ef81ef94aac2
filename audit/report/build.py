"""report.json, the source of truth every other report and the dashboard read: the
class verdicts with every number and its 95% CI, built from a run's store (nothing
is recomputed). Building it needs no Keras: the analysis tables are read back
(``audit.analysis.tables``), so reports, history and the dashboard start quickly."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from audit.analysis.examples import guided_note, worst_examples
from audit.analysis.tables import read_analysis, stored_verdicts
from audit.analysis.verdicts import SEVERITY_ORDER, class_verdicts, forward_passes, overall_severity
from audit.measure import spec
from audit.report.outcome import run_outcome
from audit.runs.decisions import latest_decisions, model_line
from audit.runs.store import RunStore

SCHEMA_VERSION = 1


def _clean(value):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _records(table: pd.DataFrame) -> list[dict]:
    return [_clean(record) for record in table.to_dict("records")] if len(table) else []


def _ci(row: dict, name: str) -> dict:
    return {"mean": row.get(name), "low": row.get(f"{name}_low"), "high": row.get(f"{name}_high")}


def _bounds(row: dict, name: str) -> tuple:
    return row.get(f"{name}_low"), row.get(f"{name}_high")


def metric_cis(view: dict, metric: spec.Metric) -> dict | None:
    """A class view's 95% CIs of ``metric``, ``{region: {mean, low, high}}``: a mean's
    own entry, a rate's ``<name>_ci`` sibling (``build_report`` lays them out so); None
    in a run made before the metric existed."""
    return view.get(f"{metric.name}_ci" if metric.summary == "rate" else metric.name)


def build_report(run_dir: Path) -> dict:
    """The report dict of a run with its analysis tables."""

    run = RunStore(run_dir)
    manifest = run.manifest()
    analysis = read_analysis(run_dir)
    images = run.images()
    class_names = manifest["class_names"]
    # Computed once by the analysis; a run analysed before they were stored gets them now.
    verdicts = stored_verdicts(analysis) or class_verdicts(
        analysis, class_names, manifest["config"].get("policy")
    )
    groups = analysis.groups
    regions = [region["name"] for region in manifest["regions"]]
    decisions = latest_decisions(run_dir.parent, model_line(manifest["model"]["path"]))
    ok = images[images["status"] == "ok"]
    classes = []
    for verdict in verdicts:
        index = verdict["class_index"]
        entry = dict(verdict)
        decision = decisions.get(verdict["class_name"])
        entry["decision"] = None if decision is None else asdict(decision)
        for kind, key in (("true", "true_label"), ("pred", "predicted_label")):
            match = (
                groups[(groups["kind"] == kind) & (groups["class_index"] == index)]
                if len(groups)  # none when every row was skipped
                else groups
            )
            row = _clean(match.iloc[0].to_dict()) if len(match) else {}
            view = {
                "n": row.get("n", 0),
                "n_measured": row.get("n_measured", 0),
                "n_zero_map": row.get("n_zero_map"),  # None: a run made before the count
            }
            # Every number with its 95% CI. A mean metric per region is a ``_ci`` dict;
            # a rate's value per region is a number with its ``_ci`` dicts in a
            # ``<name>_ci`` sibling, as is a scalar's in ``<name>_low``/``_high``.
            for metric in spec.metrics(aggregated=True):
                cis = {r: _ci(row, spec.column(metric.name, r)) for r in regions}
                if metric.summary == "rate":
                    view[metric.name] = {r: row.get(spec.column(metric.name, r)) for r in regions}
                    view[f"{metric.name}_ci"] = cis
                else:
                    view[metric.name] = cis
            rate = "accuracy" if kind == "true" else "precision"
            view[rate] = row.get("accuracy")
            view[f"{rate}_low"], view[f"{rate}_high"] = _bounds(row, "accuracy")
            counterfactual = {r: spec.counterfactual_column(r) for r in regions}
            view["counterfactual_mass"] = {r: row.get(c) for r, c in counterfactual.items()}
            view["counterfactual_mass_ci"] = {r: _ci(row, c) for r, c in counterfactual.items()}
            for name in ("loc_iou", "loc_error", "top1_loc_error"):
                view[name] = row.get(name)
                view[f"{name}_low"], view[f"{name}_high"] = _bounds(row, name)
            entry[key] = view
        entry["n"] = entry["true_label"]["n"]
        entry["accuracy"] = entry["true_label"]["accuracy"]
        entry["accuracy_low"] = entry["true_label"]["accuracy_low"]
        entry["accuracy_high"] = entry["true_label"]["accuracy_high"]
        entry["mass"] = entry["true_label"]["mass"]
        flags = analysis.flags
        entry["tests"] = _records(
            flags[(flags["class_index"] == index) & flags["kind"].isin(["true", "pred"])]
            if len(flags)
            else flags
        )
        probe = analysis.interventions
        probe = probe[probe["class_index"] == index] if len(probe) else probe
        entry["interventions"] = _records(probe)[0] if len(probe) else None
        strategies = analysis.strategies
        strategies = (
            strategies[strategies["class_index"] == index] if len(strategies) else strategies
        )
        entry["strategies"] = [
            {k: v for k, v in record.items() if k not in ("mean_map", "members")}
            for record in _records(strategies)
        ]
        entry["examples"] = _worst_examples(images, index, regions, manifest) if len(ok) else []
        classes.append(entry)
    classes.sort(key=lambda c: (-SEVERITY_ORDER[c["severity"]], c["class_index"]))
    flags = analysis.flags
    slice_tests = flags[flags["kind"] == "slice"] if len(flags) else flags
    slice_groups = groups[groups["kind"].isin(["slice", "class_slice"])] if len(groups) else groups
    severity = overall_severity(verdicts, flags)
    return _clean(
        {
            "schema_version": SCHEMA_VERSION,
            "run_id": manifest["run_id"],
            # No PASS on what was not checked: no images, or too few to test most classes.
            "outcome": run_outcome(classes, severity),
            "severity": severity,
            "model": manifest["model"],
            "dataset": manifest["dataset"],
            "counts": manifest.get("counts", {}),
            "accuracy": float(ok["correct"].astype(bool).mean()) if len(ok) else None,
            "regions": manifest["regions"],
            "policy": manifest["config"].get("policy", {}),
            "config": manifest["config"],
            "status_counts": {
                status: sum(c["status"] == status for c in classes)
                for status in ("bias-driven", "suspected", "ok")
            },
            "classes": classes,
            "slices": {
                "tests": _records(slice_tests),
                "groups": _records(slice_groups),
                # The slice values that drive a class (evidence; docs/flags.md).
                "drives": _records(
                    analysis.associations[analysis.associations["evidence"]]
                    if len(analysis.associations)
                    else analysis.associations
                ),
            },
            "baseline": manifest.get("baseline"),
            "trust": analysis.trust,
            # Why there are no Guided Grad-CAM pictures (None: they are drawn).
            "guided_note": guided_note(manifest["config"].get("trust", {}), manifest["input_size"]),
            # What the causal tests cost, in forward passes of the model.
            "forward_passes": forward_passes(analysis.interventions),
            # The first skipped rows by name (every one is in images.parquet).
            "skipped_rows": skipped_rows(images),
        }
    )


SKIPPED_SHOWN = 50  # skipped rows named in report.json (all are in images.parquet)


def skipped_rows(images: pd.DataFrame, limit: int = SKIPPED_SHOWN) -> list[dict]:
    """The first ``limit`` skipped rows: row, path (None when the row had none), reason."""
    skipped = images[images["status"] == "skipped"].head(limit)
    paths = skipped["path"] if "path" in skipped else pd.Series(None, index=skipped.index)
    return [
        {"row": int(row), "path": None if pd.isna(path) else str(path), "reason": reason}
        for row, path, reason in zip(skipped["row"], paths, skipped["skip_reason"], strict=True)
    ]


def _worst_examples(
    images: pd.DataFrame, index: int, regions: list[str], manifest: dict
) -> list[dict]:
    """The class's audited rows with the most spurious mass."""

    rows = worst_examples(images, index, manifest)
    mass = [spec.column("mass", r) for r in regions]
    keep = ["row", "path", "mask_path", "pred_label", "correct", *mass]
    return _records(rows[[c for c in keep if c in rows.columns]])
