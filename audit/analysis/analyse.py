"""Aggregate -> flag -> probe -> strategies for a finished audit pass, and the class verdicts.

Reads ``images.parquet`` and writes, next to it:

    classes.parquet        every group (true class, predicted class, slice, class x slice)
                           with support, accuracy, mass/lift means and 95% CIs
    flags.parquet          every statistical test with its q-value, CI and verdict
    interventions.parquet  per class prediction rates under each intervention, BG-gap,
                           the transplant test, and each causal test's q-value and evidence
    associations.parquet   per slice value x class: does the slice drive the class?
    strategies.parquet     per class CAM clusters (SpRAy)
    verdicts.parquet       per class: status, severity, reasons, evidence (computed once)
    trust.json             the trust checks of the maps (docs/trust.md)
    guided/<row>.png       Guided Grad-CAM pictures of the report's example images

``report.json``, the source of truth for every other report, is built from these
(``audit.report.build``).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import keras
import pandas as pd

from audit.analysis.aggregate import aggregator_for, slice_columns_of
from audit.analysis.associations import slice_associations
from audit.analysis.examples import (
    _write_guided,
    guided_note,
    spurious_regions,
    stacked,
    worst_examples,
)
from audit.analysis.flags import evaluate_flags
from audit.analysis.probe_stats import (
    settled_classes,
    settled_transplants,
    summarise_interventions,
    summarise_transplants,
)
from audit.analysis.probes import predicted_rows, run_interventions, run_transplants, sample_rows
from audit.analysis.tables import Analysis, write_analysis
from audit.analysis.verdicts import causal_evidence, class_verdicts, judge_slice_flags
from audit.config import AuditConfig
from audit.config.decisions import SEQUENTIAL_MIN_CLASSES
from audit.data.loader import load_entry
from audit.data.manifest import Entries
from audit.data.preprocess import Preprocessor
from audit.runs.store import RunStore
from audit.timing import stage

# The analysis explains small samples (16 trust images, the examples of each class):
# its engine pads every call to at most this many images, one compiled shape for all.
ANALYSIS_BATCH = 32


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
    from audit.analysis.strategies import find_strategies
    from audit.engine.explain import GradCAM

    images = run.images()
    manifest = run.manifest()
    policy = config.policy
    if not (images["status"] == "ok").any():  # every row skipped: nothing to analyse
        empty = pd.DataFrame()
        return _judged(run, Analysis(empty, empty, empty, empty, None), manifest, config)
    # One engine for every stage after the pass: its compiled step (maps of any size,
    # predictions) is shared by the interventions, the trust checks and the guided
    # examples.
    cam = GradCAM.for_config(model, config, batch_size=min(config.batch_size, ANALYSIS_BATCH))
    class_names = manifest["class_names"]
    with stage("analysis: aggregation"):
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
            fingerprint = manifest["dataset"]["fingerprint"]
            paired = baseline_manifest["dataset"]["fingerprint"] == fingerprint
    with stage("analysis: flags"):
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
        with stage("analysis: interventions"):
            interventions = _interventions(
                partial(run_interventions, cam.probabilities, entries, **options),
                sample,
                flags,
                class_names,
                policy,
            )
        with stage("analysis: transplant test"):
            transplants = _transplants(
                partial(run_transplants, cam.probabilities, entries, sample, **options),
                predicted_rows(images, policy.intervention_samples, policy.seed),
                class_names,
                policy,
            )
        interventions = _merge_classes(interventions, transplants)
    with stage("analysis: slice associations and verdicts"):
        slice_columns = slice_columns_of(images, manifest["dataset"].get("slice_columns", []))
        associations = slice_associations(images, slice_columns, class_names, policy)
        interventions, associations = causal_evidence(interventions, associations, policy)
        flags = judge_slice_flags(flags, associations, policy)
    with stage("analysis: strategy clusters"):
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
        with stage("analysis: trust checks"):
            trust = _trust_checks(model, cam, config, load, images, len(class_names))
    if guided_note(config.trust.model_dump(), manifest["input_size"]) is None:
        rows = [
            int(row)
            for index in range(len(class_names))
            for row in worst_examples(images, index, manifest)["row"]
        ]
        with stage("analysis: guided examples"):
            _write_guided(run, model, cam, load(rows))
    analysis = Analysis(groups, flags, interventions, strategies, trust, associations)
    return _judged(run, analysis, manifest, config)


def _judged(run: RunStore, analysis: Analysis, manifest: dict, config: AuditConfig) -> Analysis:
    """The analysis with its class verdicts, written to the run's tables."""
    with stage("analysis: verdicts"):
        policy = config.policy.model_dump(mode="json")
        verdicts = pd.DataFrame(class_verdicts(analysis, manifest["class_names"], policy))
        analysis = replace(analysis, verdicts=verdicts)
    with stage("analysis: write tables"):
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


def _trust_checks(model, cam, config: AuditConfig, load, images: pd.DataFrame, num_classes: int):
    from audit.analysis.trust import run_trust_checks, trust_sample

    loaded = load(trust_sample(images, config.trust.samples, config.policy.seed))
    if len(loaded) < 2 or num_classes < 2:
        return None
    pixels, labels = stacked(loaded)
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
