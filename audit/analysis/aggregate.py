"""Aggregate: per-image rows -> per-group statistics, with mergeable accumulators.

Groups are computed from ``images.parquet`` four ways:

* ``true``  - by true label, on correctly predicted rows: does the model find the object?
* ``pred``  - by predicted label, on every row predicted as the class: which evidence
  makes the model *say* it (background-driven false positives show up here);
* ``slice`` - by the value of a slice attribute (``background_type``, ``gender``, ...);
* ``class_slice`` - true label x slice value.

An accumulator keeps, per group, the row ids and the values it needs (a few floats
per image), so ``add`` over batches and ``merge`` of partial accumulators (one per
shard or worker) give exactly the result of one pass over everything: ``finalize``
sorts by row id before it bootstraps with a fixed seed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

GROUP_KINDS = ("true", "pred", "slice", "class_slice")
# Slice attributes with more distinct values than this are identifiers, not slices.
MAX_SLICE_VALUES = 50
# Above this many values a mean's CI uses the normal approximation (see bootstrap_mean_ci).
NORMAL_APPROXIMATION_ABOVE = 20_000
# Below this many values a mean's CI is Student's t interval: the percentile bootstrap
# undercovers small samples (simulated on skewed masses: 51% at 2 values, 89% at 10), and
# the bootstrap-t's interval is erratic there (1.6 times Student's width at 10 values of
# Beta(0.5, 3)), as few values give few distinct resamples.
SMALL_SAMPLE = 30
# A weak-localisation box is correct at this IoU with the true box (ILSVRC).
LOCALISATION_IOU = 0.5
# Bootstrap resamples drawn at a time (memory: this many copies of a group).
RESAMPLE_CHUNK = 100


def bootstrap_mean_ci(
    values: np.ndarray,
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    bounds: tuple[float, float] = (-np.inf, np.inf),
) -> tuple[float, float]:
    """Bootstrap-t (studentized bootstrap) confidence interval of the mean; Student's t
    interval below ``SMALL_SAMPLE`` values, the normal one above
    ``NORMAL_APPROXIMATION_ABOVE``; clipped to the ``bounds`` the values can take (a
    mass lies in [0, 1]); NaN for fewer than two values.

    The percentile bootstrap covered 89.5-94.6% of a nominal 95% at 30-100 values of
    skewed masses, missing mostly high: its interval is as narrow as a normal one with
    the plug-in spread, and in a right-skewed sample a low mean comes with a low spread.
    The bootstrap-t resamples the pivot (mean - estimate) / standard error, which
    carries both: 93.2-96.7% (docs/flags.md, measured by ``tests/test_intervals.py``)."""
    values = np.asarray(values, dtype="float64")
    values = values[np.isfinite(values)]
    if len(values) < 2:  # one value says nothing about its spread
        return float("nan"), float("nan")
    mean = values.mean()
    reach = (values.min(), values.max())  # the lowest and highest mean of a resample
    if reach[0] == reach[1]:  # no spread (where rounding would give Student's t some)
        return float(mean), float(mean)
    standard_error = values.std(ddof=1) / np.sqrt(len(values))
    if len(values) < SMALL_SAMPLE:
        low, high = t_interval(mean, standard_error**2, len(values) - 1, level)
    elif len(values) > NORMAL_APPROXIMATION_ABOVE:
        # The bootstrap distribution of a mean over this many rows is normal to within
        # rounding; the closed form avoids resampling millions of values.
        from scipy.stats import norm

        half = norm.ppf(0.5 + level / 2) * standard_error
        low, high = mean - half, mean + half
    else:
        means, variances = resampled_moments(values, resamples, np.random.default_rng(seed))
        low, high = studentized_interval(
            mean, standard_error, means, np.sqrt(variances), level, reach
        )
    return float(max(low, bounds[0])), float(min(high, bounds[1]))


def t_interval(
    estimate: float, variance: float, dof: float, level: float = 0.95
) -> tuple[float, float]:
    """``estimate`` +- Student's t quantile times its standard error."""
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, dof)) * float(np.sqrt(variance))
    return float(estimate - half), float(estimate + half)


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a rate (no continuity correction; NaN for no trials).

    Used for every rate (accuracy, pointing, localisation error, the interventions'
    prediction rates): it stays honest at 0 and 1, where a bootstrap of identical
    outcomes collapses to a point.
    """
    if trials <= 0:
        return float("nan"), float("nan")
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + level / 2))
    rate = successes / trials
    scale = 1 + z * z / trials
    centre = (rate + z * z / (2 * trials)) / scale
    half = z * np.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / scale
    # At 0 and n the bound is exactly 0 or 1 (rounding gives 3.5e-18 or 0.9999999999999998).
    low = 0.0 if successes <= 0 else max(0.0, centre - half)
    high = 1.0 if successes >= trials else min(1.0, centre + half)
    return float(low), float(high)


def rate_with_ci(outcomes: np.ndarray, name: str) -> dict:
    """``{name: mean, name_low, name_high}`` of 0/1 outcomes (NaN ones left out), the
    interval Wilson's; NaN for no outcomes."""
    outcomes = np.asarray(outcomes, dtype="float64")
    outcomes = outcomes[np.isfinite(outcomes)]
    if not len(outcomes):
        return {name: np.nan, f"{name}_low": np.nan, f"{name}_high": np.nan}
    low, high = wilson_interval(int(outcomes.sum()), len(outcomes))
    return {name: float(outcomes.mean()), f"{name}_low": low, f"{name}_high": high}


