"""Report: report.json (the source of truth), report.md (fits a CI comment), report.html.

Everything here reads the run store; nothing is recomputed. All user-controlled
text (class names, paths, slice values, reasons) is escaped in HTML and Markdown.

The run's outcome and its gate order are defined here once (``run_outcome``,
``OUTCOME_ORDER``, ``reaches``); the CLI, scheduled audits, history, compare and the
dashboard read them. audit.analysis.analyse (and with it Keras) is imported only where a
report is built, so that those readers start without Keras.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from audit.overlay import colorize, stored_overlay
from audit.runs.decisions import CHOICES, latest_decisions, model_line
from audit.runs.store import RunStore, atomic_write, write_json

SCHEMA_VERSION = 1
OUTCOMES = {"none": "PASS", "warn": "WARN", "fail": "FAIL"}
INCONCLUSIVE = "INCONCLUSIVE"
NO_IMAGES = "NO IMAGES AUDITED"  # no verdict: every row was skipped
# The gate's order: ``--fail-on LEVEL`` fails a run whose outcome is LEVEL or later.
# INCONCLUSIVE (no flag, but too few images to test most classes) sits below WARN, so
# `--fail-on warn` keeps passing it and `--fail-on inconclusive` is the strict level.
OUTCOME_ORDER = ("PASS", INCONCLUSIVE, "WARN", "FAIL")
FAIL_ON_LEVELS = tuple(outcome.lower() for outcome in OUTCOME_ORDER[1:])
THUMBNAIL = 160  # px: the report's overlays and Guided Grad-CAM pictures


def untested_classes(classes: list[dict]) -> tuple[list[dict], list[dict]]:
    """The classes with audited images (``n`` > 0), and those of them that no test
    could judge (``tested`` false: too few measured images for any test)."""
    audited = [entry for entry in classes if entry["n"]]
    return audited, [entry for entry in audited if entry.get("tested") is False]


def run_outcome(classes: list[dict], severity: str) -> str:
    """The run's outcome from its class verdicts (each with its ``n`` audited images)
    and its overall severity.

    FAIL or WARN as the severity says; otherwise INCONCLUSIVE when more than half of
    the classes with audited images are untested (so when none was tested), else PASS:
    an ``ok`` that no test backs is no evidence of health. NO IMAGES AUDITED when no
    class has an audited image.
    """
    audited, untested = untested_classes(classes)
    if not audited:
        return NO_IMAGES
    if severity != "none":
        return OUTCOMES[severity]
    return INCONCLUSIVE if 2 * len(untested) > len(audited) else "PASS"


def reaches(outcome: str, fail_on: str | None) -> bool:
    """Whether an outcome fails the gate ``fail_on`` (one of FAIL_ON_LEVELS; None or
    "never": no gate). NO IMAGES AUDITED is no verdict and reaches no level."""
    if fail_on in (None, "never") or outcome not in OUTCOME_ORDER:
        return False
    return OUTCOME_ORDER.index(outcome) >= OUTCOME_ORDER.index(fail_on.upper())


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


def build_report(run_dir: Path) -> dict:
    """The report dict of a run with its analysis tables."""
    from audit.analysis.examples import guided_note
    from audit.analysis.tables import read_analysis
    from audit.analysis.verdicts import (
        SEVERITY_ORDER,
        class_verdicts,
        forward_passes,
        overall_severity,
    )

    run = RunStore(run_dir)
    manifest = run.manifest()
    analysis = read_analysis(run_dir)
    images = run.images()
    class_names = manifest["class_names"]
    verdicts = class_verdicts(analysis, class_names, manifest["config"].get("policy"))
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
                "mass": {r: _ci(row, f"mass_{r}") for r in regions},
                "lift": {r: _ci(row, f"lift_{r}") for r in regions},
                "pointing": {r: row.get(f"pointing_{r}") for r in regions},
            }
            # Every number with its 95% CI: a scalar's in ``<name>_low``/``_high``, a
            # per-region one's in a ``<name>_ci`` sibling (``_ci`` dicts).
            rate = "accuracy" if kind == "true" else "precision"
            view[rate] = row.get("accuracy")
            view[f"{rate}_low"], view[f"{rate}_high"] = _bounds(row, "accuracy")
            view["pointing_ci"] = {r: _ci(row, f"pointing_{r}") for r in regions}
            view["counterfactual_mass"] = {r: row.get(f"cf_mass_{r}") for r in regions}
            view["counterfactual_mass_ci"] = {r: _ci(row, f"cf_mass_{r}") for r in regions}
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


def _worst_examples(
    images: pd.DataFrame, index: int, regions: list[str], manifest: dict
) -> list[dict]:
    """The class's audited rows with the most spurious mass."""
    from audit.analysis.examples import worst_examples

    rows = worst_examples(images, index, manifest)
    keep = ["row", "path", "mask_path", "pred_label", "correct", *(f"mass_{r}" for r in regions)]
    return _records(rows[[c for c in keep if c in rows.columns]])


