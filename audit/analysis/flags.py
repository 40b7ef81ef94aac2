"""Flag: which groups put more map mass on spurious regions than their reference?

For every group (true class, predicted class, slice value) with enough support and
every spurious region R:

1. the statistic (``mass_R`` or ``lift_R``) of the group's measured rows is compared
   with a reference: the other groups of the same kind in this run (for slices, the
   other values of the same attribute), or the same group in a baseline run (a
   slice image by image when it audited the same dataset: Wilcoxon signed-rank, see
   ``_paired_comparison``);
2. a one-sided Mann-Whitney U test (group > reference) gives a p-value, and
   Benjamini-Hochberg across all the run's tests gives q-values;
3. a bootstrap 95% CI of the difference of means (group - reference) is computed;
4. the group is flagged when q < alpha **and** the CI's lower bound exceeds the
   effect-size floor (a point estimate alone never flags).

Slices are compared **within classes**: a slice value that holds more of a class whose
maps spill onto the background (a thin object) would otherwise be flagged on a model
that ignores the slice entirely (Simpson's paradox). The slice's rows and the
reference's are stratified by true class; the test is van Elteren's stratified
Mann-Whitney, the effect the difference of class means weighted by the slice's own
class mix (the reference re-weighted to that mix), its CI a stratified bootstrap.
Classes the other values do not have cannot be compared and are left out.

A flag is heatmap evidence only: it makes a class "suspected" (severity warn) until
the interventions confirm it (``audit.analysis.verdicts.class_verdicts``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control, mannwhitneyu, norm, rankdata, wilcoxon

from audit.analysis.aggregate import Aggregator
from audit.analysis.intervals import (
    SMALL_SAMPLE,
    bootstrap_mean_ci,
    resampled_moments,
    studentized_interval,
    t_interval,
)
from audit.config.decisions import PolicySection

EXAMPLES_PER_FLAG = 5


def bootstrap_difference_ci(
    group: np.ndarray, reference: np.ndarray, *, resamples: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Bootstrap-t CI of mean(group) - mean(reference): each side resampled, the pivot
    studentized by Welch's standard error (on skewed masses, 30-100 values against
    30-1,000, the percentile bootstrap covered 90.3-94.8% of a nominal 95%, this
    92.3-95.3%: docs/flags.md); Welch's t interval when a side has fewer than
    ``SMALL_SAMPLE`` values (where the bootstrap undercovers), NaN when a side has
    fewer than two."""
    if min(len(group), len(reference)) < 2:
        return float("nan"), float("nan")
    difference = group.mean() - reference.mean()
    reach = (group.min() - reference.max(), group.max() - reference.min())
    if reach[0] == reach[1]:  # no spread on either side
        return float(difference), float(difference)
    parts = [np.var(side, ddof=1) / len(side) for side in (group, reference)]
    variance = sum(parts)
    if min(len(group), len(reference)) < SMALL_SAMPLE:
        # Welch-Satterthwaite degrees of freedom.
        dof = variance**2 / sum(
            part**2 / (len(side) - 1) for part, side in zip(parts, (group, reference), strict=True)
        )
        return t_interval(difference, variance, dof, level)
    rng = np.random.default_rng(seed)
    group_means, group_variances = resampled_moments(group, resamples, rng)
    reference_means, reference_variances = resampled_moments(reference, resamples, rng)
    return studentized_interval(
        difference,
        np.sqrt(variance),
        group_means - reference_means,
        np.sqrt(group_variances + reference_variances),
        level,
        reach,
    )


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """BH q-values (scipy's implementation); NaN p-values stay NaN."""
    p_values = np.asarray(p_values, dtype="float64")
    q_values = np.full_like(p_values, np.nan)
    tested = np.isfinite(p_values)
    if tested.any():
        q_values[tested] = false_discovery_control(p_values[tested], method="bh")
    return q_values


