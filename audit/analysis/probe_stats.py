"""The interventions' and the transplant test's rates, gaps and excesses with their
CIs, and when sequential sampling may stop (a class is settled).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import norm

from audit.analysis.fill import INTERVENTIONS
from audit.analysis.intervals import rate_with_ci
from audit.analysis.probes import REFERENCE_LOOKS
from audit.config.decisions import PolicySection


def summarise_interventions(
    outcomes: pd.DataFrame, class_names: Sequence[str], policy: PolicySection
) -> pd.DataFrame:
    """Per class: prediction rate under each intervention, BG-gap with CI, evidence."""
    rows = []
    if not len(outcomes):
        return pd.DataFrame(rows)
    gaps, reference = {}, {}
    outcomes = outcomes.reindex(
        columns=[
            *outcomes.columns,
            *(f"pred_{n}" for n in INTERVENTIONS if f"pred_{n}" not in outcomes),
        ]
    )
    for label, group in outcomes.groupby("label_index"):
        # Only the interventions a row went through count (none: NaN); rows without a
        # Mixed-Rand partner have no swapped-background result.
        kept = {
            name: (group[f"pred_{name}"].dropna() == label).to_numpy(float)
            for name in INTERVENTIONS
        }
        paired = group[group["pred_mixed_rand"].notna()]
        gaps[int(label)] = 1.0 - kept["mixed_rand"]  # the original is right on every row
        record = {"class_index": int(label), "class_name": class_names[int(label)]}
        record["n_probe"] = len(group)
        record["n_mixed_rand"] = len(paired)
        record["n_details"] = int(group["pred_object_only"].notna().sum())
        for name in INTERVENTIONS:
            record.update(rate_with_ci(kept[name], f"rate_{name}"))
        record["bg_gap"] = float(gaps[int(label)].mean()) if len(paired) else np.nan
        # The other classes are compared with each class's reference looks alone:
        # sequential sampling stops classes whose gap happens to look small, so their
        # final gaps lean low, and a median of them would make every other class stand
        # out more.
        first = paired[paired["look"] < REFERENCE_LOOKS] if "look" in paired else paired
        reference[int(label)] = (int((first["pred_mixed_rand"] != label).sum()), len(first))
        # A rate's interval (Wilson's, of the Mixed-Rand rate): a bootstrap of 0/1
        # outcomes collapses at 0 and 1 and let clean classes look bias-driven.
        record["bg_gap_low"] = 1.0 - record["rate_mixed_rand_high"]
        record["bg_gap_high"] = 1.0 - record["rate_mixed_rand_low"]
        both = group[group["pred_mixed_rand"].notna() & group["pred_mixed_same"].notna()]
        record.update(
            paired_gap(
                (both["pred_mixed_same"] == label).to_numpy(),
                (both["pred_mixed_rand"] == label).to_numpy(),
                "bg_gap_same",
            )
        )
        rows.append(record)
    add_excess(rows, "bg_gap", reference, seed=policy.seed)
    return _with_evidence(
        pd.DataFrame(rows), "intervention_evidence", "bg_gap", "n_mixed_rand", policy
    )


def _with_evidence(table, column: str, name: str, count: str, policy: PolicySection):
    """``table`` with ``column``: the excess's CI lower bound is above ``gap_floor`` on
    enough images (before the run's Benjamini-Hochberg correction)."""
    enough = table[count] >= min(policy.min_support, policy.intervention_samples)
    table[column] = (table[f"{name}_excess_low"] > policy.gap_floor) & enough
    return table


def paired_gap(first: np.ndarray, second: np.ndarray, name: str) -> dict:
    """``rate(first) - rate(second)`` over the same images (0/1 outcomes of each), with a
    95% interval for a paired difference (Agresti and Min's: half an image added to each
    discordant cell), and its count ``n_<name>``; NaN for no images."""
    count = len(first)
    if not count:
        return {f"n_{name}": 0, name: np.nan, f"{name}_low": np.nan, f"{name}_high": np.nan}
    gained = float((first & ~second).sum()) + 0.5
    lost = float((~first & second).sum()) + 0.5
    trials = count + 2
    centre = (gained - lost) / trials
    half = norm.ppf(0.975) * np.sqrt((gained + lost) - (gained - lost) ** 2 / trials) / trials
    return {
        f"n_{name}": count,
        name: float(first.mean() - second.mean()),
        f"{name}_low": max(-1.0, centre - half),
        f"{name}_high": min(1.0, centre + half),
    }


def add_excess(
    records: list[dict], name: str, reference: dict[int, tuple[int, int]], *, seed: int
) -> None:
    """Each record's ``name`` (a rate with ``name_low``/``name_high``) against the median
    of the other classes' reference counts (``class_index -> (events, trials)``), in place:
    ``name_median_others``, ``name_excess`` with its 95% interval (``_low``, ``_high``)
    and the one-sided p-value of excess > 0 (``name_p_value``).

    The interval combines the class's own with the median's (MOVER, Newcombe's method
    for a difference): with two or three classes the median is one or two classes'
    looks, far from exact. The p-value reads the interval's lower reach as 1.96
    standard errors (normal approximation).
    """
    for record in records:
        others = [
            counts
            for index, counts in reference.items()
            if index != record["class_index"] and counts[1] > 0
        ]
        median, low, high = median_rate_interval(others, seed=seed)
        value = record[name]
        difference = value - median
        below = np.hypot(value - record[f"{name}_low"], high - median)
        record[f"{name}_median_others"] = median
        record[f"{name}_excess"] = difference
        record[f"{name}_excess_low"] = difference - below
        record[f"{name}_excess_high"] = difference + np.hypot(
            record[f"{name}_high"] - value, median - low
        )
        if not np.isfinite(difference):
            p_value = np.nan
        elif below > 0:
            p_value = float(norm.sf(difference / (below / norm.ppf(0.975))))
        else:
            p_value = float(difference <= 0)
        record[f"{name}_p_value"] = p_value


def summarise_transplants(
    outcomes: pd.DataFrame, class_names: Sequence[str], policy: PolicySection
) -> pd.DataFrame:
    """Per predicted class c: the rate at which transplanted composites (another class's
    object on a background of an image predicted as c) are predicted as c, with its
    Wilson interval, its excess over the other classes' median (``add_excess``) and the
    CI-gated evidence (before the run's Benjamini-Hochberg correction)."""
    if not len(outcomes):
        return pd.DataFrame()
    rows, reference = [], {}
    for label, group in outcomes.groupby("pred"):
        label = int(label)
        paired = group[group["pred_transplant"].notna()]
        hits = (paired["pred_transplant"] == label).to_numpy(float)
        record = {"class_index": label, "class_name": class_names[label]}
        record["n_transplant"] = len(paired)
        record.update(rate_with_ci(hits, "transplant"))
        # Against the others' reference looks alone, as for Mixed-Rand.
        first = paired[paired["look"] < REFERENCE_LOOKS] if "look" in paired else paired
        reference[label] = (int((first["pred_transplant"] == label).sum()), len(first))
        rows.append(record)
    add_excess(rows, "transplant", reference, seed=policy.seed)
    return _with_evidence(
        pd.DataFrame(rows), "transplant_evidence", "transplant", "n_transplant", policy
    )


def median_rate_interval(
    counts: Sequence[tuple[int, int]], *, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """The median of several rates, each ``(events, trials)``, with a 95% interval.

    A parametric bootstrap: each count is redrawn from its Agresti-Coull rate
    (``(events + 2) / (trials + 4)``, so a rate of 0 of 40 still varies), and the
    interval's reach below and above comes from the redrawn medians around their own
    median. No rates: the median is 0, exactly (nothing to compare with).
    """
    if not counts:
        return 0.0, 0.0, 0.0
    events = np.array([c[0] for c in counts], dtype="float64")
    trials = np.array([c[1] for c in counts], dtype="float64")
    median = float(np.median(events / trials))
    rng = np.random.default_rng(seed)
    adjusted = (events + 2) / (trials + 4)
    draws = np.median(
        rng.binomial(trials.astype(int), adjusted, (resamples, len(counts))) / trials, axis=1
    )
    centre = np.median(draws)
    low, high = np.quantile(draws, [0.025, 0.975])
    return median, max(0.0, median - (centre - low)), min(1.0, median + (high - centre))


def _settled(table: pd.DataFrame, count: str, excess_high: str, policy: PolicySection) -> set[int]:
    """Classes with at least ``min_support`` results whose excess has a CI upper bound of
    at most ``gap_floor`` (more images could hardly make them evidence), and classes
    with no result at all (no partner class)."""
    if not len(table):
        return set()
    futile = (table[count] >= policy.min_support) & (table[excess_high] <= policy.gap_floor)
    return set(table.loc[futile | (table[count] == 0), "class_index"].astype(int))


def settled_classes(
    outcomes: pd.DataFrame, class_names: Sequence[str], policy: PolicySection
) -> set[int]:
    """The classes sequential Mixed-Rand sampling stops probing (``_settled`` on the
    excess BG-gap over the other classes' median). Classes that may be bias-driven go
    on up to ``intervention_samples``.
    """
    table = summarise_interventions(outcomes, class_names, policy)
    return _settled(table, "n_mixed_rand", "bg_gap_excess_high", policy)


def settled_transplants(
    outcomes: pd.DataFrame, class_names: Sequence[str], policy: PolicySection
) -> set[int]:
    """The predicted classes sequential transplant sampling stops probing (``_settled``
    on the excess transplant rate)."""
    table = summarise_transplants(outcomes, class_names, policy)
    return _settled(table, "n_transplant", "transplant_excess_high", policy)
