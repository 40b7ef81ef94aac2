"""Sequential Mixed-Rand sampling against probing the full sample, in simulation.

``--classes`` classes (10) of ``--images`` correctly predicted images each; every
class loses a share (``--bases``) of its images to a swapped background, and class 0
that much more (``--deltas``, the planted excess BG-gap). Each run draws the outcomes
once and decides twice with the audit's own code (``probe_in_rounds``, ``settled_classes``,
``summarise_interventions``): probing every image (``intervention_look: 0``) and in
looks of 40 (the audit itself looks only from 5 classes up, ``SEQUENTIAL_MIN_CLASSES``;
``--classes 2`` shows why). Prints how often class 0 has intervention evidence
(power), the share of the other classes with evidence (false alarms) and the images
probed:

    python -m benchmarks.sim_interventions            # 300 runs per setting
    python -m benchmarks.sim_interventions --classes 2 --bases 0.3 0.5 --deltas 0 --runs 3000
"""

from __future__ import annotations

import argparse
from functools import partial

import numpy as np
import pandas as pd

from audit.analysis.probe_stats import settled_classes, summarise_interventions
from audit.analysis.probes import probe_in_rounds
from audit.config.decisions import PolicySection


def decide(order, flipped, look, policy, names):
    """Class 0's evidence, the clean classes' evidence count, images probed."""
    labels = order.sort_values("row")["label_index"].to_numpy()

    def probe(rows):
        return [
            {
                "row": row,
                "label_index": int(labels[row]),
                "pred_original": int(labels[row]),
                "pred_mixed_rand": int(labels[row] + flipped[row]) % len(names),
            }
            for row in rows
        ]

    settled = partial(settled_classes, class_names=names, policy=policy)
    records = probe_in_rounds(order, probe, look=look, settled=settled)
    evidence = summarise_interventions(pd.DataFrame(records), names, policy).set_index(
        "class_index"
    )["intervention_evidence"]
    return bool(evidence[0]), int(evidence.drop(0).sum()), len(records)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--images", type=int, default=200, help="per class")
    parser.add_argument("--look", type=int, default=40)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--bases", type=float, nargs="+", default=[0.0, 0.05, 0.15])
    parser.add_argument("--deltas", type=float, nargs="+", default=[0.0, 0.08, 0.15, 0.2])
    args = parser.parse_args(argv)
    classes = args.classes
    names = [str(c) for c in range(classes)]
    policy = PolicySection(intervention_samples=args.images)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), args.images)
    order = pd.DataFrame({"row": np.arange(len(labels)), "label_index": labels})
    print(
        f"{args.runs} runs per setting, {classes} classes x {args.images} images, looks of "
        f"{args.look}; gap_floor {policy.gap_floor}"
    )
    print(
        f"{'base':>5s} {'delta':>6s} | {'power fixed':>11s} {'sequential':>10s} | "
        f"{'false alarms fixed':>18s} {'sequential':>10s} | "
        f"{'probed fixed':>12s} {'sequential':>10s}"
    )
    for base in args.bases:
        for delta in args.deltas:
            gaps = np.full(classes, base)
            gaps[0] += delta
            results = {0: [], args.look: []}
            for _ in range(args.runs):
                flipped = rng.random(len(labels)) < gaps[labels]
                shuffled = order.iloc[rng.permutation(len(order))]
                for look in results:
                    results[look].append(decide(shuffled, flipped, look, policy, names))
            power = {look: np.mean([r[0] for r in rs]) for look, rs in results.items()}
            alarms = {
                look: sum(r[1] for r in rs) / (args.runs * (classes - 1))
                for look, rs in results.items()
            }
            probed = {look: np.mean([r[2] for r in rs]) for look, rs in results.items()}
            print(
                f"{base:5.2f} {delta:6.2f} | {power[0]:11.3f} {power[args.look]:10.3f} | "
                f"{alarms[0]:18.4f} {alarms[args.look]:10.4f} | {probed[0]:12.0f} "
                f"{probed[args.look]:10.0f}"
            )


if __name__ == "__main__":
    main()
