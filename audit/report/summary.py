"""The short text summary printed at the end of a run, read from its report."""

from __future__ import annotations

import pandas as pd

from audit.measure import spec
from audit.report.build import metric_cis
from audit.report.text import with_ci

SKIP_REASONS_SHOWN = 8  # the most frequent skip reasons listed; the rest are counted
SKIPPED_PATHS_SHOWN = 5  # skipped rows named with their paths


def class_table(report: dict) -> pd.DataFrame:
    """Per true class: rows, accuracy, and the metrics shown for each region's role
    (``audit.measure.spec``: mass on every region, lift on expected ones) on correct
    rows, each with its 95% CI (as text)."""
    rows = []
    for entry in sorted(report["classes"], key=lambda entry: entry["class_index"]):
        view = entry["true_label"]
        row = {
            "class": entry["class_name"],
            "n": view["n"],
            "accuracy": with_ci(
                view["accuracy"], view.get("accuracy_low"), view.get("accuracy_high")
            ),
        }
        for metric in spec.metrics(aggregated=True):
            cis = metric_cis(view, metric)
            for region in report["regions"]:
                if cis and region["role"] in metric.shown_for:
                    name = region["name"]
                    row[spec.column(metric.name, name)] = with_ci(**cis[name])
        rows.append(row)
    return pd.DataFrame(rows)


def format_summary(report: dict, manifest: dict) -> str:
    counts = manifest["counts"]
    lines = [
        f"run {manifest['run_id']}: {counts['rows']} rows, {counts['ok']} audited, "
        f"{counts['skipped']} skipped; layer {manifest['model']['layer']}, "
        f"{manifest['model']['method']}, {manifest['timings']['total_seconds']:.1f} s "
        f"(audit pass {manifest['timings']['pass_seconds']:.1f} s{_compiles(manifest)})",
    ]
    if manifest.get("regions_note"):
        lines.append(f"  {manifest['regions_note']}")
    reasons = sorted(counts["skip_reasons"].items(), key=lambda item: -item[1])
    for reason, count in reasons[:SKIP_REASONS_SHOWN]:
        lines.append(f"  skipped {count:>5d} x {reason}")
    named = report.get("skipped_rows") or []
    for entry in named[:SKIPPED_PATHS_SHOWN]:
        lines.append(f"    row {entry['row']}: {entry['path'] or '(no path)'}: {entry['reason']}")
    if counts["skipped"] > min(len(named), SKIPPED_PATHS_SHOWN):
        lines.append(
            f"    (the first {min(len(named), SKIPPED_PATHS_SHOWN)} of {counts['skipped']} "
            "skipped rows; the reports name more, images.parquet has them all)"
        )
    if len(reasons) > SKIP_REASONS_SHOWN:
        rest = reasons[SKIP_REASONS_SHOWN:]
        lines.append(
            f"  … and {len(rest)} more reason(s) for {sum(count for _, count in rest)} row(s); "
            "every row's reason is in images.parquet (skip_reason), the counts in "
            "manifest.json (counts.skip_reasons)"
        )
    if counts["ok"]:
        lines.append(
            f"accuracy {report['accuracy']:.3f}; per class (mass and lift on correct rows; "
            "mean [95% CI]):"
        )
        lines.append(class_table(report).to_string(index=False))
    spent = report.get("forward_passes")
    if spent:
        lines.append(
            "causal tests: "
            + ", ".join(f"{name.replace('_', '-')} {count}" for name, count in spent.items())
            + f" forward passes (the audit pass: {counts['ok']})"
        )
    trust = report.get("trust")
    if trust:
        checks = ", ".join(
            f"{name.replace('_', ' ')} {trust[name]['status']}"
            for name in ("randomisation", "random_logit", "faithfulness")
        )
        lines.append(f"maps: {trust['verdict']} ({checks})")
        if trust["verdict"] == "untrusted":
            lines.append("  heatmap flags have low confidence: " + "; ".join(trust["reasons"]))
    return "\n".join(lines)


def _compiles(manifest: dict) -> str:
    """How many compiled programs the run traced, where known (runs since Dec 2026)."""
    compiles = manifest["timings"].get("compiles")
    if not compiles:
        return ""
    return f"; compiled programs: pass {compiles['pass']}, analysis {compiles['analysis']}"
