"""Flag: which groups put more map mass on spurious regions than their reference?

For every group (true class, predicted class, slice value) with enough support and
every spurious region R:

1. the statistic (``mass_R`` or ``lift_R``) of the group's measured rows is compared
   with a reference: the other groups of the same kind in this run (for slices, the
   other values of the same attribute), or the same group in a baseline run;
2. a one-sided Mann-Whitney U test (group > reference) gives a p-value, and
   Benjamini-Hochberg across all the run's tests gives q-values;
3. a bootstrap 95% CI of the difference of means (group - reference) is computed;
4. the group is flagged when q < alpha **and** the CI's lower bound exceeds the
   effect-size floor (a point estimate alone never flags).

A flag is heatmap evidence only: it makes a class "suspected" (severity warn) until
the interventions confirm it (``audit.analyse.class_verdicts``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control, mannwhitneyu

from audit.aggregate import RESAMPLE_CHUNK, Aggregator, percentile_interval, resampled_means
from audit.config import PolicySection

EXAMPLES_PER_FLAG = 5


def bootstrap_difference_ci(
    group: np.ndarray, reference: np.ndarray, *, resamples: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(group) - mean(reference), resampling each side."""
    rng = np.random.default_rng(seed)
    differences = np.empty(resamples)
    for start in range(0, resamples, RESAMPLE_CHUNK):
        stop = min(start + RESAMPLE_CHUNK, resamples)
        size = stop - start
        group_means = group[rng.integers(0, len(group), (size, len(group)))].mean(axis=1)
        differences[start:stop] = group_means - resampled_means(reference, size, rng)
    return percentile_interval(differences, level)


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """BH q-values (scipy's implementation); NaN p-values stay NaN."""
    p_values = np.asarray(p_values, dtype="float64")
    q_values = np.full_like(p_values, np.nan)
    tested = np.isfinite(p_values)
    if tested.any():
        q_values[tested] = false_discovery_control(p_values[tested], method="bh")
    return q_values


@dataclass(frozen=True)
class _Sample:
    rows: np.ndarray
    values: np.ndarray


def _measured(aggregator: Aggregator, identity: tuple, statistic: str, region: str) -> _Sample:
    rows, correct, values = aggregator.groups[identity].arrays()
    kind = identity[0]
    column = aggregator.column(kind, statistic, region)
    use = correct if kind in ("true", "class_slice") else np.ones_like(correct)
    column_values = values[column][use]
    finite = np.isfinite(column_values)
    return _Sample(rows[use][finite], column_values[finite])


def _reference_identities(aggregator: Aggregator, identity: tuple) -> list[tuple]:
    kind, _, attribute, _ = identity
    return [
        other
        for other in aggregator.groups
        if other != identity and other[0] == kind and (kind != "slice" or other[2] == attribute)
    ]


def evaluate_flags(
    aggregator: Aggregator,
    class_names: list[str],
    spurious_regions: list[str],
    policy: PolicySection,
    baseline: Aggregator | None = None,
) -> pd.DataFrame:
    """One row per (group, spurious region) test with its numbers and verdict."""
    tests = []
    for identity in sorted(aggregator.groups, key=lambda key: (str(key[0]), str(key[1:]))):
        kind, class_index, attribute, value = identity
        if kind == "class_slice":
            continue  # reported in tables; too many small groups to test
        for region in spurious_regions:
            measure = (policy.statistic, region)
            group = _measured(aggregator, identity, *measure)
            if baseline is not None:
                if identity not in baseline.groups:
                    continue
                reference = _measured(baseline, identity, *measure).values
                reference_name = "baseline run, same group"
            else:
                others = [
                    _measured(aggregator, other, *measure).values
                    for other in _reference_identities(aggregator, identity)
                ]
                reference = np.concatenate(others) if others else np.zeros(0)
                reference_name = "other groups of this run"
            record = {
                "kind": kind,
                "class_index": class_index,
                "class_name": None if class_index is None else class_names[class_index],
                "attribute": attribute,
                "value": value,
                "region": region,
                "statistic": policy.statistic,
                "reference": reference_name,
                "n": len(group.values),
                "n_reference": len(reference),
                "group_mean": float(group.values.mean()) if len(group.values) else None,
                "reference_mean": float(reference.mean()) if len(reference) else None,
                "p_value": np.nan,
                "effect": None,
                "effect_low": None,
                "effect_high": None,
                "test": "one-sided Mann-Whitney U (group > reference)",
                "examples": _worst_examples(group),
            }
            if len(group.values) >= policy.min_support and len(reference) >= policy.min_support:
                record["p_value"] = float(
                    mannwhitneyu(group.values, reference, alternative="greater").pvalue
                )
                record["effect"] = record["group_mean"] - record["reference_mean"]
                low, high = bootstrap_difference_ci(
                    group.values,
                    reference,
                    resamples=policy.bootstrap_resamples,
                    seed=policy.seed,
                )
                record["effect_low"], record["effect_high"] = low, high
            tests.append(record)
    table = pd.DataFrame(tests)
    if not len(table):
        return table
    table["q_value"] = benjamini_hochberg(table["p_value"].to_numpy())
    table["alpha"] = policy.alpha
    table["effect_floor"] = policy.effect_floor
    low = table["effect_low"].astype(float)
    table["flagged"] = (table["q_value"] < policy.alpha) & (low > policy.effect_floor)
    table["severity"] = np.where(table["flagged"], "warn", "none")
    return table


def _worst_examples(sample: _Sample) -> list[int]:
    """Row ids of the group's rows with the highest statistic."""
    order = np.argsort(-sample.values, kind="stable")[:EXAMPLES_PER_FLAG]
    return [int(row) for row in sample.rows[order]]