# ------------------------------------------------------------------ markdown


def _md(text) -> str:
    """Escape text for a Markdown table cell (and for HTML inside Markdown).

    GitHub turns ``:smile:`` into an emoji and ``me@host.org`` / ``www.host.org`` into
    links after parsing, where escapes are gone: an invisible word joiner (U+2060)
    after a colon that touches a word (not the colon of "q=1e-06): the class") and
    after each at-sign, and an escaped dot after a letter (a host name, not "0.739"),
    stop them. So the text stays readable in a terminal and a CI comment. Line breaks
    become spaces.
    """
    # A line break would end the table row (or the heading): one line, spaces between.
    escaped = html.escape(" ".join(str(text).splitlines()), quote=False)
    for char in "\\|`*_[]<>#~$":
        escaped = escaped.replace(char, "\\" + char)
    escaped = re.sub(r"(?<=[A-Za-z])\.", r"\\.", escaped)  # breaks www. and host autolinks
    # A word joiner stops emoji shortcodes (":smile:", "https:") and e-mail autolinks.
    escaped = re.sub(r":(?=[^\s])", ":\u2060", escaped)
    return escaped.replace("@", "@\u2060")


def _code(text) -> str:
    """A Markdown code span of raw text (nothing inside a code span needs escaping).

    Its fence is one backtick longer than the longest run of backticks in the text;
    a text that starts or ends with a backtick or a space is padded with one space on
    each side inside the fence (CommonMark strips one from each side).
    """
    text = " ".join(str(text).splitlines())
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text[:1] in ("`", " ") or text[-1:] in ("`", " ") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def with_ci(mean, low=None, high=None, digits: int = 2) -> str:
    """A mean and its 95% CI, ``0.75 [0.71, 0.79]``; the mean alone where there is no CI."""
    if mean is None or low is None or high is None:
        return _fmt(mean, digits)
    return f"{_fmt(mean, digits)} [{_fmt(low, digits)}, {_fmt(high, digits)}]"


def _bg_gap(probe: dict | None) -> str:
    return with_ci(**_ci(probe, "bg_gap")) if probe else "n/a"


def _support(entry: dict) -> str:
    """A class's row count, with its zero maps (correct rows whose true-label map is
    zero everywhere: left out of the means, so they are shown)."""
    zero = entry["true_label"].get("n_zero_map") or 0
    maps = "zero map" if zero == 1 else "zero maps"
    return f"{entry['n']} ({zero} {maps} among the correct)" if zero else str(entry["n"])


def interventions_text(probe: dict) -> str:
    """The class card's sentence on its interventions, each rate with its 95% CI."""
    swapped = f"background swapped {_rate(probe, 'mixed_rand')}; BG-gap {_bg_gap(probe)}."
    head = f"Interventions on {probe['n_probe']} correct images: still predicted with the "
    if probe.get("rate_object_only") is None and probe.get("rate_background_only") is None:
        return (
            head + swapped + " The object-only and background-only "
            "diagnostics run only for classes with a finding (policy.intervention_details)."
        )
    # The diagnostics run on the first look (runs from before that have no n_details).
    details = probe.get("n_details", probe["n_probe"])
    rates = (
        f"predicted with the object only {_rate(probe, 'object_only')}, with the "
        f"background only {_rate(probe, 'background_only')}."
    )
    if details < probe["n_probe"]:
        return head + swapped + f" On {details} of them (the first look), still {rates}"
    return head + swapped + f" Still {rates}"


