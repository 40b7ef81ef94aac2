"""report.html: one self-contained page (CI bars, overlays of the worst examples,
Guided Grad-CAM, strategy clusters, slice tables), every user-controlled name escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from audit.measure import spec
from audit.report.build import _ci
from audit.report.outcome import INCONCLUSIVE
from audit.report.overlay import colorize, stored_overlay
from audit.report.text import (
    _bg_gap,
    _decision_text,
    _support,
    _transplant,
    drives_text,
    interventions_text,
    main_map_text,
    measure_rows,
    outcome_reason,
    slice_flag_text,
    status_text,
    transplant_text,
    trust_lines,
    unreadable_examples,
    unreadable_note,
    untested_note,
    with_ci,
)
from audit.runs.store import RunStore

THUMBNAIL = 160  # px: the report's overlays and Guided Grad-CAM pictures


# ---------------------------------------------------------------------- html


def _png_data_uri(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _ci_bar(mean, low, high, label: str) -> str:
    """An inline SVG bar with a CI whisker on a 0..1 scale."""
    if mean is None:
        return '<span class="muted">n/a</span>'
    width = 160

    def x(value):
        return max(0.0, min(1.0, value if value is not None else 0.0)) * width

    value = with_ci(mean, low, high)  # printed beside the bar, not only in its tooltip
    label = html.escape(f"{label}: {value}")
    return (
        f'<svg width="{width + 110}" height="16" role="img" aria-label="{label}">'
        f"<title>{label}</title>"
        f'<rect x="0" y="3" width="{width}" height="10" fill="#eee"/>'
        f'<rect x="0" y="3" width="{x(mean):.1f}" height="10" fill="#d9822b"/>'
        f'<line x1="{x(low):.1f}" x2="{x(high):.1f}" y1="8" y2="8" stroke="#222" '
        f'stroke-width="2"/><text x="{width + 4}" y="13" font-size="11">{value}</text></svg>'
    )


def _example_thumbnails(
    cam_of: dict, manifest: dict, examples: list[dict], run_dir: Path
) -> list[str]:
    thumbnails = []
    for example in examples:
        row = example["row"]
        if row not in cam_of:
            continue
        picture = stored_overlay(
            manifest["dataset"], example["path"], example.get("mask_path"), cam_of[row], THUMBNAIL
        )
        # Captioned by file name (the row number is in the tooltip).
        name = html.escape(Path(str(example["path"])).name)
        if picture is not None:  # an unreadable image is counted in the report's note
            caption = f"predicted {example.get('pred_label')}, " + ", ".join(
                f"{k} {v:.2f}"
                for k, v in example.items()
                if k.startswith("mass_") and v is not None
            )
            thumbnails.append(
                # Shown at the thumbnail width, like the Guided Grad-CAM beside it,
                # whatever the image's own (smaller) size.
                f'<figure><img src="{_png_data_uri(picture)}" width="{THUMBNAIL}" '
                f'alt="{html.escape(caption)}" title="row {row}">'
                f"<figcaption class='overlay'>{name}: {html.escape(caption)}</figcaption>"
                "</figure>"
            )
        # Stored in the run folder: shown even when the dataset image cannot be read.
        guided = run_dir / "guided" / f"{row}.png"
        if guided.exists():
            with Image.open(guided) as stored:
                picture = stored.convert("L").resize((THUMBNAIL, THUMBNAIL), Image.BILINEAR)
            thumbnails.append(
                f'<figure><img src="{_png_data_uri(picture)}" alt="Guided Grad-CAM, row {row}" '
                f"title=\"row {row}\"><figcaption class='guided'>{name}: Guided Grad-CAM"
                "</figcaption></figure>"
            )
    return thumbnails


def _strategy_maps(strategies: pd.DataFrame, class_index: int) -> list[str]:
    if not len(strategies):
        return []
    figures = []
    for record in strategies[strategies["class_index"] == class_index].itertuples():
        mean_map = np.asarray(record.mean_map, "float32").reshape(record.map_shape)
        picture = Image.fromarray((colorize(mean_map) * 255).astype("uint8")).resize(
            (64, 64), Image.BILINEAR
        )
        note = ", minority strategy" if record.minority_strategy else ""
        accuracy = with_ci(  # runs made before the CIs have no bounds
            record.accuracy,
            getattr(record, "accuracy_low", None),
            getattr(record, "accuracy_high", None),
        )
        caption = (
            f"cluster {record.cluster}: {record.size} images ({record.fraction:.0%}), "
            f"accuracy {accuracy}{note}"
        )
        figures.append(
            f'<figure><img src="{_png_data_uri(picture)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    return figures


STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1rem 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
table.numbers td:nth-child(n+3){text-align:right;font-variant-numeric:tabular-nums}
.card{border:1px solid #ccc;border-radius:6px;padding:1rem;margin:1rem 0}
.bias-driven{border-left:6px solid #c0392b}.suspected{border-left:6px solid #e67e22}
.ok{border-left:6px solid #27ae60}.muted{color:#888}
.note{background:#fff4e5;border:1px solid #e67e22;padding:.5rem 1rem}
figure{display:inline-block;vertical-align:top;margin:4px;font-size:11px;max-width:170px}
td.status.bias-driven{color:#c0392b;font-weight:bold}td.status.suspected{color:#e67e22}
details.card>summary{cursor:pointer;font-weight:bold}
pre{background:#f6f6f6;padding:1rem;overflow:auto}
.outcome{padding:0 .4em;border-radius:4px;color:#fff}
.outcome.pass{background:#27ae60}.outcome.warn{background:#e67e22}
.outcome.fail{background:#c0392b}.outcome.inconclusive{background:#6c5ce7}
.outcome.no-images-audited{background:#888}
.note.inconclusive{background:#efedfd;border-color:#6c5ce7}
"""


