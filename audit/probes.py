"""Probe: interventions that test whether a class's decisions follow its background.

On up to ``policy.intervention_samples`` correctly predicted images per class, using
the expected regions (masks or boxes) as the object:

* ``object_only``     - the background filled with the image's mean background colour;
* ``background_only`` - the object filled with that colour;
* ``mixed_rand``      - the object pasted onto the background of a random image of
  another class (whose own object is filled), as in Xiao et al.'s Mixed-Rand. The
  backgrounds come from a bank of up to ``DONORS`` sampled images spread over the
  classes, loaded first, so every image finds one of another class whatever the batch
  holds; when the sample has a single class there is none, and ``mixed_rand`` is
  left out (null) rather than faked with the image's own background.

Each costs one forward pass per image, batched through the compiled model (the
original prediction comes from the audit pass), so it runs for every class, not
only for heatmap suspects. Per class we report the rate
at which the class is still predicted under each intervention and
BG-gap = acc(own background) - acc(swapped background) = 1 - rate(mixed_rand) on
these correctly predicted images. A class has intervention evidence when its BG-gap
exceeds the median BG-gap of the other classes by more than ``policy.gap_floor``,
judged on the lower bound of the excess's CI, which combines the class's Wilson
interval with the median's own (``median_rate_interval``).

Mixed-Rand samples sequentially (``policy.intervention_look``): every class gets
``REFERENCE_LOOKS`` looks of that many images, and goes on a look at a time only while
its BG-gap could still become evidence (``settled_classes``). Each class is compared
with the median of the other classes' reference looks, which sequential stopping does
not bias. A clean class costs two looks instead of ``intervention_samples`` forwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from audit.aggregate import rate_with_ci
from audit.config import PolicySection, RegionSection
from audit.data import DECODE_THREADS, Entries, Preprocessor, load_batches

INTERVENTIONS = ("original", "object_only", "background_only", "mixed_rand")
# Looks every class gets before it may stop; the other classes are compared with the
# median of these (two looks of 40: 80 images a class, a reference precise enough to
# keep the power of probing every image, in benchmarks/sim_interventions.py).
REFERENCE_LOOKS = 2
# Backgrounds kept for Mixed-Rand (memory: this many preprocessed images).
DONORS = 64


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


def _background_colours(images: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """Each image's mean colour outside its object (``(n, H, W)`` bool): ``(n, 1, 1, C)``."""
    background = ~objects
    counts = np.maximum(background.sum(axis=(1, 2)), 1)[:, None]
    sums = np.einsum("nhwc,nhw->nc", images, background.astype(images.dtype))
    return (sums / counts).astype(images.dtype)[:, None, None, :]