def transplant_text(probe: dict) -> str | None:
    """The class card's sentence on the transplant test (None where it did not run)."""
    if not probe.get("n_transplant"):
        return None
    return (
        f"Transplant test on {probe['n_transplant']} images predicted as the class: with "
        f"another class's object in place of theirs, still predicted as it "
        f"{with_ci(**_ci(probe, 'transplant'))}, other classes' median "
        f"{_fmt(probe.get('transplant_median_others'))}; excess "
        f"{with_ci(**_ci(probe, 'transplant_excess'))}."
    )


def _rate(probe: dict, name: str) -> str:
    """A class's prediction rate under one intervention with its 95% CI (n/a where it
    did not run: the diagnostics run only for classes with a finding by default)."""
    return with_ci(**_ci(probe, f"rate_{name}"))


def unreadable_examples(report: dict) -> int:
    """How many of the report's example images cannot be opened under the dataset root."""
    root = Path(report["dataset"]["root"])
    count = 0
    for entry in report["classes"]:
        for example in entry["examples"]:
            try:
                with Image.open(root / example["path"]):
                    pass
            except OSError:
                count += 1
    return count


def unreadable_note(count: int, root) -> str:
    """The plain-text note for example images that cannot be read (escape it to show it)."""
    images = "example image" if count == 1 else "example images"
    where = str(root)
    if not Path(root).is_absolute():
        where += f" (a relative path, looked up from {Path.cwd()})"
    return f"{count} {images} could not be read from {where}"


def _decision_text(entry: dict) -> str:
    decision = entry["decision"]
    return (
        f"reviewer decision: {CHOICES.get(decision['decision'], decision['decision'])} by "
        f"{decision['reviewer']} on {decision['decided_at'][:10]} (run {decision['run_id']})"
        + (f": {decision['note']}" if decision["note"] else "")
    )


def status_text(entry: dict) -> str:
    """A class's status as shown: ``ok (untested)`` when no test had enough images."""
    if entry["status"] == "ok" and entry.get("tested") is False:
        return "ok (untested)"
    return entry["status"]


def untested_note(report: dict) -> str | None:
    """Which classes no test could judge (too few measured images), or None: ``7 of 10
    classes untested: ...`` among the classes with audited images, then those with none."""
    audited, untested = untested_classes(report["classes"])
    empty = [e for e in report["classes"] if not e["n"] and e.get("tested") is False]
    if not untested and not empty:
        return None

    def names(entries: list[dict]) -> str:
        shown = [str(entry["class_name"]) for entry in entries[:8]]
        return ", ".join(shown) + (", ..." if len(entries) > 8 else "")

    parts = []
    if untested:
        support = report.get("policy", {}).get("min_support", 20)
        of = f"the {len(audited)} audited classes" if empty else f"{len(audited)} classes"
        parts.append(
            f"{len(untested)} of {of} untested: {names(untested)} (fewer than {support} "
            "measured images for any test; their ok is no evidence of health)"
        )
    if empty:
        parts.append(f"{len(empty)} class(es) with no audited image: {names(empty)}")
    return "; ".join(parts)


def outcome_reason(report: dict) -> str | None:
    """Why a run is INCONCLUSIVE (its untested classes); None for any other outcome."""
    return untested_note(report) if report["outcome"] == INCONCLUSIVE else None


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


def trust_lines(trust: dict | None) -> list[str]:
    """The trust checks as plain sentences (Markdown, HTML and the dashboard use them)."""
    if not trust:
        return [
            "Trust checks were not run (trust.samples: 0, fewer than 2 images or classes, "
            "or a run from a version without them)."
        ]
    randomisation = trust["randomisation"]
    logit = trust["random_logit"]
    faith = trust["faithfulness"]
    stages = ", ".join(
        f"{stage['layers_randomised']} layers: {_fmt(stage['correlation'])}"
        for stage in randomisation["stages"]
    )
    logit_ci, gain_ci = logit["ci"], faith["gain_ci"]
    return [
        f"Verdict: {trust['verdict']} ({trust['layer']}, {trust['method']}, "
        f"{trust['samples']} images).",
        f"Model-parameter randomisation ({randomisation['status']}): mean Spearman correlation "
        f"with the trained model's maps after randomising the top layers: {stages}; "
        f"threshold {randomisation['threshold']} at every stage.",
        f"Random logit ({logit['status']}): a random other class's maps correlate "
        f"{_fmt(logit['correlation'])} [{_fmt(logit_ci[0])}, {_fmt(logit_ci[1])}]; "
        f"threshold {logit['threshold']}.",
        f"Faithfulness ({faith['status']}, {faith['baseline']} baseline, {faith['steps']} "
        f"steps): deletion AUC {_fmt(faith['deletion_auc'], 3)} vs "
        f"{_fmt(faith['deletion_auc_random'], 3)} for a random map, insertion AUC "
        f"{_fmt(faith['insertion_auc'], 3)} vs {_fmt(faith['insertion_auc_random'], 3)}; gain "
        f"{_fmt(faith['gain'], 3)} [{_fmt(gain_ci[0], 3)}, {_fmt(gain_ci[1], 3)}].",
        *(f"Reason: {reason}." for reason in trust["reasons"]),
    ]


