"""Probe: which predicted classes does a slice drive?

On an audit set whose slices (a background type, a watermark, a site) are independent
of the class, as in a held-out split collected the usual way, a shortcut shows as
images on the slice that are predicted as the class it stands for, whatever their
true class. So for every slice value with ``min_support`` images, both on it and off
it, and every class c:

* the rate of predicting c on the slice's images **of other classes** (false
  positives) against the rest of the attribute's images, **stratified by true class**
  (a slice that holds more images of some classes, each confused with c now and then,
  would otherwise raise c's rate without any shortcut): the Mantel-Haenszel risk
  difference with Sato's variance (valid for sparse and large strata alike), its 95%
  interval, and the one-sided Cochran-Mantel-Haenszel test (the slice raises false
  predictions of c). The class's own images are left out of it: on a slice that takes
  predictions away from their true classes, the rest of the attribute would otherwise
  seem to drive every class;
* the class x slice accuracy gap: c's own accuracy on the slice against off it, each
  with its Wilson interval (a class the model gets right only with its shortcut). It
  is shown, not tested: the same artefact makes it differ on the rest.

No forward pass is spent: the audit pass's predictions suffice. The tests join the
interventions' in the run's Benjamini-Hochberg correction (``audit.analysis.analyse``); an
association is evidence for c when its q-value is below ``alpha`` and its risk
difference's lower bound exceeds ``gap_floor``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import norm

from audit.analysis.intervals import wilson_interval
from audit.config.decisions import PolicySection

EXAMPLES_PER_ASSOCIATION = 5


def mantel_haenszel(
    hits: np.ndarray, sizes: np.ndarray, other_hits: np.ndarray, other_sizes: np.ndarray
) -> dict:
    """Risk difference of ``hits / sizes`` (exposed) against ``other_hits / other_sizes``
    over strata: the Mantel-Haenszel estimate with Sato's variance, its 95% interval,
    the standardised rates behind it and the one-sided CMH p-value (exposed > other).
    Strata lacking either side are left out."""
    keep = (sizes > 0) & (other_sizes > 0)
    a, n1 = hits[keep].astype(float), sizes[keep].astype(float)
    c, n0 = other_hits[keep].astype(float), other_sizes[keep].astype(float)
    total = n1 + n0
    weights = n1 * n0 / total
    if not weights.sum():
        return dict.fromkeys(
            ("rate_slice", "rate_rest", "rd", "rd_low", "rd_high", "p_value"), np.nan
        )
    rate_slice = float((weights * a / n1).sum() / weights.sum())
    rate_rest = float((weights * c / n0).sum() / weights.sum())
    difference = rate_slice - rate_rest
    p_terms = (n1**2 * c - n0**2 * a + n1 * n0 * (n0 - n1) / 2) / total**2
    q_terms = (a * (n0 - c) + c * (n1 - a)) / (2 * total)
    variance = max((difference * p_terms.sum() + q_terms.sum()) / weights.sum() ** 2, 0.0)
    half = norm.ppf(0.975) * np.sqrt(variance)
    # CMH: the exposed hits against their expectation given each stratum's margins.
    events = a + c
    expected = n1 * events / total
    spread = np.where(
        total > 1, n1 * n0 * events * (total - events) / (total**2 * np.maximum(total - 1, 1)), 0
    ).sum()
    # No stratum varies: no evidence either way.
    p_value = float(norm.sf((a - expected).sum() / np.sqrt(spread))) if spread > 0 else 1.0
    return {
        "rate_slice": rate_slice,
        "rate_rest": rate_rest,
        "rd": difference,
        "rd_low": max(-1.0, difference - half),
        "rd_high": min(1.0, difference + half),
        "p_value": p_value,
    }


def accuracy_excess(record: dict, others: dict) -> dict:
    """c's accuracy gain on the slice (``accuracy_slice - accuracy_rest``, Newcombe's
    interval from the two Wilson intervals) minus the other classes' gain (``others``,
    their Mantel-Haenszel difference of accuracy), with a MOVER interval. A slice that
    steals predictions for another class lowers every class's accuracy on it, so an
    attribute's other values would all show a gain; the excess cancels that."""
    if not record["n_class_slice"] or not record["n_class_rest"] or np.isnan(others["rd"]):
        return dict.fromkeys(
            ("accuracy_excess", "accuracy_excess_low", "accuracy_excess_high"), np.nan
        )
    mine, rest = record["accuracy_slice"], record["accuracy_rest"]
    gain = mine - rest
    gain_low = gain - np.hypot(
        mine - record["accuracy_slice_low"], record["accuracy_rest_high"] - rest
    )
    gain_high = gain + np.hypot(
        record["accuracy_slice_high"] - mine, rest - record["accuracy_rest_low"]
    )
    excess = gain - others["rd"]
    return {
        "accuracy_excess": excess,
        "accuracy_excess_low": excess - np.hypot(gain - gain_low, others["rd_high"] - others["rd"]),
        "accuracy_excess_high": excess
        + np.hypot(gain_high - gain, others["rd"] - others["rd_low"]),
    }


