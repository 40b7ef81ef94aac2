"""The report's sentences, shared by report.md, report.html, the run summary and the
dashboard; ``escaped`` arguments make the user's names safe for each.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from PIL import Image

from audit.measure import spec
from audit.report.build import _ci, metric_cis
from audit.report.outcome import INCONCLUSIVE, untested_classes
from audit.runs.decisions import CHOICES

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


def measure_rows(view: dict, regions: list[str]) -> list[tuple[str, list[str]]]:
    """Every aggregated metric of a report's class view (``audit.measure.spec``), one
    ``(name, ["mean [low, high]" per region])`` each; a metric the run did not measure
    (a run made before it was added) is left out."""
    rows = []
    for metric in spec.metrics(aggregated=True):
        cis = metric_cis(view, metric)
        if cis:
            rows.append((metric.name, [with_ci(**cis[r]) if r in cis else "n/a" for r in regions]))
    return rows
