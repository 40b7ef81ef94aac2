"""Probe: interventions that test whether a class's decisions follow its background.

Both directions a background shortcut can act in, using the expected regions (masks
or boxes) as the object; an object is removed by ``fill_objects`` (filled from the
image's own background, so no silhouette is left):

**Does class c need its background?** On up to ``policy.intervention_samples``
correctly predicted images per class:

* ``object_only``     - the background filled with the image's mean background colour;
* ``background_only`` - the object removed;
* ``mixed_rand``      - the object pasted onto the background of a random image of
  another class (whose own object is removed), as in Xiao et al.'s Mixed-Rand. The
  backgrounds come from a bank of up to ``DONORS`` sampled images spread over the
  classes, loaded first, so every image finds one of another class whatever the batch
  holds; when the sample has a single class there is none, and ``mixed_rand`` is
  left out (null) rather than faked with the image's own background.

BG-gap = acc(own background) - acc(swapped background) = 1 - rate(mixed_rand) on
these correctly predicted images.

**Do backgrounds produce class c?** The transplant test (``run_transplants``): on up
to ``policy.intervention_samples`` images *predicted* as c, right or wrong, the object
is removed and the object of a correctly predicted image of another class pasted in
its place; the rate at which the model still answers c. On an audit set whose
backgrounds are independent of the class (the usual held-out split) a shortcut shows
this way, as false positives, while c's own accuracy collapses without it and leaves
Mixed-Rand too few correct images; its sample does not depend on c's accuracy.

Each costs one forward pass per image, batched through the compiled model (the
original prediction comes from the audit pass), so both run for every class, not
only for heatmap suspects. Each class's BG-gap and transplant rate are compared with
the median of the other classes' (``add_excess``): an excess whose CI lower bound
exceeds ``policy.gap_floor`` is evidence once the run's Benjamini-Hochberg correction
(``audit.analyse.causal_evidence``) agrees.

Both sample sequentially (``policy.intervention_look``): every class gets
``REFERENCE_LOOKS`` looks of that many images, and goes on a look at a time only while
it could still become evidence (``settled_classes``, ``settled_transplants``). Each
class is compared with the median of the other classes' reference looks, which
sequential stopping does not bias. A clean class costs two looks instead of
``intervention_samples`` forwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import norm

from audit.aggregate import rate_with_ci
from audit.config import PolicySection, RegionSection
from audit.data import DECODE_THREADS, Entries, Preprocessor, load_batches

INTERVENTIONS = ("original", "object_only", "background_only", "mixed_rand", "mixed_same")
# What ``run_interventions`` probes unless told: Mixed-Same runs only where a heatmap
# flag is to be judged (``audit.analyse._interventions``).
DEFAULT_KINDS = ("object_only", "background_only", "mixed_rand")
# Looks every class gets before it may stop; the other classes are compared with the
# median of these (two looks of 40: 80 images a class, a reference precise enough to
# keep the power of probing every image, in benchmarks/sim_interventions.py).
REFERENCE_LOOKS = 2
# Donor images kept for Mixed-Rand's backgrounds and the transplant test's objects
# (memory: this many preprocessed images).
DONORS = 64
# Shifts (fractions of the image's height and width) whose copies of an image fill its
# removed object (``fill_objects``).
FILL_SHIFTS = (
    (0.0, 0.5),
    (0.5, 0.0),
    (0.5, 0.5),
    (0.0, 0.25),
    (0.25, 0.0),
    (0.0, 0.75),
    (0.75, 0.0),
    (0.25, 0.25),
    (0.75, 0.75),
    (0.25, 0.75),
    (0.75, 0.25),
)


def _per_class(rows: pd.DataFrame, by: str, per_class: int, seed: int) -> pd.DataFrame:
    """Up to ``per_class`` of ``rows`` for each value of column ``by``, seeded, in row order."""
    picks = [
        group.sample(n=min(per_class, len(group)), random_state=seed)
        for _, group in rows.groupby(by)
    ]
    return pd.concat(picks).sort_values("row", kind="stable") if picks else rows.iloc[:0]


def sample_rows(images: pd.DataFrame, per_class: int, seed: int) -> pd.DataFrame:
    """Up to ``per_class`` correctly predicted ok rows of each true class, seeded."""
    ok = images[(images["status"] == "ok") & images["correct"].astype(bool)]
    return _per_class(ok, "label_index", per_class, seed)


def _background_colours(images: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """Each image's mean colour outside its object (``(n, H, W)`` bool): ``(n, 1, 1, C)``."""
    background = ~objects
    counts = np.maximum(background.sum(axis=(1, 2)), 1)[:, None]
    sums = np.einsum("nhwc,nhw->nc", images, background.astype(images.dtype))
    return (sums / counts).astype(images.dtype)[:, None, None, :]


