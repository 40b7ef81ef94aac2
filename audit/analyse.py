"""Aggregate -> flag -> probe -> strategies for a finished audit pass, and the class verdicts.

Reads ``images.parquet`` and writes, next to it:

    classes.parquet        every group (true class, predicted class, slice, class x slice)
                           with support, accuracy, mass/lift means and 95% CIs
    flags.parquet          every statistical test with its q-value, CI and verdict
    interventions.parquet  per class prediction rates under each intervention, BG-gap,
                           the transplant test, and each causal test's q-value and evidence
    associations.parquet   per slice value x class: does the slice drive the class?
    strategies.parquet     per class CAM clusters (SpRAy)
    trust.json             the trust checks of the maps (docs/trust.md)
    guided/<row>.png       Guided Grad-CAM pictures of the report's example images
    report.json            the verdicts: the source of truth for every other report
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from audit.aggregate import aggregator_for, slice_columns_of
from audit.associations import slice_associations
from audit.config import SEQUENTIAL_MIN_CLASSES, AuditConfig, PolicySection
from audit.data import Entries, Preprocessor, load_entry
from audit.flags import benjamini_hochberg, evaluate_flags
from audit.probes import (
    predicted_rows,
    run_interventions,
    run_transplants,
    sample_rows,
    settled_classes,
    settled_transplants,
    summarise_interventions,
    summarise_transplants,
)
from audit.runs.store import RunStore, atomic_write

SEVERITY_ORDER = {"none": 0, "warn": 1, "fail": 2}
EXAMPLES_PER_CLASS = 4
# The analysis explains small samples (16 trust images, the examples of each class):
# its engine pads every call to at most this many images, one compiled shape for all.
ANALYSIS_BATCH = 32


@dataclass(frozen=True)
class Analysis:
    groups: pd.DataFrame
    flags: pd.DataFrame
    interventions: pd.DataFrame
    strategies: pd.DataFrame
    trust: dict | None = field(default=None)
    associations: pd.DataFrame = field(default_factory=pd.DataFrame)


def worst_examples(images: pd.DataFrame, index: int, manifest: dict) -> pd.DataFrame:
    """The class's audited rows with the most spurious mass (the report's examples)."""
    spurious = spurious_regions(manifest)
    rows = images[(images["status"] == "ok") & (images["label_index"] == index)]
    if not spurious or not len(rows):
        return rows.iloc[:0]
    column = f"mass_{spurious[0]}"
    return rows.sort_values(column, ascending=False, na_position="last").head(EXAMPLES_PER_CLASS)


def spurious_regions(manifest: dict) -> list[str]:
    return [region["name"] for region in manifest["regions"] if region["role"] == "spurious"]


def analyse(
    run: RunStore,
    config: AuditConfig,
    *,
    model: keras.Model,
    entries: Entries,
    preprocessor: Preprocessor,
    class_index: dict[str, int],
    baseline: Path | None = None,
) -> Analysis:
    """Run every analysis stage on a stored run and write its tables."""
    from audit.engine.explain import GradCAM
    from audit.strategies import find_strategies

    images = run.images()
    manifest = run.manifest()
    policy = config.policy
    if not (images["status"] == "ok").any():  # every row skipped: nothing to analyse
        empty = pd.DataFrame()
        analysis = Analysis(empty, empty, empty, empty, None)
        write_analysis(run, analysis)
        return analysis
    # One engine for every stage after the pass: its compiled step (maps of any size,
    # predictions) is shared by the interventions, the trust checks and the guided
    # examples.
    cam = GradCAM.for_config(model, config, batch_size=min(config.batch_size, ANALYSIS_BATCH))
    class_names = manifest["class_names"]
    aggregator = aggregator_for(images, manifest)
    groups = aggregator.finalize(
        class_names,
        resamples=policy.bootstrap_resamples,
        seed=policy.seed,
        min_support=policy.min_support,
    )
    baseline_aggregator, paired = None, False
    if baseline is not None:
        baseline_run = RunStore(baseline)
        baseline_manifest = baseline_run.manifest()
        baseline_aggregator = aggregator_for(baseline_run.images(), baseline_manifest)
        # The same dataset (rows and file sizes): its slices are compared image by image.
        paired = baseline_manifest["dataset"]["fingerprint"] == manifest["dataset"]["fingerprint"]
    flags = evaluate_flags(
        aggregator, class_names, spurious_regions(manifest), policy, baseline_aggregator, paired
    )
    interventions = pd.DataFrame()
    if policy.intervention_samples > 0 and any(r.role == "expected" for r in config.regions):
        sample = sample_rows(images, policy.intervention_samples, policy.seed)
        options = {
            "class_index": class_index,
            "preprocessor": preprocessor,
            "regions": config.regions,
            "batch_size": config.batch_size,
            "seed": policy.seed,
        }
        interventions = _interventions(
            partial(run_interventions, cam.probabilities, entries, **options),
            sample,
            flags,
            class_names,
            policy,
        )
        transplants = _transplants(
            partial(run_transplants, cam.probabilities, entries, sample, **options),
            predicted_rows(images, policy.intervention_samples, policy.seed),
            class_names,
            policy,
        )
        interventions = _merge_classes(interventions, transplants)
    slice_columns = slice_columns_of(images, manifest["dataset"].get("slice_columns", []))
    associations = slice_associations(images, slice_columns, class_names, policy)
    interventions, associations = causal_evidence(interventions, associations, policy)
    flags = judge_slice_flags(flags, associations, policy)
    strategies = find_strategies(
        run, images, manifest, seed=policy.seed, resamples=policy.bootstrap_resamples
    )

    def load(rows):
        loaded = [
            load_entry(entries, row, class_index, preprocessor, config.regions) for row in rows
        ]
        return [(row, item) for row, (reason, item) in zip(rows, loaded, strict=True) if item]

    trust = None
    if config.trust.samples > 0:
        trust = _trust_checks(model, cam, config, load, images, len(class_names))
    if guided_note(config.trust.model_dump(), manifest["input_size"]) is None:
        rows = [
            int(row)
            for index in range(len(class_names))
            for row in worst_examples(images, index, manifest)["row"]
        ]
        _write_guided(run, model, cam, load(rows))
    analysis = Analysis(groups, flags, interventions, strategies, trust, associations)
    write_analysis(run, analysis)
    return analysis


def _interventions(probe, sample, flags, class_names, policy) -> pd.DataFrame:
    """Mixed-Rand (the evidence) on every class's sample, sequentially when the sample
    has ``SEQUENTIAL_MIN_CLASSES`` classes: a class whose BG-gap cannot become evidence
    stops early (``settled_classes``). Then the object-only and background-only
    diagnostics on the first look's images of every class (``intervention_details:
    all``) or only of the classes with a finding: a heatmap flag or intervention
    evidence."""
    settled = partial(settled_classes, class_names=class_names, policy=policy)
    # With fewer classes the median they are compared with rests on one to three
    # classes' reference looks, too noisy a reference, and stopping would save little.
    sequential = sample["label_index"].nunique() >= SEQUENTIAL_MIN_CLASSES
    look = policy.intervention_look if sequential else 0
    outcomes = probe(sample, kinds=("mixed_rand",), look=look, settled=settled)
    table = summarise_interventions(outcomes, class_names, policy)
    if not len(table):
        return table
    if policy.intervention_details == "all":
        found = set(table["class_index"])
    else:
        found = set(table.loc[table["intervention_evidence"], "class_index"])
        found |= _heatmap_flagged(flags)
    # The diagnostics describe, they decide nothing: a first look (40 images) suffices.
    first = outcomes.loc[outcomes["look"] == 0, "row"]
    chosen = sample[sample["label_index"].isin(found) & sample["row"].isin(first)]
    extra = []
    if len(chosen):
        extra.append(probe(chosen, kinds=("object_only", "background_only")))
    # A heatmap flag is judged by whether its class needs its *own* background: on a
    # held-out set a swapped background is drawn like the own one, so a fragile (thin)
    # object loses some correct predictions to any new background. Mixed-Same (the
    # object on another image of its class, Xiao et al.) on the same images takes that
    # out: BG-gap = rate(Mixed-Same) - rate(Mixed-Rand).
    flagged = _heatmap_flagged(flags) - set(
        table.loc[table["intervention_evidence"], "class_index"]
    )
    probed = outcomes.loc[outcomes["pred_mixed_rand"].notna(), "row"]
    judged = sample[sample["label_index"].isin(flagged) & sample["row"].isin(probed)]
    if len(judged):
        extra.append(probe(judged, kinds=("mixed_same",)))
    for details in extra:
        outcomes = outcomes.merge(
            details.drop(columns=["label_index", "pred_original", "look"]), on="row", how="left"
        )
    return summarise_interventions(outcomes, class_names, policy) if extra else table


def _heatmap_flagged(flags: pd.DataFrame) -> set[int]:
    """The classes with a heatmap flag of their true or predicted group."""
    if not len(flags):
        return set()
    heatmap = flags["flagged"].astype(bool) & flags["kind"].isin(["true", "pred"])
    return set(flags.loc[heatmap, "class_index"].astype(int))


def _transplants(probe, backgrounds, class_names, policy) -> pd.DataFrame:
    """The transplant test on the backgrounds of every predicted class's images,
    sequentially (as Mixed-Rand) when they span ``SEQUENTIAL_MIN_CLASSES`` classes."""
    settled = partial(settled_transplants, class_names=class_names, policy=policy)
    sequential = backgrounds["pred"].nunique() >= SEQUENTIAL_MIN_CLASSES
    look = policy.intervention_look if sequential else 0
    outcomes = probe(backgrounds, look=look, settled=settled)
    return summarise_transplants(outcomes, class_names, policy)


def _merge_classes(interventions: pd.DataFrame, transplants: pd.DataFrame) -> pd.DataFrame:
    """One row per class with both directions' results (either may be missing)."""
    if not len(transplants):
        return interventions
    if not len(interventions):
        return transplants
    merged = interventions.merge(transplants, on=["class_index", "class_name"], how="outer")
    return merged.sort_values("class_index", kind="stable").reset_index(drop=True)


