"""Aggregate -> flag -> probe -> strategies for a finished audit pass, and the class verdicts.

Reads ``images.parquet`` and writes, next to it:

    classes.parquet        every group (true class, predicted class, slice, class x slice)
                           with support, accuracy, mass/lift means and 95% CIs
    flags.parquet          every statistical test with its q-value, CI and verdict
    interventions.parquet  per class prediction rates under each intervention, BG-gap
    strategies.parquet     per class CAM clusters (SpRAy)
    report.json            the verdicts: the source of truth for every other report
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import pandas as pd

from audit.aggregate import aggregator_for
from audit.config import AuditConfig
from audit.data import Entries, Preprocessor
from audit.flags import evaluate_flags
from audit.probes import run_interventions, sample_rows, summarise_interventions
from audit.store import RunStore, atomic_write

SEVERITY_ORDER = {"none": 0, "warn": 1, "fail": 2}


@dataclass(frozen=True)
class Analysis:
    groups: pd.DataFrame
    flags: pd.DataFrame
    interventions: pd.DataFrame
    strategies: pd.DataFrame


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
    from audit.strategies import find_strategies

    images = run.images()
    manifest = run.manifest()
    policy = config.policy
    class_names = manifest["class_names"]
    aggregator = aggregator_for(images, manifest)
    groups = aggregator.finalize(
        class_names, resamples=policy.bootstrap_resamples, seed=policy.seed
    )
    baseline_aggregator = None
    if baseline is not None:
        baseline_run = RunStore(baseline)
        baseline_aggregator = aggregator_for(baseline_run.images(), baseline_run.manifest())
    flags = evaluate_flags(
        aggregator, class_names, spurious_regions(manifest), policy, baseline_aggregator
    )
    interventions = pd.DataFrame()
    if policy.intervention_samples > 0 and any(r.role == "expected" for r in config.regions):
        sample = sample_rows(images, policy.intervention_samples, policy.seed)
        outcomes = run_interventions(
            model,
            entries,
            sample,
            class_index=class_index,
            preprocessor=preprocessor,
            regions=config.regions,
            batch_size=config.batch_size,
            seed=policy.seed,
        )
        interventions = summarise_interventions(outcomes, class_names, policy)
    strategies = find_strategies(run, images, manifest, seed=policy.seed)
    analysis = Analysis(groups, flags, interventions, strategies)
    write_analysis(run, analysis)
    return analysis


def write_analysis(run: RunStore, analysis: Analysis) -> None:
    for name, table in (
        ("classes", analysis.groups),
        ("flags", analysis.flags),
        ("interventions", analysis.interventions),
        ("strategies", analysis.strategies),
    ):
        table = _parquet_safe(table)
        atomic_write(run.root / f"{name}.parquet", lambda tmp, t=table: t.to_parquet(tmp))


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

    return Analysis(read("classes"), read("flags"), read("interventions"), read("strategies"))


def class_verdicts(analysis: Analysis, class_names: list[str]) -> list[dict]:
    """Status per class: ok, suspected (heatmap only, warn) or bias-driven (fail).

    Interventions, with or without heatmap evidence, make a class bias-driven.
    """
    flags = analysis.flags
    interventions = analysis.interventions
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
        if intervention:
            row = probe.iloc[0]
            reasons.append(
                f"interventions: BG-gap {row.bg_gap:.2f} (CI [{row.bg_gap_low:.2f}, "
                f"{row.bg_gap_high:.2f}]) vs other classes' median "
                f"{row.bg_gap - row.bg_gap_excess:.2f}"
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
        verdicts.append(
            {
                "class_index": index,
                "class_name": name,
                "status": status,
                "severity": severity,
                "reasons": reasons,
                "heatmap_evidence": heatmap,
                "intervention_evidence": intervention,
            }
        )
    return verdicts


def overall_severity(verdicts: list[dict], flags: pd.DataFrame) -> str:
    severities = [v["severity"] for v in verdicts]
    if len(flags):
        slice_flags = flags[(flags["kind"] == "slice") & flags["flagged"].astype(bool)]
        severities.extend(slice_flags["severity"])
    return max(severities, key=SEVERITY_ORDER.get, default="none")
