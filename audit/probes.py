"""Probe: interventions that test whether a class's decisions follow its background.

On up to ``policy.intervention_samples`` correctly predicted images per class, using
the expected regions (masks or boxes) as the object:

* ``object_only``     - the background filled with the image's mean background colour;
* ``background_only`` - the object filled with that colour;
* ``mixed_rand``      - the object pasted onto the background of a random image of
  another class (whose own object is filled), as in Xiao et al.'s Mixed-Rand.

Each costs one forward pass per image, batched through the compiled model (the
original prediction comes from the audit pass), so it runs for every class, not
only for heatmap suspects. Per class we report the rate
at which the class is still predicted under each intervention and
BG-gap = acc(own background) - acc(swapped background) = 1 - rate(mixed_rand) on
these correctly predicted images. A class has intervention evidence when its BG-gap
exceeds the median BG-gap of the other classes by more than ``policy.gap_floor``,
judged on the bootstrap CI's lower bound.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from audit.aggregate import bootstrap_mean_ci
from audit.config import PolicySection, RegionSection
from audit.data import DECODE_THREADS, Entries, Preprocessor, load_batches

INTERVENTIONS = ("original", "object_only", "background_only", "mixed_rand")


def sample_rows(images: pd.DataFrame, per_class: int, seed: int) -> pd.DataFrame:
    """Up to ``per_class`` correctly predicted ok rows of each true class, seeded."""
    ok = images[(images["status"] == "ok") & images["correct"].astype(bool)]
    picks = [
        group.sample(n=min(per_class, len(group)), random_state=seed)
        for _, group in ok.groupby("label_index")
    ]
    if not picks:
        return ok.iloc[:0]
    return pd.concat(picks).sort_values("row", kind="stable")


def intervene(
    images: np.ndarray, objects: np.ndarray, partners: np.ndarray
) -> dict[str, np.ndarray]:
    """The intervened copies of a batch.

    ``objects``: (n, H, W) bool object masks; ``partners``: for each image the index
    (within the batch) of the image whose background it receives.
    """
    background = ~objects
    counts = np.maximum(background.sum(axis=(1, 2)), 1)[:, None]
    fill = (images * background[..., None]).sum(axis=(1, 2)) / counts  # (n, channels)
    filled = fill[:, None, None, :]
    mask = objects[..., None]
    background_only = np.where(mask, filled, images)
    return {
        "original": images,
        "object_only": np.where(mask, images, filled),
        "background_only": background_only,
        "mixed_rand": np.where(mask, images, background_only[partners]),
    }


def _partners(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each image, a random image of another class in the batch (itself if none)."""
    partners = np.arange(len(labels))
    for index, label in enumerate(labels):
        others = np.flatnonzero(labels != label)
        if len(others):
            partners[index] = rng.choice(others)
    return partners


def run_interventions(
    probabilities: Callable[[np.ndarray], np.ndarray],
    entries: Entries,
    sample: pd.DataFrame,
    *,
    class_index: dict[str, int],
    preprocessor: Preprocessor,
    regions: Sequence[RegionSection],
    batch_size: int,
    seed: int,
) -> pd.DataFrame:
    """Per sampled row: the predicted class under each intervention.

    ``probabilities``: the model's batched forward pass (``GradCAM.probabilities``).
    """
    expected = [i for i, region in enumerate(regions) if region.role == "expected"]
    rng = np.random.default_rng(seed)
    records = []
    # Shuffle so a batch mixes classes and every image finds a partner of another class.
    positions = rng.permutation(sample["row"].to_numpy(copy=True))
    with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
        for batch in load_batches(
            entries,
            positions.tolist(),
            class_index=class_index,
            preprocessor=preprocessor,
            regions=regions,
            batch_size=batch_size,
            pool=pool,
        ):
            if not batch.rows:
                continue
            objects = batch.regions[:, expected].any(axis=1)
            variants = intervene(batch.images, objects, _partners(batch.labels, rng))
            # The sample holds correctly predicted rows: the audit pass already knows
            # the original prediction, so only the three interventions cost a forward.
            predictions = {"original": batch.labels}
            names = [name for name in variants if name != "original"]
            outputs = probabilities(np.concatenate([variants[name] for name in names]))
            for name, part in zip(names, np.split(outputs, len(names)), strict=True):
                predictions[name] = part.argmax(-1)
            for position, row in enumerate(batch.rows):
                record = {"row": row, "label_index": int(batch.labels[position])}
                record.update({f"pred_{n}": int(predictions[n][position]) for n in INTERVENTIONS})
                records.append(record)
    return pd.DataFrame(records)


def summarise_interventions(
    outcomes: pd.DataFrame, class_names: Sequence[str], policy: PolicySection
) -> pd.DataFrame:
    """Per class: prediction rate under each intervention, BG-gap with CI, evidence."""
    rows = []
    if not len(outcomes):
        return pd.DataFrame(rows)
    gaps = {}
    for label, group in outcomes.groupby("label_index"):
        kept = {n: (group[f"pred_{n}"] == label).to_numpy(float) for n in INTERVENTIONS}
        gaps[int(label)] = kept["original"] - kept["mixed_rand"]
        record = {"class_index": int(label), "class_name": class_names[int(label)]}
        record["n_probe"] = len(group)
        for name in INTERVENTIONS:
            record[f"rate_{name}"] = float(kept[name].mean())
        record["bg_gap"] = float(gaps[int(label)].mean())
        low, high = bootstrap_mean_ci(
            gaps[int(label)], resamples=policy.bootstrap_resamples, seed=policy.seed
        )
        record["bg_gap_low"], record["bg_gap_high"] = low, high
        rows.append(record)
    table = pd.DataFrame(rows)
    excess, excess_low = [], []
    for record in rows:
        others = [r["bg_gap"] for r in rows if r["class_index"] != record["class_index"]]
        median = float(np.median(others)) if others else 0.0
        excess.append(record["bg_gap"] - median)
        excess_low.append(record["bg_gap_low"] - median)
    table["bg_gap_excess"] = excess
    table["bg_gap_excess_low"] = excess_low
    table["intervention_evidence"] = (table["bg_gap_excess_low"] > policy.gap_floor) & (
        table["n_probe"] >= min(policy.min_support, policy.intervention_samples)
    )
    return table
