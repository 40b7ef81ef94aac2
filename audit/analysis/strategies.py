"""Strategies: cluster each class's CAMs to find minority strategies (SpRAy).

Spectral Relevance Analysis (Lapuschkin et al. 2019): per class, the stored
low-resolution CAMs are normalised to unit mass, a symmetric k-nearest-neighbour
affinity graph is built, the number of clusters is read from the largest gap in
the normalised Laplacian's smallest eigenvalues, and scikit-learn's spectral
clustering assigns the maps. A small cluster with high spurious mass (say 15% of a
class looking at a corner watermark) is a finding even when the class average
looks fine.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.sparse.csgraph import laplacian
from sklearn.cluster import SpectralClustering
from sklearn.neighbors import kneighbors_graph

from audit.analysis.intervals import mean_with_ci, rate_with_ci
from audit.measure import spec
from audit.runs.store import RunStore

MIN_CLASS_SIZE = 12
# Spectral clustering is O(n^3) in the maps of a class: cluster a seeded sample.
MAX_MAPS_PER_CLASS = 1000
MAX_CLUSTERS = 6
# A cluster this small whose spurious mass exceeds the class's by this much (judged on
# its 95% CI's lower bound, so one odd map is never a strategy) is a finding.
MINORITY_FRACTION = 0.35
MINORITY_EXCESS = 0.10
EXAMPLES = 5


def eigengap_clusters(affinity: np.ndarray, max_clusters: int = MAX_CLUSTERS) -> int:
    """Number of clusters from the largest gap among the Laplacian's smallest eigenvalues."""
    eigenvalues = np.sort(np.linalg.eigvalsh(laplacian(affinity, normed=True)))
    candidates = eigenvalues[: max_clusters + 1]
    if len(candidates) < 3:
        return 1
    gaps = np.diff(candidates)
    return int(np.argmax(gaps[:max_clusters]) + 1)


def cluster_maps(maps: np.ndarray, seed: int = 0) -> np.ndarray:
    """Cluster labels for (n, h, w) maps, normalised to unit mass; all-zero maps excluded."""
    flat = maps.reshape(len(maps), -1).astype("float64")
    flat = flat / np.maximum(flat.sum(axis=1, keepdims=True), 1e-12)
    neighbours = min(10, len(flat) - 1)
    graph = kneighbors_graph(flat, neighbours, include_self=False)
    affinity = 0.5 * (graph + graph.T).toarray()
    clusters = eigengap_clusters(affinity)
    if clusters <= 1:
        return np.zeros(len(flat), dtype=int)
    model = SpectralClustering(
        n_clusters=clusters, affinity="precomputed", random_state=seed, assign_labels="kmeans"
    )
    return model.fit_predict(affinity)


def find_strategies(
    run: RunStore, images: pd.DataFrame, manifest: dict, *, seed: int = 0, resamples: int = 1000
) -> pd.DataFrame:
    """One row per (class, cluster): ``cluster_records`` of every class with enough maps."""
    rows, cams = run.cams()
    if not len(rows):
        return pd.DataFrame()
    position = {int(row): index for index, row in enumerate(rows)}
    ok = images[(images["status"] == "ok") & ~images["zero_map"].astype(bool)]
    records = []
    for _, group in ok.groupby("label_index"):
        group = group[group["row"].isin(position)]
        if len(group) < MIN_CLASS_SIZE:
            continue
        if len(group) > MAX_MAPS_PER_CLASS:
            group = group.sample(n=MAX_MAPS_PER_CLASS, random_state=seed).sort_values("row")
        maps = cams[[position[int(r)] for r in group["row"]]].astype("float32")
        labels = cluster_maps(maps, seed)
        records += cluster_records(group, maps, labels, manifest, seed=seed, resamples=resamples)
    return pd.DataFrame(records)


def cluster_records(
    group: pd.DataFrame,
    maps: np.ndarray,
    labels: np.ndarray,
    manifest: dict,
    *,
    seed: int = 0,
    resamples: int = 1000,
) -> list[dict]:
    """One record per cluster of a class's rows (``group``, with their ``maps``): size,
    share, accuracy and mass per region with 95% CIs, mean map, examples, and whether
    it is a minority strategy."""
    regions = [region["name"] for region in manifest["regions"]]
    spurious = [r["name"] for r in manifest["regions"] if r["role"] == "spurious"]
    mass = {name: spec.column("mass", name) for name in regions}
    class_spurious = {name: group[mass[name]].mean() for name in spurious}
    records = []
    for cluster in sorted(set(labels.tolist())):
        members = group[labels == cluster]
        mean_map = maps[labels == cluster].mean(axis=0)
        label = int(members["label_index"].iloc[0])
        record = {
            "class_index": label,
            "class_name": manifest["class_names"][label],
            "cluster": int(cluster),
            "size": len(members),
            "fraction": len(members) / len(group),
            **rate_with_ci(members["correct"].astype(float), "accuracy"),
            "map_shape": list(mean_map.shape),
            "mean_map": mean_map.ravel().round(5).tolist(),
            "examples": members["row"].head(EXAMPLES).astype(int).tolist(),
            "members": members["row"].astype(int).tolist(),
        }
        for name in regions:
            record.update(
                mean_with_ci(
                    members[mass[name]], mass[name], share=True, resamples=resamples, seed=seed
                )
            )
        # How far the cluster's spurious mass exceeds its class's, and the least it
        # does within the cluster's CI (NaN for a single map: no CI).
        excess = [record[mass[name]] - class_spurious[name] for name in spurious]
        excess_low = [record[f"{mass[name]}_low"] - class_spurious[name] for name in spurious]
        record["spurious_excess"] = max(excess, default=0.0)
        bounded = [value for value in excess_low if np.isfinite(value)]
        record["spurious_excess_low"] = max(bounded) if bounded else np.nan
        record["minority_strategy"] = bool(
            record["fraction"] < MINORITY_FRACTION
            and record["spurious_excess_low"] > MINORITY_EXCESS
        )
        records.append(record)
    return records
