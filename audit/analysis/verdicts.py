"""The class verdicts: every causal test's evidence under one Benjamini-Hochberg
correction, slice flags judged by their associations, and the decision table that
makes a class bias-driven, suspected or ok (docs/flags.md).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from audit.analysis.flags import benjamini_hochberg
from audit.analysis.tables import Analysis
from audit.config.decisions import PolicySection

SEVERITY_ORDER = {"none": 0, "warn": 1, "fail": 2}


# The causal tests of a class: (p-value column, its images' count column, CI-gated
# evidence column, its own evidence column after the run's Benjamini-Hochberg
# correction, q-value column).
CAUSAL_TESTS = (
    (
        "bg_gap_p_value",
        "n_mixed_rand",
        "intervention_evidence",
        "mixed_rand_evidence",
        "bg_gap_q_value",
    ),
    (
        "transplant_p_value",
        "n_transplant",
        "transplant_evidence",
        "transplant_evidence",
        "transplant_q_value",
    ),
)


def causal_evidence(
    interventions: pd.DataFrame, associations: pd.DataFrame, policy
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Benjamini-Hochberg across every causal test of the run (Mixed-Rand and the
    transplant test per class, each slice value x class association), and the evidence
    each gives: q < ``alpha`` and the CI's lower bound above ``gap_floor``.

    Only tests with the support to give evidence are corrected for (a class with fewer
    than ``min_support`` probed images is not tested). Adds ``*_q_value`` columns,
    ``mixed_rand_evidence``, ``transplant_evidence`` and ``intervention_evidence``
    (either) to the interventions, ``q_value``, ``evidence`` and ``ruled_out`` to the
    associations (there the effect may clear the floor in false positives or in the
    class's accuracy excess; ``audit.analysis.associations``).
    """
    interventions, associations = interventions.copy(), associations.copy()
    support = min(policy.min_support, policy.intervention_samples)
    parts = []  # (table, p-value column, eligible rows)
    for p_column, count, _, _, _ in CAUSAL_TESTS:
        if p_column in interventions:
            parts.append((interventions, p_column, interventions[count].fillna(0) >= support))
    if len(associations):
        parts.append((associations, "p_value", associations["p_value"].notna()))
    p_values = np.concatenate(
        [np.where(eligible, table[column], np.nan) for table, column, eligible in parts] or [[]]
    )
    q_values = benjamini_hochberg(p_values)
    start = 0
    for table, column, _ in parts:
        table[column.replace("p_value", "q_value")] = q_values[start : start + len(table)]
        start += len(table)
    if len(interventions):
        for _, _, gate, name, q_column in CAUSAL_TESTS:
            if gate in interventions:
                passed = interventions[gate].fillna(False).astype(bool)
                interventions[name] = passed & (interventions[q_column] < policy.alpha)
            else:
                interventions[name] = False
        interventions["intervention_evidence"] = (
            interventions["mixed_rand_evidence"] | interventions["transplant_evidence"]
        )
    if len(associations):
        # The slice must raise false predictions of c (the test), and the effect must
        # clear the floor in those or in c's own accuracy gain beyond the other
        # classes' (a class right almost only on its shortcut gains most there).
        large = (associations["rd_low"] > policy.gap_floor) | (
            associations["accuracy_excess_low"].fillna(-np.inf) > policy.gap_floor
        )
        associations["evidence"] = (associations["q_value"] < policy.alpha) & large
        associations["ruled_out"] = ~associations["evidence"] & (
            associations["rd_high"] <= policy.gap_floor
        )
    return interventions, associations


def forward_passes(interventions: pd.DataFrame) -> dict[str, int]:
    """The forward passes each causal test spent (one per probed image and variant);
    the slice associations read the audit pass's predictions and spend none."""

    def total(column: str) -> int:
        return int(interventions[column].fillna(0).sum()) if column in interventions else 0

    return {
        "mixed_rand": total("n_mixed_rand"),
        "mixed_same": total("n_bg_gap_same"),  # heatmap-flagged classes only
        "diagnostics": 2 * total("n_details"),  # object only and background only
        "transplant": total("n_transplant"),
        "associations": 0,
    }