def _outcome_class(outcome: str) -> str:
    """The CSS class of an outcome's badge: ``inconclusive``, ``no-images-audited``."""
    return re.sub("[^a-z]+", "-", outcome.lower())


def render_html(report: dict, run_dir: Path, unreadable: int | None = None) -> str:
    """``unreadable``: ``unreadable_examples(report)`` when the caller has it already."""
    from audit.analysis.tables import read_analysis

    run = RunStore(run_dir)
    manifest = run.manifest()
    rows, cams = run.cams()  # read once for every class's thumbnails
    cam_of = dict(zip(rows.tolist(), cams, strict=True))
    all_strategies = read_analysis(run_dir).strategies
    escape = html.escape
    spurious = [r["name"] for r in report["regions"] if r["role"] == "spurious"]
    expected = [r["name"] for r in report["regions"] if r["role"] == "expected"]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>Bias audit {escape(report['run_id'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>Bias audit: <span class='outcome {_outcome_class(report['outcome'])}'>"
        f"{escape(report['outcome'])}</span></h1>",
        f"<p>Run {escape(report['run_id'])}; model {escape(str(report['model']['path']))}, "
        f"layer {escape(str(report['model']['layer']))}, {escape(report['model']['method'])}; "
        f"{report['counts'].get('ok', 0)} images audited, "
        f"{report['counts'].get('skipped', 0)} skipped.</p>",
    ]
    reason = outcome_reason(report)
    if reason:
        parts.append(
            f"<p class='note inconclusive'><b>{INCONCLUSIVE}</b>: nothing flagged, but "
            f"{escape(reason)}.</p>"
        )
    if unreadable is None:
        unreadable = unreadable_examples(report)
    if unreadable:
        note = unreadable_note(unreadable, report["dataset"]["root"])
        parts.append(
            f"<p class='note'>{escape(note)}: their overlays are missing below (stored Guided "
            "Grad-CAM pictures are still shown).</p>"
        )
    parts.append(
        "<h2>Summary</h2><table class='numbers'><tr><th>class</th><th>status</th><th>n</th>"
        "<th>accuracy [95% CI]</th>"
        + "".join(f"<th>{escape(r)} mass [95% CI]</th>" for r in spurious)
        + "<th>BG-gap [95% CI]</th><th>transplant excess [95% CI]</th></tr>"
    )
    for entry in report["classes"]:
        probe = entry["interventions"]
        parts.append(
            f"<tr><td>{escape(entry['class_name'])}</td>"
            f"<td class='status {escape(entry['status'])}'>{escape(status_text(entry))}</td>"
            f"<td>{_support(entry)}</td><td>{with_ci(**_ci(entry, 'accuracy'))}</td>"
            + "".join(f"<td>{with_ci(**entry['mass'][r])}</td>" for r in spurious)
            + f"<td>{_bg_gap(probe)}</td><td>{_transplant(probe)}</td></tr>"
        )
    parts.append("</table>")
    untested = untested_note(report)
    if untested and not reason:
        parts.append(f"<p class='note'>{escape(untested)}.</p>")
    for entry in report["classes"]:
        # A class with nothing to say is collapsed: the flagged ones lead the page.
        title = f"{escape(entry['class_name'])}: {escape(status_text(entry))}"
        if entry["status"] == "ok" and not entry["reasons"]:
            tag = "details"
            parts.append(f"<details class='card ok'><summary>{title}</summary>")
        else:
            tag = "div"
            parts.append(f"<div class='card {escape(entry['status'])}'><h3>{title}</h3>")
        parts.append(
            "<ul>"
            + "".join(f"<li>{escape(reason)}</li>" for reason in entry["reasons"])
            + (f"<li><b>{escape(_decision_text(entry))}</b></li>" if entry.get("decision") else "")
            + "</ul>"
            + (
                f"<p class='evidence'><b>Evidence:</b> {escape(entry['evidence'])}</p>"
                if entry.get("evidence")
                else ""
            )
            + "<table><tr><th>region</th><th>mass (true label, correct)</th>"
            "<th>mass (predicted label)</th><th>lift [95% CI]</th></tr>"
        )
        for region in expected + spurious:
            bars = "".join(
                f"<td>{_ci_bar(m['mean'], m['low'], m['high'], region)}</td>"
                for m in (
                    entry["true_label"]["mass"][region],
                    entry["predicted_label"]["mass"][region],
                )
            )
            lift = with_ci(**entry["true_label"]["lift"][region])
            parts.append(f"<tr><td>{escape(region)}</td>{bars}<td>{lift}</td></tr>")
        parts.append("</table>")
        parts.append(_measures_table(entry["true_label"], expected + spurious))
        probe = entry["interventions"]
        if probe and probe.get("n_probe"):
            parts.append(f"<p>{escape(interventions_text(probe))}</p>")
        if probe and transplant_text(probe):
            parts.append(f"<p>{escape(transplant_text(probe))}</p>")
        main_map = main_map_text(entry["true_label"], expected + spurious)
        if main_map:
            parts.append(f"<p>{escape(main_map)}</p>")
        thumbnails = _example_thumbnails(cam_of, manifest, entry["examples"], run_dir)
        if thumbnails:
            parts.append("<h4>Most spurious mass</h4>" + "".join(thumbnails))
        strategies = _strategy_maps(all_strategies, entry["class_index"])
        if strategies:
            parts.append("<h4>Strategies (CAM clusters)</h4>" + "".join(strategies))
        parts.append(f"</{tag}>")
    skipped = report.get("skipped_rows") or []
    if skipped:
        parts.append(
            f"<h2>Skipped rows ({report['counts'].get('skipped', len(skipped))})</h2><ul>"
            + "".join(
                f"<li>{count} x {escape(kind)}</li>"
                for kind, count in report["counts"].get("skip_reasons", {}).items()
            )
            + "</ul><table class='numbers'><tr><th>row</th><th>path</th><th>reason</th></tr>"
            + "".join(
                f"<tr><td>{r['row']}</td><td>{escape(r['path'] or '(none)')}</td>"
                f"<td>{escape(r['reason'])}</td></tr>"
                for r in skipped
            )
            + "</table>"
            + (
                "<p class='note'>The first "
                f"{len(skipped)} are named; every row's reason is in images.parquet.</p>"
                if report["counts"].get("skipped", 0) > len(skipped)
                else ""
            )
        )
    trust = report.get("trust")
    parts.append(
        "<h2>Trust in the maps</h2><ul>"
        + "".join(f"<li>{escape(line)}</li>" for line in trust_lines(trust))
        + (
            "<li><b>Every heatmap flag above has low confidence.</b></li>"
            if trust and trust["verdict"] == "untrusted"
            else ""
        )
        + (f"<li>{escape(report['guided_note'])}</li>" if report.get("guided_note") else "")
        + "</ul>"
    )
    slice_groups = [g for g in report["slices"]["groups"] if g["kind"] == "slice"]
    if slice_groups:
        parts.append(_slices_html(slice_groups, report["slices"], spurious))
    parts.append(
        "<h2>Configuration and thresholds</h2><details><summary>The resolved config of "
        "this run</summary><pre>"
        + escape(json.dumps(report["config"], indent=2))
        + "</pre></details></body></html>"
    )
    return "\n".join(parts)


def _slices_html(groups: list[dict], slices: dict, spurious: list[str]) -> str:
    """The slices that drive a class, the flagged slices, each attribute's worst group,
    and the table of slice values."""
    escape = html.escape
    flagged = [test for test in slices["tests"] if test.get("flagged")]
    parts = ["<h2>Slices</h2>"]
    drives = slices.get("drives") or []
    if drives:
        items = "".join(f"<li>{drives_text(association, escape)}</li>" for association in drives)
        parts.append(f"<p>Slices that drive a class:</p><ul>{items}</ul>")
    if flagged:
        items = "".join(f"<li>{slice_flag_text(test, escape)}</li>" for test in flagged)
        parts.append(f"<p>Flagged slices:</p><ul>{items}</ul>")
    else:
        parts.append("<p>No slice is flagged.</p>")
    worst: dict = {}  # every value of an attribute carries the attribute's worst group
    for group in groups:
        if group.get("worst_group_value") is not None:
            worst.setdefault(group["attribute"], group)
    if worst:
        parts.append(
            "<p>Worst group (lowest accuracy among values with enough rows): "
            + "; ".join(
                f"{escape(str(attribute))} = {escape(str(group['worst_group_value']))}, "
                f"accuracy {with_ci(**_ci(group, 'worst_group_accuracy'))}"
                for attribute, group in worst.items()
            )
            + ".</p>"
        )
    parts.append(
        "<table class='numbers'><tr><th>attribute</th><th>value</th><th>n</th>"
        "<th>accuracy [95% CI]</th>"
        + "".join(f"<th>{escape(r)} mass [95% CI]</th>" for r in spurious)
        + "</tr>"
    )
    for group in groups:
        parts.append(
            f"<tr><td>{escape(str(group['attribute']))}</td>"
            f"<td>{escape(str(group['value']))}</td><td>{group['n']}</td>"
            f"<td>{with_ci(**_ci(group, 'accuracy'))}</td>"
            + "".join(f"<td>{with_ci(**_ci(group, spec.column('mass', r)))}</td>" for r in spurious)
            + "</tr>"
        )
    parts.append("</table>")
    return "".join(parts)


def _measures_table(view: dict, regions: list[str]) -> str:
    """Every aggregated metric of a class on its correct rows, per region."""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells)
        + "</tr>"
        for name, cells in measure_rows(view, regions)
    )
    head = "".join(f"<th>{html.escape(region)}</th>" for region in regions)
    return (
        "<details><summary>Every measure (true label, correct rows; mean [95% CI])</summary>"
        f"<table><tr><th>measure</th>{head}</tr>{rows}</table></details>"
    )