# Metric columns that are shares of a map (or an IoU): their means and CIs lie in [0, 1].
SHARES = ("mass_", "cf_mass_", "loc_iou", "area_", "iou_", "rank_acc_")


def mean_with_ci(values: np.ndarray, name: str, *, resamples: int, seed: int) -> dict:
    """``{name: mean, name_low, name_high}`` of the finite values of metric ``name``,
    the interval ``bootstrap_mean_ci``'s, within [0, 1] for a share (``SHARES``) and
    above 0 for the rest (lift, totals); NaN for no values."""
    values = np.asarray(values, dtype="float64")
    finite = values[np.isfinite(values)]
    if not len(finite):
        return {name: np.nan, f"{name}_low": np.nan, f"{name}_high": np.nan}
    bounds = (0.0, 1.0) if name.startswith(SHARES) else (0.0, np.inf)
    low, high = bootstrap_mean_ci(finite, resamples=resamples, seed=seed, bounds=bounds)
    return {name: float(finite.mean()), f"{name}_low": low, f"{name}_high": high}


def resampled_moments(
    values: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The means of ``count`` bootstrap resamples of ``values`` and their squared
    standard errors (the resample's variance, ddof 1, over its size), drawn
    ``RESAMPLE_CHUNK`` resamples at a time.

    Above ``NORMAL_APPROXIMATION_ABOVE`` values the means are drawn from the normal
    distribution the bootstrap converges to and the standard error is the values' own
    (a resample of that many rows has their spread to rounding), instead of resampling
    millions of rows.
    """
    size = len(values)
    centre = values.mean()
    if size > NORMAL_APPROXIMATION_ABOVE:
        variance = values.var(ddof=1) / size
        return rng.normal(centre, np.sqrt(variance), count), np.full(count, variance)
    centred = values - centre  # keeps the sums of squares free of cancellation
    sums, squares = np.empty(count), np.empty(count)
    for start in range(0, count, RESAMPLE_CHUNK):  # chunks bound memory for large groups
        stop = min(start + RESAMPLE_CHUNK, count)
        resampled = centred[rng.integers(0, size, size=(stop - start, size))]
        sums[start:stop] = resampled.sum(axis=1)
        squares[start:stop] = np.einsum("ij,ij->i", resampled, resampled)
    variances = np.maximum(squares - sums**2 / size, 0.0) / (size - 1)
    return centre + sums / size, variances / size


def studentized_interval(
    estimate: float,
    standard_error: float,
    draws: np.ndarray,
    draw_errors: np.ndarray,
    level: float,
    reach: tuple[float, float],
) -> tuple[float, float]:
    """The bootstrap-t interval: ``estimate`` minus the upper and the lower quantile of
    the pivots (draw - estimate) / draw_error, times ``standard_error``; within
    ``reach``, the lowest and the highest estimate a resample can give.

    A resample without spread (draw_error 0) has an infinite pivot of its shift's sign
    (0 without a shift); the quantiles are order statistics (Efron's B * alpha-th
    pivot), which an infinite neighbour cannot turn into NaN as interpolation would.
    Where more than a tail's share of the resamples has no spread (from 30 values on, a
    sample of zeros but for three or fewer), a bound is infinite and ``reach`` is what
    is left. ``standard_error`` is positive: values without spread get a zero-width
    interval before they are resampled.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        pivots = (draws - estimate) / draw_errors
    pivots[np.isnan(pivots)] = 0.0
    tail = (1 - level) / 2
    lower, upper = np.quantile(pivots, [tail, 1 - tail], method="inverted_cdf")
    return (
        float(max(estimate - upper * standard_error, reach[0])),
        float(min(estimate - lower * standard_error, reach[1])),
    )


@dataclass
class GroupAccumulator:
    """Rows of one group: ids, correctness, and the measured columns."""

    columns: Sequence[str]
    rows: list[np.ndarray] = field(default_factory=list)
    correct: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)  # true class: the slice tests' strata
    values: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, frame: pd.DataFrame) -> None:
        if not len(frame):
            return
        self.rows.append(frame["row"].to_numpy(dtype="int64"))
        self.correct.append(frame["correct"].to_numpy(dtype=bool))
        self.labels.append(frame["label_index"].to_numpy(dtype="int64"))
        for column in self.columns:
            self.values.setdefault(column, []).append(frame[column].to_numpy(dtype="float64"))

    def merge(self, other: GroupAccumulator) -> GroupAccumulator:
        """Adds ``other``'s rows (its lists are copied, never shared)."""
        self.rows.extend(other.rows)
        self.correct.extend(other.correct)
        self.labels.extend(other.labels)
        for column in self.columns:
            self.values.setdefault(column, []).extend(other.values.get(column, []))
        return self

    def arrays(self) -> GroupArrays:
        """Row ids, correctness, true labels and values, sorted by row id."""
        if not self.rows:
            empty = np.zeros(0)
            return GroupArrays(
                empty.astype("int64"),
                empty.astype(bool),
                empty.astype("int64"),
                {c: empty for c in self.columns},
            )
        rows = np.concatenate(self.rows)
        order = np.argsort(rows, kind="stable")
        values = {c: np.concatenate(self.values[c])[order] for c in self.columns}
        return GroupArrays(
            rows[order],
            np.concatenate(self.correct)[order],
            np.concatenate(self.labels)[order],
            values,
        )