def slice_flag_text(test: dict, escaped) -> str:
    """One flagged slice test and its judgement (``judge_slice_flags``); ``escaped``
    makes the user's names safe (_md, escape, or str for the terminal)."""
    drives = test.get("drives")
    if drives is not None and len(drives):
        judgement = f"drives predictions of {escaped(', '.join(map(str, drives)))}; fail"
    elif test.get("ruled_out"):
        judgement = "its predictions do not follow it (every class's difference ruled out)"
    else:
        judgement = "warn"
    return (
        f"{escaped(str(test['attribute']))} = {escaped(str(test['value']))}: "
        f"{test['statistic']} on {escaped(str(test['region']))} "
        f"{_fmt(test['group_mean'], 3)} vs {_fmt(test['reference_mean'], 3)} (difference CI "
        f"[{_fmt(test['effect_low'], 3)}, {_fmt(test['effect_high'], 3)}], "
        f"q={test['q_value']:.2g}; {judgement})"
    )


def drives_text(association: dict, escaped) -> str:
    """'background=stripes drives predictions of 3: 45% of its images of other classes
    vs 2% elsewhere', with the difference's CI and the class's own accuracy gap."""
    name = escaped(str(association["class_name"]))
    return (
        f"{escaped(str(association['attribute']))}={escaped(str(association['value']))} drives "
        f"predictions of {name}: {_fmt(100 * association['rate_slice'], 0)}% of its images of "
        f"other classes vs {_fmt(100 * association['rate_rest'], 0)}% elsewhere (difference "
        f"{with_ci(association['rd'], association['rd_low'], association['rd_high'])}, "
        f"q={association['q_value']:.2g}); {name} is right on "
        f"{_fmt(100 * association['accuracy_slice'], 0)}% of its own images there vs "
        f"{_fmt(100 * association['accuracy_rest'], 0)}%"
    )


def _transplant(probe: dict | None) -> str:
    """The transplant rate's excess over the other classes' median, with its CI."""
    if not probe or probe.get("transplant_excess") is None:
        return "n/a"
    return with_ci(**_ci(probe, "transplant_excess"))


def main_map_text(view: dict, regions: list[str]) -> str:
    """Counterfactual mass and weak localisation of a class's correct images (if measured)."""
    parts = []
    counter = view.get("counterfactual_mass") or {}
    intervals = view.get("counterfactual_mass_ci") or {}
    if any(counter.get(region) is not None for region in regions):
        shares = ", ".join(
            f"{region} {with_ci(**intervals.get(region, {'mean': counter.get(region)}))}"
            for region in regions
        )
        parts.append(f"Counterfactual map (what argues against the class): mass {shares}.")
    if view.get("loc_error") is not None:
        parts.append(
            f"Weak localisation: mean box IoU {with_ci(**_ci(view, 'loc_iou'))}, "
            f"localisation error {with_ci(**_ci(view, 'loc_error'))}, top-1 localisation "
            f"error {with_ci(**_ci(view, 'top1_loc_error'))}."
        )
    return " ".join(parts)


def _trust_markdown(trust: dict | None, guided: str | None) -> list[str]:
    lines = ["", "### Trust in the maps"]
    lines += [f"- {_md(line)}" for line in trust_lines(trust)]
    if trust and trust["verdict"] == "untrusted":
        lines.append("- **Every heatmap flag above has low confidence.**")
    if guided:
        lines.append(f"- {_md(guided)}")
    return lines


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
            + "".join(f"<td>{with_ci(**_ci(group, f'mass_{r}'))}</td>" for r in spurious)
            + "</tr>"
        )
    parts.append("</table>")
    return "".join(parts)


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
