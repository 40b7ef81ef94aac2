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

from audit.analysis.intervals import mean_with_ci, rate_with_ci
from audit.measure import spec

GROUP_KINDS = ("true", "pred", "slice", "class_slice")
# Slice attributes with more distinct values than this are identifiers, not slices.
MAX_SLICE_VALUES = 50
# A weak-localisation box is correct at this IoU with the true box (ILSVRC).
LOCALISATION_IOU = 0.5


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
        self.prefixes = {maps: spec.map_prefix(target, maps) for maps in ("true", "pred")}
        self.metrics = list(spec.metrics(aggregated=True))
        self.columns = [
            spec.column(metric.name, region, prefix)
            for prefix in self.prefixes.values()
            for region in self.region_names
            for metric in self.metrics
            if metric.other_map or not prefix
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
        return spec.column(metric, region, self.prefixes[maps])

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
                for metric in self.metrics:
                    measured = values.get(self.column(key.kind, metric.name, region))
                    if measured is None:  # measured on the main map only
                        continue
                    name = spec.column(metric.name, region)
                    if metric.summary == "rate":
                        record.update(rate_with_ci(measured[use], name))
                    else:
                        record.update(
                            mean_with_ci(measured[use], name, share=metric.share, **bootstrap)
                        )
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
        summary.update(mean_with_ci(values[column][use], column, share=True, **bootstrap))
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
    extras = [spec.counterfactual_column(r) for r in region_names]
    extras = [c for c in extras if c in images.columns]
    extras += ["loc_iou"] if "loc_iou" in images.columns else []
    aggregator = Aggregator(region_names, slices, manifest["config"]["model"]["target"], extras)
    for start in range(0, len(images), chunk_rows):
        aggregator.add(images.iloc[start : start + chunk_rows])
    return aggregator
