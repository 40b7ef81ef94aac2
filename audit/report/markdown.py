"""report.md: the verdicts for a terminal and a CI comment, every user-controlled
name escaped for Markdown.
"""

from __future__ import annotations

from pathlib import Path

from audit.report.build import _ci
from audit.report.outcome import INCONCLUSIVE
from audit.report.text import (
    _bg_gap,
    _code,
    _decision_text,
    _fmt,
    _md,
    _support,
    _transplant,
    drives_text,
    measure_rows,
    outcome_reason,
    slice_flag_text,
    status_text,
    trust_lines,
    unreadable_examples,
    unreadable_note,
    untested_note,
    with_ci,
)


def _skipped_markdown(report: dict, shown: int = 20) -> list[str]:
    rows = report.get("skipped_rows") or []
    if not rows:
        return []
    kinds = report["counts"].get("skip_reasons", {})
    lines = ["", "### Skipped rows", ""]
    lines += [f"- {count} x {_md(kind)}" for kind, count in kinds.items()]
    lines += ["", "| row | path | reason |", "|---:|---|---|"]
    lines += [
        f"| {r['row']} | {_md(r['path'] or '(none)')} | {_md(r['reason'])} |" for r in rows[:shown]
    ]
    rest = report["counts"].get("skipped", len(rows)) - min(shown, len(rows))
    if rest > 0:
        lines.append(f"\n… and {rest} more: every row's reason is in images.parquet.")
    return lines


def render_markdown(report: dict, unreadable: int | None = None) -> str:
    """``unreadable``: ``unreadable_examples(report)`` when the caller has it already."""
    spurious = [r["name"] for r in report["regions"] if r["role"] == "spurious"]
    lines = [
        f"## Bias audit {report['outcome']}: {_md(report['run_id'])}",
        "",
        f"Model {_code(Path(report['model']['path']).name)} (layer "
        f"{_md(report['model']['layer'])}, {_md(report['model']['method'])}), "
        f"{report['counts'].get('ok', 0)} images audited, "
        f"{report['counts'].get('skipped', 0)} skipped; accuracy {_fmt(report['accuracy'], 3)}.",
        "",
    ]
    reason = outcome_reason(report)
    if reason:
        lines += [f"**{INCONCLUSIVE}:** nothing flagged, but {_md(reason)}.", ""]
    if unreadable is None:
        unreadable = unreadable_examples(report)
    if unreadable:
        note = unreadable_note(unreadable, report["dataset"]["root"])
        lines += [f"**Note:** {_md(note)}: report.html shows no overlay of them.", ""]
    lines += [
        "| class | status | n | accuracy [95% CI] | "
        + " | ".join(f"{_md(r)} mass [95% CI]" for r in spurious)
        + " | BG-gap [95% CI] | transplant excess [95% CI] |",
        "|---|---|---:|---:|" + "---:|" * len(spurious) + "---:|---:|",
    ]
    for entry in report["classes"]:
        cells = [
            _md(entry["class_name"]),
            f"**{entry['status']}**" if entry["status"] != "ok" else status_text(entry),
            _support(entry),
            with_ci(**_ci(entry, "accuracy")),
        ]
        cells += [with_ci(**entry["mass"][region]) for region in spurious]
        cells += [_bg_gap(entry["interventions"]), _transplant(entry["interventions"])]
        lines.append("| " + " | ".join(cells) + " |")
    untested = untested_note(report)
    if untested and not reason:  # an INCONCLUSIVE run says it under its title
        lines += ["", f"**Note:** {_md(untested)}."]
    flagged = [e for e in report["classes"] if e["status"] != "ok" or e["reasons"]]
    if flagged:
        lines += ["", "### Why"]
        for entry in flagged:
            for reason in entry["reasons"]:
                lines.append(f"- **{_md(entry['class_name'])}**: {_md(reason)}")
            if entry.get("decision"):
                lines.append(f"- **{_md(entry['class_name'])}**: {_md(_decision_text(entry))}")
    lines += ["", "### Evidence per class", ""]
    lines += [
        f"- **{_md(entry['class_name'])}** ({status_text(entry)}): {_md(entry['evidence'])}"
        for entry in report["classes"]
        if entry.get("evidence")
    ]
    lines += _measures_markdown(report)
    slices = [t for t in report["slices"]["tests"] if t.get("flagged")]
    if slices:
        lines += ["", "### Flagged slices"]
        lines += [f"- {slice_flag_text(test, _md)}" for test in slices]
    drives = report["slices"].get("drives") or []
    if drives:
        lines += ["", "### Slices that drive a class"]
        lines += [f"- {drives_text(association, _md)}" for association in drives]
    lines += _skipped_markdown(report)
    lines += _trust_markdown(report.get("trust"), report.get("guided_note"))
    policy = report["policy"]
    lines += [
        "",
        f"Flags need q < {policy.get('alpha')} (Benjamini-Hochberg) and a 95% CI lower bound "
        f"above {policy.get('effect_floor')}; classes need n >= {policy.get('min_support')}.",
    ]
    return "\n".join(lines) + "\n"


def _measures_markdown(report: dict) -> list[str]:
    """Every aggregated metric per class and region, on the true label's correct rows."""
    regions = [region["name"] for region in report["regions"]]
    lines = [
        "",
        "### Measures per class (true label, correct rows; mean [95% CI])",
        "",
        "| class | measure | " + " | ".join(_md(r) for r in regions) + " |",
        "|---|---|" + "---:|" * len(regions),
    ]
    for entry in report["classes"]:
        for name, cells in measure_rows(entry["true_label"], regions):
            lines.append(f"| {_md(entry['class_name'])} | {name} | " + " | ".join(cells) + " |")
    return lines


def _trust_markdown(trust: dict | None, guided: str | None) -> list[str]:
    lines = ["", "### Trust in the maps"]
    lines += [f"- {_md(line)}" for line in trust_lines(trust)]
    if trust and trust["verdict"] == "untrusted":
        lines.append("- **Every heatmap flag above has low confidence.**")
    if guided:
        lines.append(f"- {_md(guided)}")
    return lines