def van_elteren_greater(groups: list[np.ndarray], references: list[np.ndarray]) -> float:
    """One-sided p-value of van Elteren's stratified rank-sum test (group > reference).

    Per stratum the group's Wilcoxon rank sum (mid-ranks for ties) is centred on its
    expectation; the strata are weighted by 1 / (N + 1) and the weighted sum is
    compared with its tie-corrected variance (normal approximation). With one stratum
    it is the Mann-Whitney U test without continuity correction.
    """
    centred, variance = 0.0, 0.0
    for group, reference in zip(groups, references, strict=True):
        n, m = len(group), len(reference)
        total = n + m
        if not n or not m:
            continue
        combined = np.concatenate([group, reference])
        rank_sum = rankdata(combined)[:n].sum()
        _, ties = np.unique(combined, return_counts=True)
        tie_term = (ties**3 - ties).sum() / (total * (total - 1)) if total > 1 else 0.0
        weight = 1.0 / (total + 1)
        centred += weight * (rank_sum - n * (total + 1) / 2)
        variance += weight**2 * n * m / 12 * ((total + 1) - tie_term)
    if variance <= 0:
        return 1.0  # every value tied: no evidence either way
    return float(norm.sf(centred / np.sqrt(variance)))


def stratified_difference_ci(
    groups: list[np.ndarray], references: list[np.ndarray], weights: np.ndarray, level=0.95
) -> tuple[float, float]:
    """Student's t CI of D = sum_s w_s (mean(group_s) - mean(reference_s)), with the
    slice's own class mix as weights (w_s = n_s / n).

    D is the mean of the slice rows' residuals e = x - mean(reference of x's class), so
    Var D = var(e) / n + sum_s w_s^2 var(reference_s) / m_s, with n - 1 degrees of
    freedom. A rare slice has one or two images per class, where a bootstrap within
    each class sees no spread at all (its 95% CI covered 28% at one image in each of
    20 classes); the residuals carry the slice's own spread whatever its classes hold
    (and any difference of effect between classes). A reference class with a single
    row takes the reference's pooled within-class variance.
    """
    residuals = np.concatenate(
        [group - reference.mean() for group, reference in zip(groups, references, strict=True)]
    )
    if len(residuals) < 2:
        return float("nan"), float("nan")
    dof = sum(len(values) for values in references) - len(references)
    pooled = (
        sum(((values - values.mean()) ** 2).sum() for values in references) / dof
        if dof > 0
        else np.nan
    )
    variance = residuals.var(ddof=1) / len(residuals)
    for reference, weight in zip(references, weights, strict=True):
        own = np.var(reference, ddof=1) if len(reference) > 1 else pooled
        variance += weight**2 * own / len(reference)
    if not np.isfinite(variance):
        return float("nan"), float("nan")
    return t_interval(float(residuals.mean()), variance, len(residuals) - 1, level)


@dataclass(frozen=True)
class _Sample:
    rows: np.ndarray
    values: np.ndarray
    labels: np.ndarray  # true class of each row (the strata of a slice test)


def _measured(aggregator: Aggregator, identity: tuple, statistic: str, region: str) -> _Sample:
    group = aggregator.groups[identity].arrays()
    kind = identity[0]
    column = aggregator.column(kind, statistic, region)
    use = group.correct if kind in ("true", "class_slice") else np.ones_like(group.correct)
    column_values = group.values[column][use]
    finite = np.isfinite(column_values)
    return _Sample(group.rows[use][finite], column_values[finite], group.labels[use][finite])


def _pooled(samples: list[_Sample]) -> _Sample:
    empty = _Sample(np.zeros(0, "int64"), np.zeros(0), np.zeros(0, "int64"))
    parts = [empty, *samples]
    return _Sample(
        np.concatenate([part.rows for part in parts]),
        np.concatenate([part.values for part in parts]),
        np.concatenate([part.labels for part in parts]),
    )


