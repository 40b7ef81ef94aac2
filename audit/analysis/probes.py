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
(``audit.analysis.verdicts.causal_evidence``) agrees.

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

from audit.analysis.fill import DEFAULT_KINDS, INTERVENTIONS, fill_objects, intervene
from audit.config.sections import RegionSection
from audit.data.decode import DECODE_THREADS
from audit.data.loader import load_batches
from audit.data.manifest import Entries
from audit.data.preprocess import Preprocessor

# Looks every class gets before it may stop; the other classes are compared with the
# median of these (two looks of 40: 80 images a class, a reference precise enough to
# keep the power of probing every image, in benchmarks/sim_interventions.py).
REFERENCE_LOOKS = 2
# Donor images kept for Mixed-Rand's backgrounds and the transplant test's objects
# (memory: this many preprocessed images).
DONORS = 64


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
