"""Compare two runs: per-class deltas with significance, new and resolved flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu

from audit.analysis.flags import benjamini_hochberg, bootstrap_difference_ci
from audit.config import ConfigError
from audit.measure import spec
from audit.report.outcome import INCONCLUSIVE
from audit.report.text import outcome_reason
from audit.runs.store import RunStore, baseline_mismatch


def _report(run_dir: Path) -> dict:
    path = Path(run_dir) / "report.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; is {run_dir} a finished run?")
    return json.loads(path.read_text())


SEVERITY_RANK = {"none": 0, "warn": 1, "fail": 2}


def _flag_set(report: dict) -> dict[str, tuple[str, str]]:
    """Flag identity -> (label, severity): non-ok classes and flagged slices.

    A class is one identity whatever its status, so a class that goes from
    bias-driven to suspected has eased, not gained a new flag."""
    flags = {
        f"class {entry['class_name']}": (
            f"class {entry['class_name']}: {entry['status']}",
            entry["severity"],
        )
        for entry in report["classes"]
        if entry["status"] != "ok"
    }
    for test in report["slices"]["tests"]:
        if test.get("flagged"):
            name = f"slice {test['attribute']}={test['value']} on {test['region']}"
            flags[name] = (name, test["severity"])
    return flags


def _flag_changes(old: dict, new: dict) -> dict[str, dict[str, str]]:
    """New (added or more severe), resolved (gone), eased (less severe) and kept flags,
    each as label -> severity; a changed label says what it was."""
    changes = {"new_flags": {}, "resolved_flags": {}, "eased_flags": {}, "kept_flags": {}}
    for identity, (label, severity) in new.items():
        if identity not in old:
            changes["new_flags"][label] = severity
            continue
        old_label, old_severity = old[identity]
        shown = label if label == old_label else f"{label} (was {old_label.split(': ')[-1]})"
        rise = SEVERITY_RANK.get(severity, 0) - SEVERITY_RANK.get(old_severity, 0)
        kind = "new_flags" if rise > 0 else "eased_flags" if rise < 0 else "kept_flags"
        changes[kind][shown] = severity
    for identity, (label, severity) in old.items():
        if identity not in new:
            changes["resolved_flags"][label] = severity
    return changes


def compare_runs(old_dir: Path, new_dir: Path, *, resamples: int = 1000, seed: int = 0) -> dict:
    """Deltas of every class's spurious mass (true label, correct rows), each with a
    bootstrap 95% CI and a two-sided Mann-Whitney q-value, and the flag changes. The
    two runs' correct rows differ (each model gets other images right), so the classes
    are compared as two samples."""
    old, new = _report(old_dir), _report(new_dir)
    notes = _comparable(RunStore(old_dir).manifest(), RunStore(new_dir).manifest())
    reason = outcome_reason(new)
    if reason and old["outcome"] != INCONCLUSIVE:
        # Fewer flags on untested classes are fewer tests, not a fix.
        notes.append(
            f"note: the new run is {INCONCLUSIVE} (the old one {old['outcome']}): {reason}; "
            "a flag of an untested class reads as resolved without evidence"
        )
    old_images, new_images = RunStore(old_dir).images(), RunStore(new_dir).images()
    spurious = [r["name"] for r in new["regions"] if r["role"] == "spurious"]
    rows = []
    for entry in new["classes"]:
        name = entry["class_name"]
        for region in spurious:
            column = spec.column("mass", region)
            a = _class_values(old_images, old, name, column)
            b = _class_values(new_images, new, name, column)
            row = {
                "class_name": name,
                "region": region,
                "old_mean": float(a.mean()) if len(a) else None,
                "new_mean": float(b.mean()) if len(b) else None,
                "delta": float(b.mean() - a.mean()) if len(a) and len(b) else None,
                "delta_low": None,
                "delta_high": None,
                "p_value": np.nan,
            }
            if len(a) >= 2 and len(b) >= 2 and column in old_images and column in new_images:
                row["p_value"] = float(mannwhitneyu(b, a, alternative="two-sided").pvalue)
                row["delta_low"], row["delta_high"] = bootstrap_difference_ci(
                    b, a, resamples=resamples, seed=seed
                )
            rows.append(row)
    deltas = pd.DataFrame(rows)
    if len(deltas):
        deltas["q_value"] = benjamini_hochberg(deltas["p_value"].to_numpy())
    return {
        "old_run": old["run_id"],
        "new_run": new["run_id"],
        "old_outcome": old["outcome"],
        "new_outcome": new["outcome"],
        "deltas": deltas,
        **_flag_changes(_flag_set(old), _flag_set(new)),
        "notes": notes,
    }


def _comparable(old: dict, new: dict) -> list[str]:
    """Refuse runs of other classes (``ConfigError``: nothing lines up, and every flag
    of the old run would read as resolved); notes for another dataset or regions."""
    if old.get("class_names") != new.get("class_names"):
        names = [", ".join(map(str, run.get("class_names", [])[:6])) for run in (old, new)]
        raise ConfigError(
            f"the runs audited different classes ({names[0]}, ... against {names[1]}, ...); "
            "compare two runs of one model line on one dataset"
        )
    notes = []
    if baseline_mismatch(new, fingerprint=old.get("dataset", {}).get("fingerprint")):
        notes.append(
            "note: the runs audited different datasets (their fingerprints differ), so the "
            "deltas mix a change of model with a change of images"
        )
    if baseline_mismatch(new, regions=old.get("regions")):
        notes.append("note: the runs measured different regions; only shared ones compare")
    settings = {
        "CAM method": lambda run: run.get("model", {}).get("method"),
        "layer": lambda run: run.get("model", {}).get("layer"),
        "preprocessing": lambda run: run.get("config", {}).get("preprocess"),
    }
    differ = [
        f"{name} {read(old)!r} vs {read(new)!r}" if name != "preprocessing" else name
        for name, read in settings.items()
        if read(old) != read(new)
    ]
    if differ:
        notes.append(
            "warning: the runs were made with different settings ("
            + "; ".join(differ)
            + "): their maps differ by construction, so the deltas and resolved flags mix "
            "a change of model with a change of method"
        )
    return notes


def _class_values(images: pd.DataFrame, report: dict, name: str, column: str) -> np.ndarray:
    class_names = [entry["class_name"] for entry in sorted(report["classes"], key=_index)]
    if name not in class_names or column not in images:
        return np.zeros(0)
    index = class_names.index(name)
    rows = images[
        (images["status"] == "ok")
        & (images["label_index"] == index)
        & images["correct"].astype(bool)
    ]
    values = rows[column].to_numpy(dtype="float64")
    return values[np.isfinite(values)]


def _index(entry: dict) -> int:
    return entry["class_index"]


def format_comparison(result: dict, alpha: float = 0.05) -> str:
    lines = [
        f"{result['old_run']} ({result['old_outcome']}) -> {result['new_run']} "
        f"({result['new_outcome']})"
    ]
    deltas = result["deltas"]
    if len(deltas):
        shown = deltas.assign(significant=np.where(deltas["q_value"] < alpha, "yes", ""))
        lines.append(
            shown.to_string(
                index=False,
                columns=[
                    "class_name",
                    "region",
                    "old_mean",
                    "new_mean",
                    "delta",
                    "delta_low",
                    "delta_high",
                    "q_value",
                    "significant",
                ],
                float_format=lambda v: f"{v:.3f}",
            )
        )
    for title, key in (
        ("new flags", "new_flags"),
        ("resolved flags", "resolved_flags"),
        ("eased flags", "eased_flags"),
        ("kept flags", "kept_flags"),  # a bias both runs have
    ):
        lines.append(f"{title}: " + (", ".join(result[key]) if result[key] else "none"))
    return "\n".join([*lines, *result.get("notes", [])])