def _grow(objects: np.ndarray, pixels: int) -> np.ndarray:
    """``(n, H, W)`` masks grown by ``pixels`` in each image's plane."""
    from scipy.ndimage import binary_dilation

    return binary_dilation(objects, structure=np.ones((1, 3, 3), bool), iterations=pixels)


def _shifts(grown: np.ndarray) -> list[tuple[int, int]]:
    """Candidate shifts for one image's removed object (``grown``, (H, W) bool): one and
    two object widths and heights to each side (the nearest background, alike in
    colour and texture), then ``FILL_SHIFTS`` of the image."""
    height, width = grown.shape
    ys, xs = np.nonzero(grown)
    if not len(ys):
        return []
    tall, wide = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    near = [
        (dy * step * tall, dx * step * wide)
        for step in (1, 2)
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1))
    ]
    return near + [(round(dy * height), round(dx * width)) for dy, dx in FILL_SHIFTS]


def fill_objects(images: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """Each image with its object removed: the ``background_only`` intervention, and the
    backgrounds of Mixed-Rand and the transplant test.

    The object, grown by three pixels to take its anti-aliased rim, is filled with the
    image's own background, copied from a shifted copy of the image (``_shifts``: the
    nearest background first, then further): for each image the shifts are tried in
    the order of how well their copy continues the background just around the object,
    and each fills what earlier ones could not from background pixels. What no shift
    reaches (an object covering most of the image) takes the mean background colour.
    A flat fill would keep the object's silhouette (a filled stroke mask is the digit;
    a filled box looks like a "1"), and a silhouette is a shape the model may read as
    a class.
    """
    grown = _grow(objects, 3)
    rims = _grow(grown, 2) & ~grown
    height, width = objects.shape[1:]
    out = np.where(grown[..., None], _background_colours(images, objects), images)
    for index in range(len(images)):
        image, mine, rim = images[index], grown[index], rims[index]
        rim_y, rim_x = np.nonzero(rim)
        errors = []
        for dy, dx in (shifts := _shifts(mine)):
            source_y, source_x = (rim_y - dy) % height, (rim_x - dx) % width
            usable = ~mine[source_y, source_x]
            difference = image[rim_y, rim_x] - image[source_y, source_x]
            squared = (difference[usable] ** 2).sum(axis=-1)
            errors.append(squared.mean() if len(squared) else np.inf)
        todo_y, todo_x = np.nonzero(mine)
        for k in np.argsort(errors, kind="stable"):
            if not len(todo_y):
                break
            dy, dx = shifts[k]
            source_y, source_x = (todo_y - dy) % height, (todo_x - dx) % width
            found = ~mine[source_y, source_x]
            out[index, todo_y[found], todo_x[found]] = image[source_y[found], source_x[found]]
            todo_y, todo_x = todo_y[~found], todo_x[~found]
    return out


def intervene(
    images: np.ndarray,
    objects: np.ndarray,
    backgrounds: np.ndarray | None = None,
    kinds: Sequence[str] = ("original", *DEFAULT_KINDS),
    same: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The intervened copies of a batch, only those of ``kinds`` (each is a full copy).

    ``objects``: (n, H, W) bool object masks; ``backgrounds``: for each image the
    object-removed background of another class's image it is pasted onto (Mixed-Rand);
    ``same``: that of another image of its own class (Mixed-Same).
    """
    mask = objects[..., None]
    out: dict[str, np.ndarray] = {}
    if "original" in kinds:
        out["original"] = images
    if "object_only" in kinds:
        # Everything but the object is one flat colour, the mean background colour.
        out["object_only"] = np.where(mask, images, _background_colours(images, objects))
    if "background_only" in kinds:
        out["background_only"] = fill_objects(images, objects)
    if "mixed_rand" in kinds:
        if backgrounds is None:
            raise ValueError("mixed_rand needs the backgrounds to paste the objects onto")
        out["mixed_rand"] = np.where(mask, images, backgrounds)
    if "mixed_same" in kinds:
        if same is None:
            raise ValueError("mixed_same needs the backgrounds to paste the objects onto")
        out["mixed_same"] = np.where(mask, images, same)
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


def _partners(
    labels: np.ndarray, donor_labels: np.ndarray, rng, excluded: np.ndarray | None = None
) -> np.ndarray:
    """For each image a random donor of another class; -1 when there is none.
    ``excluded``: (images, donors) bool, the donors each image may not take instead
    (by default those of its own class)."""
    if excluded is None:
        excluded = donor_labels[None, :] == np.asarray(labels)[:, None]
    partners = np.full(len(labels), -1)
    for index in range(len(labels)):
        allowed = np.flatnonzero(~excluded[index])
        if len(allowed):
            partners[index] = rng.choice(allowed)
    return partners


def probe_in_rounds(
    order: pd.DataFrame,
    probe: Callable[[list[int]], list[dict]],
    *,
    look: int = 0,
    settled: Callable[[pd.DataFrame], set[int]] | None = None,
    by: str = "label_index",
) -> list[dict]:
    """The rows of ``order`` (a shuffled sample: ``row`` and the class column ``by``)
    through ``probe(rows) -> records``, each record marked with its round (``look``).

    ``look`` = 0: every row at once. ``look`` > 0: in rounds of up to ``look`` more rows
    of each class, in ``order``; from round ``REFERENCE_LOOKS`` on, ``settled(records so
    far)`` names after each round the classes that need no more rows, and later rounds
    leave them out.
    """
    turns = order.groupby(by).cumcount().to_numpy()
    records: list[dict] = []
    done: set[int] = set()
    for number, start in enumerate(range(0, len(order), look) if look > 0 else [0]):
        chosen = ~order[by].isin(done).to_numpy()
        if look > 0:
            chosen &= (turns >= start) & (turns < start + look)
        if not chosen.any():
            break
        rows = order.loc[chosen, "row"].astype(int).tolist()
        records += [record | {"look": number} for record in probe(rows)]
        if settled is not None and look > 0 and number + 1 >= REFERENCE_LOOKS:
            done |= settled(pd.DataFrame(records))
    return records


@dataclass(frozen=True)
class _Loader:
    """Loads sampled rows in batches with their object masks (the expected regions)."""

    entries: Entries
    class_index: dict[str, int]
    preprocessor: Preprocessor
    regions: Sequence[RegionSection]
    pool: ThreadPoolExecutor

    def batches(self, positions: Sequence[int], size: int):
        expected = [i for i, region in enumerate(self.regions) if region.role == "expected"]
        for batch in load_batches(
            self.entries,
            positions,
            class_index=self.class_index,
            preprocessor=self.preprocessor,
            regions=self.regions,
            batch_size=size,
            pool=self.pool,
        ):
            if batch.rows:
                yield batch, batch.regions[:, expected].any(axis=1)

    def donors(self, sample: pd.DataFrame, rng: np.random.Generator):
        """The donor bank: up to ``DONORS`` sampled (correctly predicted) rows spread
        over the classes, as ``(images, objects, labels, rows)``; ``None`` without rows."""
        loaded = list(self.batches(_donor_rows(sample, rng, DONORS), DONORS))
        if not loaded:
            return None
        parts = [(b.images, objects, b.labels, np.asarray(b.rows)) for b, objects in loaded]
        return tuple(np.concatenate(part) for part in zip(*parts, strict=True))


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
    kinds: Sequence[str] = DEFAULT_KINDS,
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
    rng = np.random.default_rng(seed)
    names = [name for name in INTERVENTIONS[1:] if name in kinds]
    with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
        loader = _Loader(entries, class_index, preprocessor, regions, pool)
        # The swapped backgrounds: a bank drawn from every class, loaded first.
        swapped = "mixed_rand" in names or "mixed_same" in names
        donors = loader.donors(sample, rng) if swapped else None
        donor_labels = np.zeros(0, int) if donors is None else donors[2]
        backgrounds = None if donors is None else fill_objects(donors[0], donors[1])
        order = sample.iloc[rng.permutation(len(sample))]
        # Every row's background partners are drawn up front, so a row's outcome does
        # not depend on the rounds it was probed in: another class's image (Mixed-Rand)
        # and another image of its own class (Mixed-Same, never the row itself).
        labels, rows = order["label_index"].to_numpy(), order["row"].to_numpy(int)
        partner_of = dict(zip(rows, _partners(labels, donor_labels, rng), strict=True))
        same = np.full(len(order), -1)
        if donors is not None:
            others = (donor_labels[None, :] != labels[:, None]) | (
                donors[3][None, :] == rows[:, None]
            )
            same = _partners(labels, donor_labels, rng, excluded=others)
        same_of = dict(zip(rows, same, strict=True))

        def probe(positions: list[int]) -> list[dict]:
            records = []
            for batch, objects in loader.batches(positions, batch_size):
                paired = {
                    "mixed_rand": np.array([partner_of[row] for row in batch.rows]),
                    "mixed_same": np.array([same_of[row] for row in batch.rows]),
                }
                # No partner (a single-class sample): any background, its result dropped.
                pasted = {
                    name: batch.images if backgrounds is None else backgrounds[np.maximum(p, 0)]
                    for name, p in paired.items()
                }
                variants = intervene(
                    batch.images,
                    objects,
                    pasted["mixed_rand"],
                    kinds=names,
                    same=pasted["mixed_same"],
                )
                # The sample holds correctly predicted rows: the audit pass already knows
                # the original prediction, so only the interventions cost a forward.
                predictions = {"original": batch.labels}
                outputs = probabilities(np.concatenate([variants[name] for name in names]))
                for name, part in zip(names, np.split(outputs, len(names)), strict=True):
                    predictions[name] = part.argmax(-1)
                for position, row in enumerate(batch.rows):
                    record = {"row": row, "label_index": int(batch.labels[position])}
                    record.update({f"pred_{n}": int(predictions[n][position]) for n in predictions})
                    for name, partner in paired.items():
                        if name in predictions and partner[position] < 0:
                            record[f"pred_{name}"] = None
                    records.append(record)
            return records

        records = probe_in_rounds(order, probe, look=look, settled=settled)
    return pd.DataFrame(records)


def predicted_rows(images: pd.DataFrame, per_class: int, seed: int) -> pd.DataFrame:
    """Up to ``per_class`` ok rows predicted as each class, right or wrong, seeded: the
    transplant test's backgrounds (``row``, ``pred``)."""
    ok = images[images["status"] == "ok"]
    return _per_class(ok, "pred", per_class, seed)[["row", "pred"]].astype(int)


def run_transplants(
    probabilities: Callable[[np.ndarray], np.ndarray],
    entries: Entries,
    sample: pd.DataFrame,
    backgrounds: pd.DataFrame,
    *,
    class_index: dict[str, int],
    preprocessor: Preprocessor,
    regions: Sequence[RegionSection],
    batch_size: int,
    seed: int,
    look: int = 0,
    settled: Callable[[pd.DataFrame], set[int]] | None = None,
) -> pd.DataFrame:
    """The transplant test: do the backgrounds of images predicted as c produce c?

    Each row of ``backgrounds`` (``row``, ``pred``: images predicted as a class,
    right or wrong) has its object removed (``fill_objects``) and the object of a donor
    of another class pasted in its place, the donor drawn from a bank of correctly
    predicted ``sample`` rows (so its object is one the model recognises). Per row:
    ``pred`` (c), the donor's class (``donor_label``) and the prediction on the
    composite (``pred_transplant``; null when no donor of another class exists).
    ``look`` and ``settled`` sample sequentially by predicted class, as Mixed-Rand does
    by true class.
    """
    rng = np.random.default_rng([seed, 1])  # its own stream: Mixed-Rand's draws stay
    with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
        loader = _Loader(entries, class_index, preprocessor, regions, pool)
        donors = loader.donors(sample, rng)
        if donors is None:
            return pd.DataFrame()
        donor_images, donor_objects, donor_labels, _ = donors
        order = backgrounds.iloc[rng.permutation(len(backgrounds))]
        # Partners drawn up front: a row's outcome does not depend on its round.
        partners = _partners(order["pred"].to_numpy(), donor_labels, rng)
        partner_of = dict(zip(order["row"].astype(int), partners, strict=True))
        predicted_as = dict(zip(order["row"].astype(int), order["pred"], strict=True))

        def probe(positions: list[int]) -> list[dict]:
            records = []
            for batch, objects in loader.batches(positions, batch_size):
                paired = np.array([partner_of[row] for row in batch.rows])
                donor = np.maximum(paired, 0)
                composites = np.where(
                    donor_objects[donor][..., None],
                    donor_images[donor],
                    fill_objects(batch.images, objects),
                )
                predictions = probabilities(composites).argmax(-1)
                for position, row in enumerate(batch.rows):
                    found = paired[position] >= 0
                    records.append(
                        {
                            "row": row,
                            "pred": int(predicted_as[row]),
                            "donor_label": int(donor_labels[donor[position]]) if found else None,
                            "pred_transplant": int(predictions[position]) if found else None,
                        }
                    )
            return records

        records = probe_in_rounds(order, probe, look=look, settled=settled, by="pred")
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
    table = pd.DataFrame(rows)
    table["intervention_evidence"] = (table["bg_gap_excess_low"] > policy.gap_floor) & (
        table["n_mixed_rand"] >= min(policy.min_support, policy.intervention_samples)
    )
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
    table = pd.DataFrame(rows)
    table["transplant_evidence"] = (table["transplant_excess_low"] > policy.gap_floor) & (
        table["n_transplant"] >= min(policy.min_support, policy.intervention_samples)
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