@dataclass(frozen=True)
class GroupArrays:
    """One group's rows in row-id order (so results do not depend on arrival order)."""

    rows: np.ndarray
    correct: np.ndarray
    labels: np.ndarray
    values: dict[str, np.ndarray]


@dataclass
class GroupKey:
    kind: str  # one of GROUP_KINDS
    class_index: int | None = None
    attribute: str | None = None
    value: str | None = None

    def as_tuple(self) -> tuple:
        return (self.kind, self.class_index, self.attribute, self.value)


class Aggregator:
    """Accumulates every group of a run; ``add`` batches of images rows, ``merge``, ``finalize``."""

    def __init__(
        self,
        region_names: Sequence[str],
        slice_columns: Sequence[str],
        target: str = "true",
        main_map_columns: Sequence[str] = (),
    ) -> None:
        self.region_names = list(region_names)
        # Main-map extras summarised per group when a run has them: counterfactual
        # mass per region (cf_mass_*) and weak localisation (loc_iou).
        self.main_map_columns = list(main_map_columns)
        self.slice_columns = list(slice_columns)
        # Column prefixes of the true-class maps and of the predicted-class maps.
        self.prefixes = (
            {"true": "", "pred": "pred_"}
            if target == "true"
            else {
                "true": "true_",
                "pred": "",
            }
        )
        self.columns = [
            f"{prefix}{metric}_{region}"
            for prefix in self.prefixes.values()
            for region in self.region_names
            for metric in ("mass", "lift", "pointing")
        ] + self.main_map_columns
        self.groups: dict[tuple, GroupAccumulator] = {}
        self.keys: dict[tuple, GroupKey] = {}

    def column(self, kind: str, metric: str, region: str) -> str:
        """The column a group kind is measured on.

        True-label groups use the true class's maps on correct rows; predicted-label
        and slice groups use the predicted class's maps on every row: what drove the
        decision.
        """
        maps = "true" if kind in ("true", "class_slice") else "pred"
        return f"{self.prefixes[maps]}{metric}_{region}"

    def _group(self, key: GroupKey) -> GroupAccumulator:
        identity = key.as_tuple()
        if identity not in self.groups:
            self.groups[identity] = GroupAccumulator(self.columns)
            self.keys[identity] = key
        return self.groups[identity]

    def add(self, images: pd.DataFrame) -> Aggregator:
        ok = images[images["status"] == "ok"]
        if not len(ok):
            return self
        ok = ok.assign(correct=ok["correct"].astype(bool))
        for label, frame in ok.groupby("label_index"):
            self._group(GroupKey("true", int(label))).add(frame)
        for predicted, frame in ok.groupby("pred"):
            self._group(GroupKey("pred", int(predicted))).add(frame)
        for attribute in self.slice_columns:
            # A missing value belongs to no slice (never a "nan" slice of its own).
            present = ok[ok[attribute].notna()]
            for value, frame in present.groupby(present[attribute].astype(str)):
                self._group(GroupKey("slice", None, attribute, str(value))).add(frame)
                for label, sub in frame.groupby("label_index"):
                    self._group(GroupKey("class_slice", int(label), attribute, str(value))).add(sub)
        return self

    def merge(self, other: Aggregator) -> Aggregator:
        for identity, accumulator in other.groups.items():
            if identity not in self.groups:
                self.groups[identity] = GroupAccumulator(self.columns)
                self.keys[identity] = other.keys[identity]
            self.groups[identity].merge(accumulator)
        return self

    def _zero_maps(self, kind: str, values: dict, use: np.ndarray) -> int:
        """Measured rows whose map is zero everywhere. Their mass is null on every
        region (an empty region's is 0), so the group's means leave them out."""
        if not self.region_names:
            return 0
        mass = values[self.column(kind, "mass", self.region_names[0])][use]
        return int(np.isnan(mass).sum())

    def finalize(
        self,
        class_names: Sequence[str],
        *,
        resamples: int = 1000,
        seed: int = 0,
        min_support: int = 1,
    ) -> pd.DataFrame:
        """One row per group: support, accuracy/precision, mean metrics with 95% CIs.

        ``min_support``: slice values with fewer rows do not compete for an attribute's
        worst-group accuracy (one misclassified image is not a worst group)."""
        records = []
        for identity in sorted(self.groups, key=_sort_key):
            key = self.keys[identity]
            group = self.groups[identity].arrays()
            rows, correct, values = group.rows, group.correct, group.values
            # True-label groups measure evidence on correct predictions; predicted-label
            # groups on every prediction of the class (false positives included).
            use = correct if key.kind in ("true", "class_slice") else np.ones_like(correct)
            record = {
                "kind": key.kind,
                "class_index": key.class_index,
                "class_name": None if key.class_index is None else class_names[key.class_index],
                "attribute": key.attribute,
                "value": key.value,
                "n": int(len(rows)),
                "n_measured": int(use.sum()),
                "n_zero_map": self._zero_maps(key.kind, values, use),
                **rate_with_ci(correct, "accuracy"),
            }
            bootstrap = {"resamples": resamples, "seed": seed}
            for region in self.region_names:
                for metric in ("mass", "lift"):
                    column = values[self.column(key.kind, metric, region)][use]
                    record.update(mean_with_ci(column, f"{metric}_{region}", **bootstrap))
                pointing = values[self.column(key.kind, "pointing", region)][use]
                record.update(rate_with_ci(pointing, f"pointing_{region}"))
            # The extras are measured on the main map: summarised only for the groups
            # whose statistics come from that map (true-label groups by default).
            maps = "true" if key.kind in ("true", "class_slice") else "pred"
            if self.prefixes[maps] == "":
                record.update(
                    _main_map_summary(values, use, correct, self.main_map_columns, bootstrap)
                )
            records.append(record)
        table = pd.DataFrame(records)
        if len(table):
            table = _add_worst_group(table, min_support)
        return table