def judge_slice_flags(flags: pd.DataFrame, associations: pd.DataFrame, policy) -> pd.DataFrame:
    """A flagged slice's severity from its associations: ``fail`` when it drives a class
    (its ``drives`` lists them), ``none`` when every class's risk difference is ruled
    out (CI upper bound at most ``gap_floor``: its maps differ but its predictions do
    not), ``warn`` otherwise (heatmap evidence only)."""
    if not len(flags) or "attribute" not in flags:
        return flags
    flags = flags.copy()
    flags["drives"] = [[] for _ in range(len(flags))]
    flags["ruled_out"] = False
    if not len(associations):
        return flags
    for position, test in enumerate(flags.itertuples()):
        if test.kind != "slice":
            continue
        mine = associations[
            (associations["attribute"] == test.attribute) & (associations["value"] == test.value)
        ]
        if not len(mine):
            continue
        driven = mine.loc[mine["evidence"], "class_name"].tolist()
        flags.at[flags.index[position], "drives"] = driven
        flags.at[flags.index[position], "ruled_out"] = not driven and bool(mine["ruled_out"].all())
        if test.flagged:
            severity = "fail" if driven else "none" if mine["ruled_out"].all() else "warn"
            flags.at[flags.index[position], "severity"] = severity
    return flags


def _true(value) -> bool:
    """A stored flag that is set (a missing value, NaN in a merged table, is not)."""
    return isinstance(value, (bool, np.bool_)) and bool(value)


def _interval(value, low, high) -> str:
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def _ruled_out(probe, count: str, excess_high: str, policy: dict) -> bool:
    """A causal test that ran on ``min_support`` images and whose excess's CI upper
    bound is at most ``gap_floor``: it had the power to see a shortcut, and saw none."""
    if probe is None or pd.isna(probe.get(count)) or pd.isna(probe.get(excess_high)):
        return False
    return probe[count] >= policy["min_support"] and probe[excess_high] <= policy["gap_floor"]


def _excess_text(probe: dict, label: str, name: str, count: str, evidence: str) -> str:
    """``label`` with the excess of ``name`` over the other classes' median, its CI and
    the images behind it (``evidence`` marks it)."""
    excess = _interval(
        probe[f"{name}_excess"], probe[f"{name}_excess_low"], probe[f"{name}_excess_high"]
    )
    mark = " evidence" if _true(probe.get(evidence)) else ""
    return f"{label} excess {excess} (n={int(probe[count])}){mark}"


def _evidence_chain(probe, heatmap_rows, driving) -> str:
    """The class's tests and their numbers, in one line a reviewer can read."""
    parts = []
    if len(heatmap_rows):
        row = heatmap_rows.iloc[0]
        effect = _interval(row.effect, row.effect_low, row.effect_high)
        flagged = " flagged" if heatmap_rows["flagged"].any() else ""
        parts.append(
            f"heatmap {row.statistic} on {row.region} {row.group_mean:.2f} vs "
            f"{row.reference_mean:.2f}, difference {effect}{flagged}"
        )
    if probe is not None and probe.get("n_mixed_rand", 0) > 0:
        parts.append(
            _excess_text(
                probe, "Mixed-Rand BG-gap", "bg_gap", "n_mixed_rand", "mixed_rand_evidence"
            )
        )
    if probe is not None and probe.get("n_bg_gap_same", 0) > 0:
        gap = _interval(probe["bg_gap_same"], probe["bg_gap_same_low"], probe["bg_gap_same_high"])
        parts.append(f"Mixed-Same minus Mixed-Rand {gap} (n={int(probe['n_bg_gap_same'])})")
    if probe is not None and probe.get("n_transplant", 0) > 0:
        label = f"transplant rate {probe['transplant']:.2f}"
        parts.append(
            _excess_text(probe, label, "transplant", "n_transplant", "transplant_evidence")
        )
    for row in driving.itertuples():
        difference = _interval(row.rd, row.rd_low, row.rd_high)
        parts.append(
            f"slice {row.attribute}={row.value} predicts it for {row.rate_slice:.0%} of "
            f"other classes' images vs {row.rate_rest:.0%}, difference {difference} evidence"
        )
    return "; ".join(parts) if parts else "no test had enough images"


