"""Write a run's reports (report.json, report.md, report.html) from its store."""

from __future__ import annotations

from pathlib import Path

from audit.report.build import build_report
from audit.report.html import render_html
from audit.report.markdown import render_markdown
from audit.report.text import unreadable_examples
from audit.runs.store import atomic_write, write_json


def write_reports(run_dir: Path, formats=("json", "md", "html")) -> dict[str, Path]:
    """Write the requested report files; report.json is always (re)written first."""
    run_dir = Path(run_dir)
    report = build_report(run_dir)
    written = {"json": run_dir / "report.json"}
    write_json(written["json"], report)
    # Opens the example images: once for both reports, not at all for JSON alone.
    unreadable = unreadable_examples(report) if {"md", "html"} & set(formats) else 0
    if "md" in formats:
        written["md"] = run_dir / "report.md"
        text = render_markdown(report, unreadable)
        atomic_write(written["md"], lambda tmp: tmp.write_text(text))
    if "html" in formats:
        written["html"] = run_dir / "report.html"
        page = render_html(report, run_dir, unreadable)
        atomic_write(written["html"], lambda tmp: tmp.write_text(page))
    return written