def slice_associations(
    images: pd.DataFrame,
    slice_columns: Sequence[str],
    class_names: Sequence[str],
    policy: PolicySection,
) -> pd.DataFrame:
    """One row per (slice attribute, value, class) tested; see the module."""
    ok = images[images["status"] == "ok"]
    num_classes = len(class_names)
    rows = []
    for attribute in slice_columns:
        present = ok[ok[attribute].notna()]
        values = present[attribute].astype(str).to_numpy()
        labels = present["label_index"].to_numpy(int)
        predictions = present["pred"].to_numpy(int)
        for value in sorted(set(values)):
            on = values == value
            if min(on.sum(), (~on).sum()) < policy.min_support:
                continue
            # Per stratum (true class) x predicted class: counts on and off the slice.
            sizes = np.bincount(labels[on], minlength=num_classes)
            other_sizes = np.bincount(labels[~on], minlength=num_classes)
            hits = np.zeros((num_classes, num_classes))
            other_hits = np.zeros((num_classes, num_classes))
            np.add.at(hits, (labels[on], predictions[on]), 1)
            np.add.at(other_hits, (labels[~on], predictions[~on]), 1)
            for index in range(num_classes):
                # False positives only: the class's own images are its accuracy gap, and
                # a slice that takes predictions away from the rest's true classes would
                # otherwise make the rest "raise" their accuracy.
                others = np.arange(num_classes) != index
                record = {
                    "attribute": attribute,
                    "value": value,
                    "class_index": index,
                    "class_name": class_names[index],
                    "n_slice": int(on.sum()),
                    "n_rest": int((~on).sum()),
                    "strata": int(((sizes > 0) & (other_sizes > 0) & others).sum()),
                }
                record.update(
                    mantel_haenszel(
                        hits[others, index],
                        sizes[others],
                        other_hits[others, index],
                        other_sizes[others],
                    )
                )
                for side, correct, count in (
                    ("slice", hits[index, index], sizes[index]),
                    ("rest", other_hits[index, index], other_sizes[index]),
                ):
                    record[f"n_class_{side}"] = int(count)
                    record[f"accuracy_{side}"] = correct / count if count else np.nan
                    low, high = wilson_interval(int(correct), int(count))
                    record[f"accuracy_{side}_low"], record[f"accuracy_{side}_high"] = low, high
                # How much more often the other classes are right on the slice (a slice
                # that takes predictions away lowers it): c's own gain beyond it is the
                # accuracy excess.
                diagonal = np.diagonal(hits)[others], np.diagonal(other_hits)[others]
                record.update(
                    accuracy_excess(
                        record,
                        mantel_haenszel(
                            diagonal[0], sizes[others], diagonal[1], other_sizes[others]
                        ),
                    )
                )
                # The images that show it: on the slice, of another class, predicted c.
                shown = present.loc[on & (predictions == index) & (labels != index), "row"]
                record["examples"] = shown.head(EXAMPLES_PER_ASSOCIATION).astype(int).tolist()
                rows.append(record)
    return pd.DataFrame(rows)