def class_verdicts(
    analysis: Analysis, class_names: list[str], policy: dict | None = None
) -> list[dict]:
    """Status per class, by the decision table of docs/flags.md:

    * ``bias-driven`` (fail): a causal test is evidence: Mixed-Rand (the class needs its
      background), the transplant test (backgrounds produce the class) or a slice
      association (a slice drives predictions of the class);
    * ``ok`` with a note: a heatmap flag that both interventions rule out with power
      (``_ruled_out``): thin objects put map mass around themselves with no shortcut;
    * ``suspected`` (warn): any other heatmap flag;
    * ``ok``: neither. ``tested`` is false when no test had enough images.

    ``policy``: the run's policy settings (``min_support``, ``gap_floor``; the
    defaults where missing).
    """
    policy = {**PolicySection().model_dump(), **(policy or {})}
    flags = analysis.flags
    interventions = analysis.interventions
    associations = analysis.associations
    untrusted = analysis.trust is not None and analysis.trust.get("verdict") == "untrusted"
    verdicts = []
    for index, name in enumerate(class_names):
        mine = flags[flags["class_index"] == index] if len(flags) else flags
        class_flags = mine[mine["flagged"].astype(bool)] if len(mine) else mine
        found = interventions[interventions["class_index"] == index] if len(interventions) else []
        probe = found.iloc[0].to_dict() if len(found) else None
        driving = (
            associations[(associations["class_index"] == index) & associations["evidence"]]
            if len(associations)
            else associations
        )
        reasons = [
            f"{'predicted' if row.kind == 'pred' else 'true'}-label {row.statistic} on "
            f"{row.region} {row.group_mean:.3f} vs {row.reference_mean:.3f} "
            f"(difference CI [{row.effect_low:.3f}, {row.effect_high:.3f}], q={row.q_value:.2g})"
            for row in class_flags.itertuples()
        ]
        heatmap = len(class_flags) > 0
        # Runs stored before the transplant test called Mixed-Rand's evidence
        # intervention_evidence.
        mixed_rand = bool(probe) and _true(
            probe.get("mixed_rand_evidence", probe.get("intervention_evidence"))
        )
        transplant = bool(probe) and _true(probe.get("transplant_evidence"))
        if mixed_rand:
            reasons.append(
                f"Mixed-Rand: BG-gap {probe['bg_gap']:.2f} (CI [{probe['bg_gap_low']:.2f}, "
                f"{probe['bg_gap_high']:.2f}]) vs other classes' median "
                f"{probe['bg_gap_median_others']:.2f} (excess CI "
                f"[{probe['bg_gap_excess_low']:.2f}, {probe['bg_gap_excess_high']:.2f}], "
                f"q={probe['bg_gap_q_value']:.2g}): the class needs its background"
            )
        if transplant:
            reasons.append(
                f"transplant: other classes' objects on backgrounds of images predicted as "
                f"{name} are predicted as {name} at {probe['transplant']:.2f} (CI "
                f"[{probe['transplant_low']:.2f}, {probe['transplant_high']:.2f}]) vs other "
                f"classes' median {probe['transplant_median_others']:.2f} (excess CI "
                f"[{probe['transplant_excess_low']:.2f}, {probe['transplant_excess_high']:.2f}], "
                f"q={probe['transplant_q_value']:.2g}): its backgrounds produce the class"
            )
        for row in driving.itertuples():
            reasons.append(
                f"{row.attribute}={row.value} drives predictions of {name}: "
                f"{row.rate_slice:.0%} of its images of other classes are predicted as {name} "
                f"vs {row.rate_rest:.0%} elsewhere, class by class (difference CI "
                f"[{row.rd_low:.2f}, {row.rd_high:.2f}], q={row.q_value:.2g}); {name} itself "
                f"is right on {row.accuracy_slice:.0%} of its {row.attribute}={row.value} "
                f"images vs {row.accuracy_rest:.0%} of the others"
            )
        causal = mixed_rand or transplant or len(driving) > 0
        # Mixed-Rand rules a shortcut out by its excess over the other classes' BG-gaps
        # or, for a heatmap flag, by Mixed-Same's BG-gap on the same images.
        ruled_out = not causal and (
            (
                _ruled_out(probe, "n_mixed_rand", "bg_gap_excess_high", policy)
                or _ruled_out(probe, "n_bg_gap_same", "bg_gap_same_high", policy)
            )
            and _ruled_out(probe, "n_transplant", "transplant_excess_high", policy)
        )
        # A class whose groups were too small for any test has no evidence either way.
        tested = bool(
            ("p_value" in mine and mine["p_value"].notna().any())
            or (probe and probe.get("n_mixed_rand", 0) >= policy["min_support"])
            or (probe and probe.get("n_transplant", 0) >= policy["min_support"])
            or causal
        )
        if causal:
            status, severity = "bias-driven", "fail"
            if not heatmap:
                reasons.append(
                    "heatmap mass does not stand out (thin objects put mass outside their "
                    "masks, and a shortcut on rare images moves a class's mean little); the "
                    "causal tests show the dependence"
                )
        elif heatmap and ruled_out:
            status, severity = "ok", "none"
            reasons.append(
                "the heatmap flag is not a shortcut: neither swapping the background "
                "(Mixed-Rand, against the other classes or against Mixed-Same) nor "
                "transplanting other objects onto its backgrounds moves predictions by "
                f"{policy['gap_floor']:.2f} or more (the CIs' upper bounds are below it); "
                "a thin object puts map mass around itself"
            )
        elif heatmap:
            # Heatmap evidence alone: thin objects put mass around themselves with no
            # shortcut at all, so a suspect warns and only causal tests fail a run.
            status, severity = "suspected", "warn"
        else:
            status, severity = "ok", "none"
        confidence = "normal"
        if heatmap and untrusted:
            confidence = "low"
            reasons.append(
                "low confidence in the heatmap evidence: the maps failed the trust checks ("
                + "; ".join(analysis.trust["reasons"])
                + ")"
            )
        heatmap_rows = mine[mine["p_value"].notna()] if "p_value" in mine else mine.iloc[:0]
        if len(heatmap_rows):
            heatmap_rows = heatmap_rows.sort_values("flagged", ascending=False, kind="stable")
        verdicts.append(
            {
                "class_index": index,
                "class_name": name,
                "status": status,
                "severity": severity,
                "reasons": reasons,
                "evidence": _evidence_chain(probe, heatmap_rows, driving),
                "heatmap_evidence": heatmap,
                "intervention_evidence": mixed_rand or transplant,
                "causal_evidence": bool(causal),
                "ruled_out": bool(ruled_out),
                "tested": tested,
                "confidence": confidence,
            }
        )
    return verdicts


def overall_severity(verdicts: list[dict], flags: pd.DataFrame) -> str:
    severities = [v["severity"] for v in verdicts]
    if len(flags):
        slice_flags = flags[(flags["kind"] == "slice") & flags["flagged"].astype(bool)]
        severities.extend(slice_flags["severity"])
    return max(severities, key=SEVERITY_ORDER.get, default="none")