def _main_map_summary(values, use, correct, columns, bootstrap: dict) -> dict:
    """Counterfactual mass means and weak localisation of one group, with 95% CIs."""
    summary = {}
    for column in columns:
        summary.update(mean_with_ci(values[column][use], column, **bootstrap))
    if "loc_iou" in columns:
        iou = values["loc_iou"]
        located = np.isfinite(iou)
        missed = (~located | (np.nan_to_num(iou) < LOCALISATION_IOU)).astype(float)
        summary.update(rate_with_ci(missed[use & located], "loc_error"))
        # The ILSVRC top-1 localisation error: wrong class or box IoU below 0.5.
        wrong = np.maximum(missed, ~correct).astype(float)
        summary.update(rate_with_ci(wrong[located], "top1_loc_error"))
    return summary


def _sort_key(identity: tuple) -> tuple:
    kind, class_index, attribute, value = identity
    return (
        GROUP_KINDS.index(kind),
        -1 if class_index is None else class_index,
        attribute or "",
        value or "",
    )


def _add_worst_group(table: pd.DataFrame, min_support: int) -> pd.DataFrame:
    """For slice groups: the worst accuracy among the attribute's values with at least
    ``min_support`` rows (worst-group accuracy; NaN when no value has that many), with
    that value's 95% CI and the value itself (``worst_group_value``)."""
    slices = table["kind"] == "slice"
    supported = table[slices & (table["n"] >= min_support)]
    columns = ["accuracy", "accuracy_low", "accuracy_high"]
    # Ties (every value at 1.0, say) go to the least certain value: the lowest bound.
    ordered = supported.sort_values(["accuracy", "accuracy_low"], kind="stable")
    worst = ordered.drop_duplicates("attribute").set_index("attribute")
    for column in columns:
        name = column.replace("accuracy", "worst_group_accuracy")
        table[name] = np.nan
        table.loc[slices, name] = table.loc[slices, "attribute"].map(worst[column])
    table["worst_group_value"] = None  # which value of the attribute is the worst group
    table.loc[slices, "worst_group_value"] = table.loc[slices, "attribute"].map(worst["value"])
    return table


def slice_columns_of(images: pd.DataFrame, candidates: Iterable[str]) -> list[str]:
    """Slice attributes worth grouping by: few distinct values (not ids or paths)."""
    chosen = []
    for column in candidates:
        if column in images.columns and column not in ("mask_path", "mask_rle"):
            distinct = images[column].nunique(dropna=True)
            if 1 < distinct <= MAX_SLICE_VALUES:
                chosen.append(column)
    return chosen


def aggregator_for(images: pd.DataFrame, manifest: dict, chunk_rows: int = 50_000) -> Aggregator:
    """An ``Aggregator`` fed with a run's ``images`` table, in chunks."""
    region_names = [region["name"] for region in manifest["regions"]]
    slices = slice_columns_of(images, manifest["dataset"].get("slice_columns", []))
    extras = [c for c in images.columns if c.startswith("cf_mass_")]
    extras += ["loc_iou"] if "loc_iou" in images.columns else []
    aggregator = Aggregator(region_names, slices, manifest["config"]["model"]["target"], extras)
    for start in range(0, len(images), chunk_rows):
        aggregator.add(images.iloc[start : start + chunk_rows])
    return aggregator
