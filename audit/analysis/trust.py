"""Can the audit's maps be trusted? Three checks on a sample, run per audit.

* **Model-parameter randomisation** (Adebayo et al. 2018): the model has its
  weighted layers re-initialised in a cascade from the top (the logits layer) down,
  in place (the weights are restored afterwards); after each stage the maps of the
  sample are compared with the original maps by Spearman rank correlation, and
  every stage must stay below ``max_correlation``.
  Maps that barely change when the weights they should explain are destroyed are
  edge detectors, not explanations.
* **Random logit**: the map of a random other class should differ from the map of
  the explained class (mean Spearman correlation below ``random_logit_max``).
* **Faithfulness** (deletion and insertion, Petsiuk et al. 2018): pixels are removed
  most-relevant-first (replaced by a blurred or mean baseline) and the target class's
  probability is tracked; insertion starts from the baseline and adds them back. The
  areas under these curves are compared, image by image, with those of a random map:
  a faithful map deletes faster (lower deletion AUC) and inserts faster (higher
  insertion AUC). The check passes when the CI of the mean paired gain is above 0.

A check passes or fails; the two with a CI (random logit, faithfulness) are
inconclusive when the CI straddles the threshold, and the random-logit check does not
apply to the class-agnostic ``eigencam``. The trust verdict is ``trusted`` (all pass), ``untrusted``
(any fails: every heatmap flag's confidence is then low, and the report says so) or
``uncertain``.
"""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
from scipy import integrate, ndimage, stats

from audit.analysis.intervals import bootstrap_mean_ci
from audit.analysis.probes import round_robin
from audit.engine.cam_methods import class_agnostic, get_cam_method
from audit.engine.explain import GradCAM


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each pair of maps; a constant map correlates 0."""
    out = np.zeros(len(a))
    for index, (x, y) in enumerate(zip(a, b, strict=True)):
        x, y = np.ravel(x), np.ravel(y)
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            out[index] = 1.0 if np.array_equal(x, y) else 0.0
            continue
        out[index] = stats.spearmanr(x, y).statistic
    return out


def _weighted_layers(model) -> list:
    """Layers with a kernel, nested models flattened, in order from input to output."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(_weighted_layers(layer))
        elif (
            any(hasattr(layer, name) for name in ("kernel", "depthwise_kernel", "pointwise_kernel"))
            and layer.weights
        ):
            found.append(layer)
    return found