def _within_classes(group: _Sample, reference: _Sample, policy: PolicySection) -> dict:
    """A slice against the attribute's other values, class by class (see the module)."""
    shared = np.intersect1d(group.labels, reference.labels)
    groups = [group.values[group.labels == label] for label in shared]
    references = [reference.values[reference.labels == label] for label in shared]
    counts = np.array([len(values) for values in groups], dtype="float64")
    record = {
        "n": int(counts.sum()),
        "n_reference": int(sum(len(values) for values in references)),
        "group_mean": None,
        "reference_mean": None,
        "strata": len(shared),
        "test": "one-sided van Elteren, stratified by true class (group > reference)",
    }
    if not len(shared):
        return record
    weights = counts / counts.sum()  # the slice's own class mix
    record["group_mean"] = float(sum(w * g.mean() for w, g in zip(weights, groups, strict=True)))
    record["reference_mean"] = float(
        sum(w * r.mean() for w, r in zip(weights, references, strict=True))
    )
    if record["n"] >= policy.min_support and record["n_reference"] >= policy.min_support:
        record["p_value"] = van_elteren_greater(groups, references)
        record["effect"] = record["group_mean"] - record["reference_mean"]
        record["effect_low"], record["effect_high"] = stratified_difference_ci(
            groups, references, weights
        )
    return record


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
    paired: bool = False,
) -> pd.DataFrame:
    """One row per (group, spurious region) test with its numbers and verdict.

    ``paired``: the baseline run audited the same dataset, so each slice is compared
    with itself image by image. A slice's rows are the data's, whatever the model; a
    true-label group's (correct rows) and a predicted-label group's depend on the
    model, and pairing them would leave out the very images a regression adds (new
    background-driven false positives), so they stay two-sample comparisons.
    """
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
                reference = _measured(baseline, identity, *measure)
                same_images = paired and kind == "slice"
                reference_name = "baseline run, same group" + (
                    ", same images" if same_images else ""
                )
            else:
                reference = _pooled(
                    [
                        _measured(aggregator, other, *measure)
                        for other in _reference_identities(aggregator, identity)
                    ]
                )
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
                "p_value": np.nan,
                "effect": None,
                "effect_low": None,
                "effect_high": None,
                "examples": _worst_examples(group),
            }
            if baseline is not None and paired and kind == "slice":
                record.update(_paired_comparison(group, reference, policy))
            elif kind == "slice" and baseline is None:
                record.update(_within_classes(group, reference, policy))
            else:
                record.update(_pooled_comparison(group.values, reference.values, policy))
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


def _comparison(group: np.ndarray, reference: np.ndarray, test: str) -> dict:
    """The sizes and means of a comparison, before its test adds p-value and effect."""
    return {
        "n": len(group),
        "n_reference": len(reference),
        "group_mean": float(group.mean()) if len(group) else None,
        "reference_mean": float(reference.mean()) if len(reference) else None,
        "test": test,
    }


def _pooled_comparison(group: np.ndarray, reference: np.ndarray, policy: PolicySection) -> dict:
    """A group against its pooled reference: Mann-Whitney U and a bootstrap CI."""
    record = _comparison(group, reference, "one-sided Mann-Whitney U (group > reference)")
    if len(group) >= policy.min_support and len(reference) >= policy.min_support:
        record["p_value"] = float(mannwhitneyu(group, reference, alternative="greater").pvalue)
        record["effect"] = record["group_mean"] - record["reference_mean"]
        record["effect_low"], record["effect_high"] = bootstrap_difference_ci(
            group, reference, resamples=policy.bootstrap_resamples, seed=policy.seed
        )
    return record


def _paired_comparison(group: _Sample, reference: _Sample, policy: PolicySection) -> dict:
    """A slice against itself in a baseline run of the same dataset, image by image:
    the rows both runs measured, a one-sided Wilcoxon signed-rank test of the
    differences and a bootstrap CI of their mean. The spread between images (object
    sizes, scenes) cancels, so a small change of the model shows."""
    _, mine, theirs = np.intersect1d(group.rows, reference.rows, return_indices=True)
    values, before = group.values[mine], reference.values[theirs]
    differences = values - before
    record = _comparison(
        values, before, "one-sided Wilcoxon signed-rank, paired by image (group > baseline)"
    )
    if len(differences) >= policy.min_support:
        record["p_value"] = signed_rank_greater(differences)
        record["effect"] = float(differences.mean())
        record["effect_low"], record["effect_high"] = bootstrap_mean_ci(
            differences, resamples=policy.bootstrap_resamples, seed=policy.seed
        )
    return record


def signed_rank_greater(differences: np.ndarray) -> float:
    """One-sided p-value of the Wilcoxon signed-rank test (median difference > 0);
    1.0 when every difference is zero (no evidence either way)."""
    if not np.any(differences != 0):
        return 1.0
    return float(wilcoxon(differences, alternative="greater").pvalue)


def _worst_examples(sample: _Sample) -> list[int]:
    """Row ids of the group's rows with the highest statistic."""
    order = np.argsort(-sample.values, kind="stable")[:EXAMPLES_PER_FLAG]
    return [int(row) for row in sample.rows[order]]