def fill_objects(images: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """Each image with its object filled with its mean background colour: the
    ``background_only`` intervention, and a Mixed-Rand background."""
    return np.where(objects[..., None], _background_colours(images, objects), images)


def intervene(
    images: np.ndarray,
    objects: np.ndarray,
    backgrounds: np.ndarray | None = None,
    kinds: Sequence[str] = INTERVENTIONS,
) -> dict[str, np.ndarray]:
    """The intervened copies of a batch, only those of ``kinds`` (each is a full copy).

    ``objects``: (n, H, W) bool object masks; ``backgrounds``: for each image the
    object-filled background of another class's image it is pasted onto (Mixed-Rand).
    """
    mask = objects[..., None]
    out: dict[str, np.ndarray] = {}
    if "original" in kinds:
        out["original"] = images
    if "object_only" in kinds or "background_only" in kinds:
        colours = _background_colours(images, objects)
        if "object_only" in kinds:
            # Everything but the object is one flat colour, the mean background colour
            # that fills the object in background_only.
            out["object_only"] = np.where(mask, images, colours)
        if "background_only" in kinds:
            out["background_only"] = np.where(mask, colours, images)
    if "mixed_rand" in kinds:
        if backgrounds is None:
            raise ValueError("mixed_rand needs the backgrounds to paste the objects onto")
        out["mixed_rand"] = np.where(mask, images, backgrounds)
    return out


def round_robin(shuffled: pd.DataFrame, count: int) -> list[int]:
    """Up to ``count`` row ids of an already shuffled table, spread over the classes:
    each class's first row, then each class's second, and so on."""
    turns = shuffled.groupby("label_index").cumcount()
    picked = shuffled.assign(turn=turns).sort_values(["turn", "label_index"], kind="stable")
    return picked["row"].head(count).astype(int).tolist()


def _donor_rows(sample: pd.DataFrame, rng: np.random.Generator, count: int) -> list[int]:
    """Up to ``count`` sampled rows, spread over the classes (round robin), seeded."""
    return round_robin(sample.iloc[rng.permutation(len(sample))], count)


def _partners(labels: np.ndarray, donor_labels: np.ndarray, rng) -> np.ndarray:
    """For each image a random donor of another class; -1 when there is none."""
    partners = np.full(len(labels), -1)
    for index, label in enumerate(labels):
        others = np.flatnonzero(donor_labels != label)
        if len(others):
            partners[index] = rng.choice(others)
    return partners


def probe_in_rounds(
    order: pd.DataFrame,
    probe: Callable[[list[int]], list[dict]],
    *,
    look: int = 0,
    settled: Callable[[pd.DataFrame], set[int]] | None = None,
) -> list[dict]:
    """The rows of ``order`` (a shuffled sample: ``row``, ``label_index``) through
    ``probe(rows) -> records``, each record marked with its round (``look``).

    ``look`` = 0: every row at once. ``look`` > 0: in rounds of up to ``look`` more rows
    of each class, in ``order``; from round ``REFERENCE_LOOKS`` on, ``settled(records so
    far)`` names after each round the classes that need no more rows, and later rounds
    leave them out.
    """
    turns = order.groupby("label_index").cumcount().to_numpy()
    records: list[dict] = []
    done: set[int] = set()
    for number, start in enumerate(range(0, len(order), look) if look > 0 else [0]):
        chosen = ~order["label_index"].isin(done).to_numpy()
        if look > 0:
            chosen &= (turns >= start) & (turns < start + look)
        if not chosen.any():
            break
        rows = order.loc[chosen, "row"].astype(int).tolist()
        records += [record | {"look": number} for record in probe(rows)]
        if settled is not None and look > 0 and number + 1 >= REFERENCE_LOOKS:
            done |= settled(pd.DataFrame(records))
    return records


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
    kinds: Sequence[str] = INTERVENTIONS[1:],
    look: int = 0,
    settled: Callable[[pd.DataFrame], set[int]] | None = None,
) -> pd.DataFrame:
    """Per sampled row: the predicted class under each intervention of ``kinds``
    (``pred_<kind>``; ``pred_original`` is the label: the rows are correct ones).

    ``probabilities``: the model's batched forward pass (``GradCAM.probabilities``).
    ``look`` > 0 probes in rounds of up to ``look`` more rows of each class, in a seeded
    random order (sequential sampling, ``probe_in_rounds``): after the reference looks,
    ``settled(outcomes so far)`` names the classes that need no more rows.
    """
    expected = [i for i, region in enumerate(regions) if region.role == "expected"]
    rng = np.random.default_rng(seed)
    names = [name for name in INTERVENTIONS[1:] if name in kinds]
    with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:

        def batches(positions, size):
            for batch in load_batches(
                entries,
                positions,
                class_index=class_index,
                preprocessor=preprocessor,
                regions=regions,
                batch_size=size,
                pool=pool,
            ):
                if batch.rows:
                    yield batch, batch.regions[:, expected].any(axis=1)

        # The Mixed-Rand backgrounds: a bank drawn from every class, loaded first.
        wanted = DONORS if "mixed_rand" in names else 0
        donors = list(batches(_donor_rows(sample, rng, wanted), DONORS)) if wanted else []
        donor_labels = np.concatenate([b.labels for b, _ in donors] or [np.zeros(0, int)])
        backgrounds = (
            np.concatenate([fill_objects(b.images, objects) for b, objects in donors])
            if donors
            else None
        )
        order = sample.iloc[rng.permutation(len(sample))]
        # Every row's background partner is drawn up front, so a row's outcome does not
        # depend on the rounds it was probed in.
        partners = _partners(order["label_index"].to_numpy(), donor_labels, rng)
        partner_of = dict(zip(order["row"].astype(int), partners, strict=True))

        def probe(positions: list[int]) -> list[dict]:
            records = []
            for batch, objects in batches(positions, batch_size):
                paired = np.array([partner_of[row] for row in batch.rows])
                # No partner (a single-class sample): any background, its result dropped.
                pasted = batch.images if backgrounds is None else backgrounds[np.maximum(paired, 0)]
                variants = intervene(batch.images, objects, pasted, kinds=names)
                # The sample holds correctly predicted rows: the audit pass already knows
                # the original prediction, so only the interventions cost a forward.
                predictions = {"original": batch.labels}
                outputs = probabilities(np.concatenate([variants[name] for name in names]))
                for name, part in zip(names, np.split(outputs, len(names)), strict=True):
                    predictions[name] = part.argmax(-1)
                for position, row in enumerate(batch.rows):
                    record = {"row": row, "label_index": int(batch.labels[position])}
                    record.update({f"pred_{n}": int(predictions[n][position]) for n in predictions})
                    if "mixed_rand" in predictions and paired[position] < 0:
                        record["pred_mixed_rand"] = None
                    records.append(record)
            return records

        records = probe_in_rounds(order, probe, look=look, settled=settled)
    return pd.DataFrame(records)


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
        rows.append(record)
    for record in rows:
        others = [
            counts
            for index, counts in reference.items()
            if index != record["class_index"] and counts[1] > 0
        ]
        median, low, high = median_rate_interval(others, seed=policy.seed)
        record["bg_gap_median_others"] = median
        # The difference's interval combines both (MOVER, Newcombe's method): with two
        # or three classes the median is one or two classes' looks, far from exact.
        difference = record["bg_gap"] - median
        record["bg_gap_excess"] = difference
        record["bg_gap_excess_low"] = difference - np.hypot(
            record["bg_gap"] - record["bg_gap_low"], high - median
        )
        record["bg_gap_excess_high"] = difference + np.hypot(
            record["bg_gap_high"] - record["bg_gap"], median - low
        )
    table = pd.DataFrame(rows)
    table["intervention_evidence"] = (table["bg_gap_excess_low"] > policy.gap_floor) & (
        table["n_mixed_rand"] >= min(policy.min_support, policy.intervention_samples)
    )
    return table


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


def settled_classes(
    outcomes: pd.DataFrame, class_names: Sequence[str], policy: PolicySection
) -> set[int]:
    """The classes sequential sampling stops probing: those with at least
    ``min_support`` Mixed-Rand results whose excess BG-gap (over the other classes'
    median) has a CI upper bound of at most ``gap_floor``, so more images could hardly
    make them evidence; and those with no Mixed-Rand result at all (no partner class).
    Classes that may be bias-driven go on up to ``intervention_samples``.
    """
    table = summarise_interventions(outcomes, class_names, policy)
    if not len(table):
        return set()
    futile = (table["n_mixed_rand"] >= policy.min_support) & (
        table["bg_gap_excess_high"] <= policy.gap_floor
    )
    return set(table.loc[futile | (table["n_mixed_rand"] == 0), "class_index"].astype(int))