def _stage_sizes(count: int) -> list[int]:
    """Top layers randomised at each stage: the logits layer, then 25/50/100% of all."""
    sizes = sorted({1, max(1, count // 4), max(1, count // 2), count})
    return [size for size in sizes if size <= count]


def randomisation_check(
    model: keras.Model,
    cam: GradCAM,
    images: np.ndarray,
    targets: np.ndarray,
    original: np.ndarray,
    *,
    seed: int = 0,
) -> list[dict]:
    """Per cascade stage: how many top layers are random and the maps' mean Spearman.

    Kernels are redrawn from N(0, std of the original kernel), biases set to zero;
    batch-norm statistics are kept (they would only rescale the activations). The
    cascade runs on ``model``'s own weights, in place, so ``cam``'s compiled step is
    reused (no copy to build and compile); every weight is restored afterwards, even
    on an error. The first entry (0 layers) compares the restored model's maps with
    ``original``: 1.0 when the model is back as it was.
    """
    if model is not cam.model:
        raise ValueError("randomisation_check needs the engine of this very model (cam.model)")
    rng = np.random.default_rng(seed)
    layers = _weighted_layers(model)[::-1]  # top first
    # A softmax layer's linear twin in the engine shares its variables: no copy to sync.
    variables = [variable for layer in layers for variable in layer.weights]
    saved = [np.array(variable.numpy()) for variable in variables]
    size = original.shape[1:3]  # the original maps' size (layer or input resolution)
    stages = []
    done = 0
    try:
        for top in _stage_sizes(len(layers)):
            for layer in layers[done:top]:
                for variable in layer.weights:
                    values = np.asarray(variable.numpy())
                    if "bias" in variable.path.split("/")[-1]:
                        variable.assign(np.zeros_like(values))
                    else:
                        scale = float(values.std()) or 0.05
                        variable.assign(rng.normal(0, scale, values.shape).astype(values.dtype))
            done = top
            maps = cam.explain(images, targets, size)
            stages.append(
                {
                    "layers_randomised": top,
                    "layer": layers[top - 1].name,
                    "correlation": float(spearman_rows(maps, original).mean()),
                }
            )
    finally:
        for variable, values in zip(variables, saved, strict=True):
            variable.assign(values)
    if not all(
        np.array_equal(variable.numpy(), values)
        for variable, values in zip(variables, saved, strict=True)
    ):
        raise RuntimeError("the model's weights could not be restored after randomisation")
    restored = spearman_rows(cam.explain(images, targets, size), original).mean()
    return [{"layers_randomised": 0, "layer": None, "correlation": float(restored)}, *stages]


def _baseline(images: np.ndarray, kind: str) -> np.ndarray:
    if kind == "mean":
        return np.broadcast_to(images.mean(axis=(1, 2), keepdims=True), images.shape).copy()
    sigma = max(images.shape[1], images.shape[2]) / 16
    return np.stack(
        [ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0)) for image in images]
    ).astype(images.dtype)


def deletion_insertion(
    probability, images, targets, maps_sets, *, steps: int, baseline: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Deletion and insertion AUC per image for each set of maps (at the images' size).

    ``probability(batch) -> (batch, classes)`` softmax outputs. Pixels are ranked by
    the map (ties in a fixed pixel order) and moved in ``steps`` equal portions; the AUC
    is the trapezoid mean of the target probability over the ``steps + 1`` points. At
    each inner step every map set's deleted and inserted images go through one batched
    call; the ends (the image, the baseline) are shared by all curves.
    """
    count, height, width = maps_sets[0].shape
    pixels = height * width
    orders = [np.argsort(-m.reshape(count, pixels), axis=1, kind="stable") for m in maps_sets]
    base = _baseline(images, baseline)
    curves = np.zeros((len(maps_sets), 2, count, steps + 1))  # set, deletion/insertion

    def target_probability(batch: np.ndarray, repeats: int) -> np.ndarray:
        output = probability(batch.astype("float32"))
        return np.take_along_axis(output, np.tile(targets, repeats)[:, None], 1)[:, 0]

    # Every curve starts and ends at the image or the baseline, whatever the map.
    kept, moved = np.split(target_probability(np.concatenate([images, base]), 2), 2)
    curves[:, 0, :, 0] = curves[:, 1, :, steps] = kept
    curves[:, 0, :, steps] = curves[:, 1, :, 0] = moved
    for step in range(1, steps):
        take = round(pixels * step / steps)
        variants = []
        for order in orders:
            moved = np.zeros((count, pixels), bool)
            np.put_along_axis(moved, order[:, :take], True, axis=1)
            moved = moved.reshape(count, height, width, 1)
            variants += [np.where(moved, base, images), np.where(moved, images, base)]
        picked = target_probability(np.concatenate(variants), len(variants))
        curves[:, :, :, step] = picked.reshape(len(maps_sets), 2, count)
    aucs = integrate.trapezoid(curves, dx=1 / steps, axis=3)
    return [(aucs[index, 0], aucs[index, 1]) for index in range(len(maps_sets))]


def run_trust_checks(
    model: keras.Model,
    cam: GradCAM,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    settings,
    num_classes: int,
    seed: int = 0,
) -> dict:
    """Every check on one sample of preprocessed images with their true labels."""
    rng = np.random.default_rng(seed)
    size = images.shape[1:3]
    # Every map at the input size: one traced step serves all checks.
    original = cam.explain(images, labels, size=size)
    result = {"layer": cam.layer_path, "method": cam.method, "samples": int(len(images))}
    stages = randomisation_check(model, cam, images, labels, original, seed=seed)
    # From the first stage (the logits layer alone) on, the maps must have moved:
    # once the layers under the target are random too, almost any map decorrelates.
    worst = max(stage["correlation"] for stage in stages[1:])
    result["randomisation"] = {
        "stages": stages,
        "correlation": worst,
        "threshold": settings.max_correlation,
        "status": "pass" if worst < settings.max_correlation else "fail",
    }
    others = (labels + rng.integers(1, num_classes, size=len(labels))) % num_classes
    correlations = spearman_rows(cam.explain(images, others.astype("int32"), size), original)
    low, high = bootstrap_mean_ci(correlations, seed=seed, bounds=(-1.0, 1.0))
    result["random_logit"] = {
        "correlation": float(correlations.mean()),
        "ci": [low, high],
        "threshold": settings.random_logit_max,
        # Eigen-CAM ignores the class by design: the check does not apply.
        "status": "not applicable"
        if class_agnostic(get_cam_method(cam.method))
        else _status(high < settings.random_logit_max, low >= settings.random_logit_max),
    }
    random_maps = rng.random((len(images), *size)).astype("float32")
    (cam_del, cam_ins), (rnd_del, rnd_ins) = deletion_insertion(
        cam.probabilities,
        images,
        labels,
        [original, random_maps],
        steps=settings.steps,
        baseline=settings.baseline,
    )
    gain = (rnd_del - cam_del) + (cam_ins - rnd_ins)
    low, high = bootstrap_mean_ci(gain, seed=seed, bounds=(-2.0, 2.0))  # two AUC gains
    result["faithfulness"] = {
        "baseline": settings.baseline,
        "steps": settings.steps,
        "deletion_auc": float(cam_del.mean()),
        "deletion_auc_random": float(rnd_del.mean()),
        "insertion_auc": float(cam_ins.mean()),
        "insertion_auc_random": float(rnd_ins.mean()),
        "gain": float(gain.mean()),
        "gain_ci": [low, high],
        "status": _status(low > 0, high < 0),
    }
    curves = {
        "deletion_auc": cam_del,
        "insertion_auc": cam_ins,
        "deletion_auc_random": rnd_del,
        "insertion_auc_random": rnd_ins,
    }
    result["per_class"] = (
        pd.DataFrame({"class_index": labels, **curves})
        .groupby("class_index")
        .agg(n=("deletion_auc", "size"), **{name: (name, "mean") for name in curves})
        .reset_index()
        .to_dict("records")
    )
    result.update(trust_verdict(result))
    return result


def _status(passed: bool, failed: bool) -> str:
    return "pass" if passed else "fail" if failed else "inconclusive"


CHECKS = ("randomisation", "random_logit", "faithfulness")


def trust_verdict(result: dict) -> dict:
    """``trusted`` / ``untrusted`` / ``uncertain`` with the reasons."""
    statuses = {
        check: result[check]["status"]
        for check in CHECKS
        if result[check]["status"] != "not applicable"
    }
    reasons = []
    if statuses["randomisation"] != "pass":
        reasons.append(
            f"maps of a randomised model still correlate up to "
            f"{result['randomisation']['correlation']:.2f} with the trained model's "
            f"(threshold {result['randomisation']['threshold']})"
        )
    if statuses.get("random_logit", "pass") != "pass":
        reasons.append(
            f"maps of a random other class correlate {result['random_logit']['correlation']:.2f}"
            f" with the explained class's ({statuses['random_logit']})"
        )
    if statuses["faithfulness"] != "pass":
        ci = result["faithfulness"]["gain_ci"]
        reasons.append(
            f"deletion/insertion gain over a random map {result['faithfulness']['gain']:.3f}, "
            f"CI [{ci[0]:.3f}, {ci[1]:.3f}] ({statuses['faithfulness']})"
        )
    if "fail" in statuses.values():
        verdict = "untrusted"
    elif "inconclusive" in statuses.values():
        verdict = "uncertain"
    else:
        verdict = "trusted"
    return {"verdict": verdict, "reasons": reasons}


def trust_sample(images: pd.DataFrame, count: int, seed: int) -> list[int]:
    """Rows for the checks: ok rows, seeded, spread over classes (round robin)."""
    ok = images[images["status"] == "ok"]
    return sorted(round_robin(ok.sample(frac=1.0, random_state=seed), count))