# The causal tests of a class: (p-value column, its images' count column, CI-gated
# evidence column, its own evidence column after the run's Benjamini-Hochberg
# correction, q-value column).
CAUSAL_TESTS = (
    (
        "bg_gap_p_value",
        "n_mixed_rand",
        "intervention_evidence",
        "mixed_rand_evidence",
        "bg_gap_q_value",
    ),
    (
        "transplant_p_value",
        "n_transplant",
        "transplant_evidence",
        "transplant_evidence",
        "transplant_q_value",
    ),
)


def causal_evidence(
    interventions: pd.DataFrame, associations: pd.DataFrame, policy
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Benjamini-Hochberg across every causal test of the run (Mixed-Rand and the
    transplant test per class, each slice value x class association), and the evidence
    each gives: q < ``alpha`` and the CI's lower bound above ``gap_floor``.

    Only tests with the support to give evidence are corrected for (a class with fewer
    than ``min_support`` probed images is not tested). Adds ``*_q_value`` columns,
    ``mixed_rand_evidence``, ``transplant_evidence`` and ``intervention_evidence``
    (either) to the interventions, ``q_value``, ``evidence`` and ``ruled_out`` to the
    associations (there the effect may clear the floor in false positives or in the
    class's accuracy excess; ``audit.associations``).
    """
    interventions, associations = interventions.copy(), associations.copy()
    support = min(policy.min_support, policy.intervention_samples)
    parts = []  # (table, p-value column, eligible rows)
    for p_column, count, _, _, _ in CAUSAL_TESTS:
        if p_column in interventions:
            parts.append((interventions, p_column, interventions[count].fillna(0) >= support))
    if len(associations):
        parts.append((associations, "p_value", associations["p_value"].notna()))
    p_values = np.concatenate(
        [np.where(eligible, table[column], np.nan) for table, column, eligible in parts] or [[]]
    )
    q_values = benjamini_hochberg(p_values)
    start = 0
    for table, column, _ in parts:
        table[column.replace("p_value", "q_value")] = q_values[start : start + len(table)]
        start += len(table)
    if len(interventions):
        for _, _, gate, name, q_column in CAUSAL_TESTS:
            if gate in interventions:
                passed = interventions[gate].fillna(False).astype(bool)
                interventions[name] = passed & (interventions[q_column] < policy.alpha)
            else:
                interventions[name] = False
        interventions["intervention_evidence"] = (
            interventions["mixed_rand_evidence"] | interventions["transplant_evidence"]
        )
    if len(associations):
        # The slice must raise false predictions of c (the test), and the effect must
        # clear the floor in those or in c's own accuracy gain beyond the other
        # classes' (a class right almost only on its shortcut gains most there).
        large = (associations["rd_low"] > policy.gap_floor) | (
            associations["accuracy_excess_low"].fillna(-np.inf) > policy.gap_floor
        )
        associations["evidence"] = (associations["q_value"] < policy.alpha) & large
        associations["ruled_out"] = ~associations["evidence"] & (
            associations["rd_high"] <= policy.gap_floor
        )
    return interventions, associations


def forward_passes(interventions: pd.DataFrame) -> dict[str, int]:
    """The forward passes each causal test spent (one per probed image and variant);
    the slice associations read the audit pass's predictions and spend none."""

    def total(column: str) -> int:
        return int(interventions[column].fillna(0).sum()) if column in interventions else 0

    return {
        "mixed_rand": total("n_mixed_rand"),
        "mixed_same": total("n_bg_gap_same"),  # heatmap-flagged classes only
        "diagnostics": 2 * total("n_details"),  # object only and background only
        "transplant": total("n_transplant"),
        "associations": 0,
    }


def judge_slice_flags(flags: pd.DataFrame, associations: pd.DataFrame, policy) -> pd.DataFrame:
    """A flagged slice's severity from its associations: ``fail`` when it drives a class
    (its ``drives`` lists them), ``none`` when every class's risk difference is ruled
    out (CI upper bound at most ``gap_floor``: its maps differ but its predictions do
    not), ``warn`` otherwise (heatmap evidence only)."""
    if not len(flags) or "attribute" not in flags:
        return flags
    flags = flags.copy()
    flags["drives"] = [[] for _ in range(len(flags))]
    flags["ruled_out"] = False
    if not len(associations):
        return flags
    for position, test in enumerate(flags.itertuples()):
        if test.kind != "slice":
            continue
        mine = associations[
            (associations["attribute"] == test.attribute) & (associations["value"] == test.value)
        ]
        if not len(mine):
            continue
        driven = mine.loc[mine["evidence"], "class_name"].tolist()
        flags.at[flags.index[position], "drives"] = driven
        flags.at[flags.index[position], "ruled_out"] = not driven and bool(mine["ruled_out"].all())
        if test.flagged:
            severity = "fail" if driven else "none" if mine["ruled_out"].all() else "warn"
            flags.at[flags.index[position], "severity"] = severity
    return flags


def _arrays(loaded) -> tuple[np.ndarray, np.ndarray]:
    """Images and label indices of ``(row, (label, LoadedRow))`` pairs."""
    pixels = np.stack([item.image for _, (_, item) in loaded]).astype("float32")
    return pixels, np.array([label for _, (label, _) in loaded], dtype="int32")


def _trust_checks(model, cam, config: AuditConfig, load, images: pd.DataFrame, num_classes: int):
    from audit.trust import run_trust_checks, trust_sample

    loaded = load(trust_sample(images, config.trust.samples, config.policy.seed))
    if len(loaded) < 2 or num_classes < 2:
        return None
    pixels, labels = _arrays(loaded)
    result = run_trust_checks(
        model,
        cam,
        pixels,
        labels,
        settings=config.trust,
        num_classes=num_classes,
        seed=config.policy.seed,
    )
    result["rows"] = [row for row, _ in loaded]
    return result


def guided_note(trust: dict, input_size) -> str | None:
    """Why the run draws no Guided Grad-CAM pictures (``None``: it draws them).

    Guided backpropagation shows pixel-level edges; on a small input those edges are a
    few pixels each and the picture reads as noise, so below ``trust.guided_min_side``
    the report says so instead of showing it."""
    if not trust.get("guided_examples", True):
        return "Guided Grad-CAM pictures were not drawn (trust.guided_examples: false)."
    height, width = input_size
    least = trust.get("guided_min_side", 0)
    if min(height, width) < least:
        return (
            f"Guided Grad-CAM pictures were not drawn: the model's input is {height}x{width} "
            f"px, under trust.guided_min_side ({least} px), where they read as noise rather "
            "than as an image. Set trust.guided_min_side: 0 to draw them anyway."
        )
    return None


def _write_guided(run: RunStore, model, cam, loaded) -> None:
    """Guided Grad-CAM of each example row as ``guided/<row>.png`` (grey, input size)."""
    from PIL import Image

    from audit.engine.guided import GuidedGradCAM, guided_picture

    if not loaded:
        return
    guided = GuidedGradCAM(model, cam=cam)
    folder = run.root / "guided"
    folder.mkdir(exist_ok=True)
    # Memory: one batch at a time. The full backward pass to the input is costly, so
    # the rows are split evenly (40 rows: two calls of 20, not 32 and 8 padded to 32).
    batch = math.ceil(len(loaded) / math.ceil(len(loaded) / cam.batch_size))
    for start in range(0, len(loaded), batch):
        part = loaded[start : start + batch]
        pixels, labels = _arrays(part)
        results = guided.explain(pixels, labels, batch_size=batch)
        for (row, _), result in zip(part, results, strict=True):
            picture = Image.fromarray(guided_picture(result))
            atomic_write(folder / f"{row}.png", lambda tmp, p=picture: p.save(tmp, format="PNG"))


def write_analysis(run: RunStore, analysis: Analysis) -> None:
    for name, table in (
        ("classes", analysis.groups),
        ("flags", analysis.flags),
        ("interventions", analysis.interventions),
        ("strategies", analysis.strategies),
        ("associations", analysis.associations),
    ):
        table = _parquet_safe(table)
        atomic_write(run.root / f"{name}.parquet", lambda tmp, t=table: t.to_parquet(tmp))
    trust_path = run.root / "trust.json"
    if analysis.trust is not None:
        text = json.dumps(analysis.trust, indent=2, default=float)
        atomic_write(trust_path, lambda tmp: Path(tmp).write_text(text))
    else:
        trust_path.unlink(missing_ok=True)  # never leave an earlier analysis's checks


def _parquet_safe(table: pd.DataFrame) -> pd.DataFrame:
    """Object columns of mixed None/number become floats; lists stay lists."""
    table = table.copy()
    for column in table.columns:
        if (
            table[column].dtype == object
            and table[column].map(lambda v: v is None or isinstance(v, (int, float))).all()
        ):
            table[column] = pd.to_numeric(table[column], errors="coerce")
    return table


def read_analysis(run_dir: Path) -> Analysis:
    def read(name: str) -> pd.DataFrame:
        path = Path(run_dir) / f"{name}.parquet"
        return pd.read_parquet(path) if path.exists() else pd.DataFrame()

    trust_path = Path(run_dir) / "trust.json"
    trust = json.loads(trust_path.read_text()) if trust_path.exists() else None
    return Analysis(
        read("classes"),
        read("flags"),
        read("interventions"),
        read("strategies"),
        trust,
        read("associations"),
    )


def _true(value) -> bool:
    """A stored flag that is set (a missing value, NaN in a merged table, is not)."""
    return isinstance(value, (bool, np.bool_)) and bool(value)


def _interval(value, low, high) -> str:
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def _ruled_out(probe, count: str, excess_high: str, policy: dict) -> bool:
    """A causal test that ran on ``min_support`` images and whose excess's CI upper
    bound is at most ``gap_floor``: it had the power to see a shortcut, and saw none."""
    if probe is None or pd.isna(probe.get(count)) or pd.isna(probe.get(excess_high)):
        return False
    return probe[count] >= policy["min_support"] and probe[excess_high] <= policy["gap_floor"]


def _excess_text(probe: dict, label: str, name: str, count: str, evidence: str) -> str:
    """``label`` with the excess of ``name`` over the other classes' median, its CI and
    the images behind it (``evidence`` marks it)."""
    excess = _interval(
        probe[f"{name}_excess"], probe[f"{name}_excess_low"], probe[f"{name}_excess_high"]
    )
    mark = " evidence" if _true(probe.get(evidence)) else ""
    return f"{label} excess {excess} (n={int(probe[count])}){mark}"


def _evidence_chain(probe, heatmap_rows, driving) -> str:
    """The class's tests and their numbers, in one line a reviewer can read."""
    parts = []
    if len(heatmap_rows):
        row = heatmap_rows.iloc[0]
        effect = _interval(row.effect, row.effect_low, row.effect_high)
        flagged = " flagged" if heatmap_rows["flagged"].any() else ""
        parts.append(
            f"heatmap {row.statistic} on {row.region} {row.group_mean:.2f} vs "
            f"{row.reference_mean:.2f}, difference {effect}{flagged}"
        )
    if probe is not None and probe.get("n_mixed_rand", 0) > 0:
        parts.append(
            _excess_text(
                probe, "Mixed-Rand BG-gap", "bg_gap", "n_mixed_rand", "mixed_rand_evidence"
            )
        )
    if probe is not None and probe.get("n_bg_gap_same", 0) > 0:
        gap = _interval(probe["bg_gap_same"], probe["bg_gap_same_low"], probe["bg_gap_same_high"])
        parts.append(f"Mixed-Same minus Mixed-Rand {gap} (n={int(probe['n_bg_gap_same'])})")
    if probe is not None and probe.get("n_transplant", 0) > 0:
        label = f"transplant rate {probe['transplant']:.2f}"
        parts.append(
            _excess_text(probe, label, "transplant", "n_transplant", "transplant_evidence")
        )
    for row in driving.itertuples():
        difference = _interval(row.rd, row.rd_low, row.rd_high)
        parts.append(
            f"slice {row.attribute}={row.value} predicts it for {row.rate_slice:.0%} of "
            f"other classes' images vs {row.rate_rest:.0%}, difference {difference} evidence"
        )
    return "; ".join(parts) if parts else "no test had enough images"


def class_verdicts(
    analysis: Analysis, class_names: list[str], policy: dict | None = None
) -> list[dict]:
    """Status per class, by the decision table of docs/flags.md:

    * ``bias-driven`` (fail): a causal test is evidence: Mixed-Rand (the class needs its
      background), the transplant test (backgrounds produce the class) or a slice
      association (a slice drives predictions of the class);
    * ``ok`` with a note: a heatmap flag that both interventions rule out with power
      (``_ruled_out``): thin objects put map mass around themselves with no shortcut;
    * ``suspected`` (warn): any other heatmap flag;
    * ``ok``: neither. ``tested`` is false when no test had enough images.

    ``policy``: the run's policy settings (``min_support``, ``gap_floor``; the
    defaults where missing).
    """
    policy = {**PolicySection().model_dump(), **(policy or {})}
    flags = analysis.flags
    interventions = analysis.interventions
    associations = analysis.associations
    untrusted = analysis.trust is not None and analysis.trust.get("verdict") == "untrusted"
    verdicts = []
    for index, name in enumerate(class_names):
        mine = flags[flags["class_index"] == index] if len(flags) else flags
        class_flags = mine[mine["flagged"].astype(bool)] if len(mine) else mine
        found = interventions[interventions["class_index"] == index] if len(interventions) else []
        probe = found.iloc[0].to_dict() if len(found) else None
        driving = (
            associations[(associations["class_index"] == index) & associations["evidence"]]
            if len(associations)
            else associations
        )
        reasons = [
            f"{'predicted' if row.kind == 'pred' else 'true'}-label {row.statistic} on "
            f"{row.region} {row.group_mean:.3f} vs {row.reference_mean:.3f} "
            f"(difference CI [{row.effect_low:.3f}, {row.effect_high:.3f}], q={row.q_value:.2g})"
            for row in class_flags.itertuples()
        ]
        heatmap = len(class_flags) > 0
        # Runs stored before the transplant test called Mixed-Rand's evidence
        # intervention_evidence.
        mixed_rand = bool(probe) and _true(
            probe.get("mixed_rand_evidence", probe.get("intervention_evidence"))
        )
        transplant = bool(probe) and _true(probe.get("transplant_evidence"))
        if mixed_rand:
            reasons.append(
                f"Mixed-Rand: BG-gap {probe['bg_gap']:.2f} (CI [{probe['bg_gap_low']:.2f}, "
                f"{probe['bg_gap_high']:.2f}]) vs other classes' median "
                f"{probe['bg_gap_median_others']:.2f} (excess CI "
                f"[{probe['bg_gap_excess_low']:.2f}, {probe['bg_gap_excess_high']:.2f}], "
                f"q={probe['bg_gap_q_value']:.2g}): the class needs its background"
            )
        if transplant:
            reasons.append(
                f"transplant: other classes' objects on backgrounds of images predicted as "
                f"{name} are predicted as {name} at {probe['transplant']:.2f} (CI "
                f"[{probe['transplant_low']:.2f}, {probe['transplant_high']:.2f}]) vs other "
                f"classes' median {probe['transplant_median_others']:.2f} (excess CI "
                f"[{probe['transplant_excess_low']:.2f}, {probe['transplant_excess_high']:.2f}], "
                f"q={probe['transplant_q_value']:.2g}): its backgrounds produce the class"
            )
        for row in driving.itertuples():
            reasons.append(
                f"{row.attribute}={row.value} drives predictions of {name}: "
                f"{row.rate_slice:.0%} of its images of other classes are predicted as {name} "
                f"vs {row.rate_rest:.0%} elsewhere, class by class (difference CI "
                f"[{row.rd_low:.2f}, {row.rd_high:.2f}], q={row.q_value:.2g}); {name} itself "
                f"is right on {row.accuracy_slice:.0%} of its {row.attribute}={row.value} "
                f"images vs {row.accuracy_rest:.0%} of the others"
            )
        causal = mixed_rand or transplant or len(driving) > 0
        # Mixed-Rand rules a shortcut out by its excess over the other classes' BG-gaps
        # or, for a heatmap flag, by Mixed-Same's BG-gap on the same images.
        ruled_out = not causal and (
            (
                _ruled_out(probe, "n_mixed_rand", "bg_gap_excess_high", policy)
                or _ruled_out(probe, "n_bg_gap_same", "bg_gap_same_high", policy)
            )
            and _ruled_out(probe, "n_transplant", "transplant_excess_high", policy)
        )
        # A class whose groups were too small for any test has no evidence either way.
        tested = bool(
            ("p_value" in mine and mine["p_value"].notna().any())
            or (probe and probe.get("n_mixed_rand", 0) >= policy["min_support"])
            or (probe and probe.get("n_transplant", 0) >= policy["min_support"])
            or causal
        )
        if causal:
            status, severity = "bias-driven", "fail"
            if not heatmap:
                reasons.append(
                    "heatmap mass does not stand out (thin objects put mass outside their "
                    "masks, and a shortcut on rare images moves a class's mean little); the "
                    "causal tests show the dependence"
                )
        elif heatmap and ruled_out:
            status, severity = "ok", "none"
            reasons.append(
                "the heatmap flag is not a shortcut: neither swapping the background "
                "(Mixed-Rand, against the other classes or against Mixed-Same) nor "
                "transplanting other objects onto its backgrounds moves predictions by "
                f"{policy['gap_floor']:.2f} or more (the CIs' upper bounds are below it); "
                "a thin object puts map mass around itself"
            )
        elif heatmap:
            # Heatmap evidence alone: thin objects put mass around themselves with no
            # shortcut at all, so a suspect warns and only causal tests fail a run.
            status, severity = "suspected", "warn"
        else:
            status, severity = "ok", "none"
        confidence = "normal"
        if heatmap and untrusted:
            confidence = "low"
            reasons.append(
                "low confidence in the heatmap evidence: the maps failed the trust checks ("
                + "; ".join(analysis.trust["reasons"])
                + ")"
            )
        heatmap_rows = mine[mine["p_value"].notna()] if "p_value" in mine else mine.iloc[:0]
        if len(heatmap_rows):
            heatmap_rows = heatmap_rows.sort_values("flagged", ascending=False, kind="stable")
        verdicts.append(
            {
                "class_index": index,
                "class_name": name,
                "status": status,
                "severity": severity,
                "reasons": reasons,
                "evidence": _evidence_chain(probe, heatmap_rows, driving),
                "heatmap_evidence": heatmap,
                "intervention_evidence": mixed_rand or transplant,
                "causal_evidence": bool(causal),
                "ruled_out": bool(ruled_out),
                "tested": tested,
                "confidence": confidence,
            }
        )
    return verdicts


def overall_severity(verdicts: list[dict], flags: pd.DataFrame) -> str:
    severities = [v["severity"] for v in verdicts]
    if len(flags):
        slice_flags = flags[(flags["kind"] == "slice") & flags["flagged"].astype(bool)]
        severities.extend(slice_flags["severity"])
    return max(severities, key=SEVERITY_ORDER.get, default="none")
