"""Aggregate -> flag -> probe -> strategies for a finished audit pass, and the class verdicts.

Reads ``images.parquet`` and writes, next to it:

    classes.parquet        every group (true class, predicted class, slice, class x slice)
                           with support, accuracy, mass/lift means and 95% CIs
    flags.parquet          every statistical test with its q-value, CI and verdict
    interventions.parquet  per class prediction rates under each intervention, BG-gap
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

from audit.aggregate import aggregator_for
from audit.config import SEQUENTIAL_MIN_CLASSES, AuditConfig
from audit.data import Entries, Preprocessor, load_entry
from audit.flags import evaluate_flags
from audit.probes import (
    run_interventions,
    sample_rows,
    settled_classes,
    summarise_interventions,
)
from audit.store import RunStore, atomic_write

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
    from audit.explain import GradCAM
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
        interventions = _interventions(
            partial(
                run_interventions,
                cam.probabilities,
                entries,
                class_index=class_index,
                preprocessor=preprocessor,
                regions=config.regions,
                batch_size=config.batch_size,
                seed=policy.seed,
            ),
            sample,
            flags,
            class_names,
            policy,
        )
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
    if config.trust.guided_examples:
        rows = [
            int(row)
            for index in range(len(class_names))
            for row in worst_examples(images, index, manifest)["row"]
        ]
        _write_guided(run, model, cam, load(rows))
    analysis = Analysis(groups, flags, interventions, strategies, trust)
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
        if len(flags):
            heatmap = flags["flagged"] & flags["kind"].isin(["true", "pred"])
            found |= set(flags.loc[heatmap, "class_index"].astype(int))
    # The diagnostics describe, they decide nothing: a first look (40 images) suffices.
    first = outcomes.loc[outcomes["look"] == 0, "row"]
    chosen = sample[sample["label_index"].isin(found) & sample["row"].isin(first)]
    if not len(chosen):
        return table
    details = probe(chosen, kinds=("object_only", "background_only"))
    outcomes = outcomes.merge(
        details.drop(columns=["label_index", "pred_original", "look"]), on="row", how="left"
    )
    return summarise_interventions(outcomes, class_names, policy)


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


def _write_guided(run: RunStore, model, cam, loaded) -> None:
    """Guided Grad-CAM of each example row as ``guided/<row>.png`` (grey, input size)."""
    from PIL import Image

    from audit.guided import GuidedGradCAM, guided_picture

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
        read("classes"), read("flags"), read("interventions"), read("strategies"), trust
    )


def class_verdicts(analysis: Analysis, class_names: list[str]) -> list[dict]:
    """Status per class: ok, suspected (heatmap only, warn) or bias-driven (fail).

    Interventions, with or without heatmap evidence, make a class bias-driven.
    """
    flags = analysis.flags
    interventions = analysis.interventions
    untrusted = analysis.trust is not None and analysis.trust.get("verdict") == "untrusted"
    verdicts = []
    for index, name in enumerate(class_names):
        class_flags = (
            flags[(flags["class_index"] == index) & flags["flagged"].astype(bool)]
            if len(flags)
            else flags
        )
        probe = (
            interventions[interventions["class_index"] == index]
            if len(interventions)
            else interventions
        )
        reasons = [
            f"{'predicted' if row.kind == 'pred' else 'true'}-label {row.statistic} on "
            f"{row.region} {row.group_mean:.3f} vs {row.reference_mean:.3f} "
            f"(difference CI [{row.effect_low:.3f}, {row.effect_high:.3f}], q={row.q_value:.2g})"
            for row in class_flags.itertuples()
        ]
        heatmap = len(class_flags) > 0
        intervention = bool(len(probe)) and bool(probe["intervention_evidence"].iloc[0])
        # A class whose groups were too small for any test has no evidence either way.
        tested = intervention or bool(
            "p_value" in flags and flags.loc[flags["class_index"] == index, "p_value"].notna().any()
        )
        if intervention:
            row = probe.iloc[0]
            reasons.append(
                f"interventions: BG-gap {row.bg_gap:.2f} (CI [{row.bg_gap_low:.2f}, "
                f"{row.bg_gap_high:.2f}]) vs other classes' median "
                f"{row.bg_gap - row.bg_gap_excess:.2f} (excess CI [{row.bg_gap_excess_low:.2f}, "
                f"{row.bg_gap_excess_high:.2f}])"
            )
        if intervention:
            status = "bias-driven"
            severity = "fail"
            if not heatmap:
                reasons.append(
                    "heatmap mass does not stand out (thin objects put mass outside their "
                    "masks); the interventions show the dependence"
                )
        elif heatmap:
            # Heatmap evidence alone: thin objects put mass around themselves with no
            # shortcut at all, so a suspect warns and only interventions fail a run.
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
        verdicts.append(
            {
                "class_index": index,
                "class_name": name,
                "status": status,
                "severity": severity,
                "reasons": reasons,
                "heatmap_evidence": heatmap,
                "intervention_evidence": intervention,
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
