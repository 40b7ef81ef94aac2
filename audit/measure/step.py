"""The compiled audit step: per batch, the forward pass, a head-only backward pass for
the configured target and for the other one (true vs predicted class), the CAMs,
their upsampling to the mask size and every region metric, all on device; and the
records it makes of a chunk.
"""

from __future__ import annotations

import math
import time
import warnings
from functools import cached_property

import keras
import numpy as np
import pandas as pd

from audit.config import AuditConfig
from audit.data.loader import Batch
from audit.data.manifest import (
    Entries,
)
from audit.engine.explain import PREDICTED, GradCAM
from audit.engine.maps import area_downscale, pad_batch, upsample
from audit.measure import spec
from audit.measure.localisation import localisation_iou
from audit.measure.metrics import hot_mask, region_mass, region_metrics


class AuditStep:
    """The compiled per-batch step of a dataset audit (any Keras backend)."""

    def __init__(self, cam: GradCAM, config: AuditConfig, size: tuple[int, int]) -> None:
        self.cam = cam
        self.config = config
        self.size = size
        self.expected = [i for i, r in enumerate(config.regions) if r.role == "expected"]
        self.pointing_cells = self._pointing_cells()
        self.cut = cam._ensure_cut(None)
        self.program = cam.program(self._measure, with_counterfactual=True)

    def _pointing_cells(self) -> tuple[int, int]:
        """``metrics.pointing_tolerance`` (input pixels) in measuring-grid cells, per axis."""
        tolerance = self.config.metrics.pointing_tolerance
        cells = tuple(  # rounded half up (Python's round(0.5) is 0)
            math.floor(tolerance * grid / side + 0.5)
            for grid, side in zip(self.metric_size, self.size, strict=True)
        )
        if tolerance > 0 and max(cells) == 0:
            warnings.warn(
                f"metrics.pointing_tolerance {tolerance} px is under half a cell of the "
                f"{self.metric_size[0]}x{self.metric_size[1]} measuring grid for "
                f"{self.size[0]}x{self.size[1]} images and has no effect; use at least "
                f"{math.ceil(max(self.size) / max(self.metric_size) / 2)} px",
                stacklevel=2,
            )
        return cells

    @cached_property  # a flexible-input model runs one image to know its map size
    def metric_size(self) -> tuple[int, int]:
        """The measuring grid: the input size, capped at ``metrics.max_side`` per side but
        never coarser than twice the map's own resolution."""
        map_height, map_width = self.cam.feature_shape(self.size)
        side = max(self.config.metrics.max_side, 2 * max(map_height, map_width))
        scale = min(1.0, side / max(self.size))
        return max(1, round(self.size[0] * scale)), max(1, round(self.size[1] * scale))

    def warm_up(self) -> float:
        """Trace (compile) the step on a batch of zeros shaped like the real ones, so the
        measuring loop's timings are steady state; returns the seconds it took."""
        size = self.config.batch_size
        tick = time.perf_counter()
        self.program(
            np.zeros((size, *self.size, self.cam.input_channels), "float32"),
            self._target_sets(np.zeros(size, "int32")),
            np.zeros((size, len(self.config.regions), *self.metric_size), "float32"),
        )
        return time.perf_counter() - tick

    def _target_sets(self, labels: np.ndarray) -> list[np.ndarray]:
        """The main target first (true or predicted class), then the other one."""
        predicted = np.full_like(labels, PREDICTED)
        return [labels, predicted] if self.config.model.target == "true" else [predicted, labels]

    def _measure(self, out, images, regions) -> dict:
        """Everything stored per image, from the maps (``keras.ops``, inside the step)."""
        ops = keras.ops
        logits = out["logits"]
        # The regions arrive on the measuring grid (see metric_size), as coverage.
        grid = tuple(regions.shape[2:4])
        result = {
            "logits": logits,
            "probabilities": self.cut.probabilities(logits),
            "target": out["targets"][0],
            "finite": ops.logical_and(out["finite"][0], out["finite"][1]),
            "cam_total": ops.sum(out["maps"][0], axis=(1, 2)),
            "cams": self._storable(out["maps"][0]),
            "cf_total": ops.sum(out["counterfactual"], axis=(1, 2)),
            "cf_mass": region_mass(upsample(out["counterfactual"], grid), regions),
        }
        for key, maps in zip(("main", "other"), out["maps"], strict=True):
            upsampled = upsample(maps, grid)
            if key == "main":
                result["loc_hot"] = hot_mask(upsampled, self.config.metrics.loc_threshold)
                if self.expected:  # weak localisation's true box: the expected pixels
                    chosen = ops.take(regions, self.expected, axis=1)
                    result["loc_truth"] = ops.any(chosen >= 0.5, axis=1)
            metrics = region_metrics(
                upsampled,
                regions,
                iou_threshold=self.config.metrics.iou_threshold,
                # The tolerance is given in input pixels; the grid may be coarser.
                pointing_tolerance=self.pointing_cells,
                names=spec.names() if key == "main" else spec.names(other_map=True),
            )
            result.update({f"{key}_{name}": value for name, value in metrics.items()})
        return result

    def _storable(self, maps):
        """Low-resolution fp16 maps: the layer's own size, capped at ``cam_size`` (area
        averaged, the same on every backend)."""
        height, width = maps.shape[1], maps.shape[2]
        cap = self.config.metrics.cam_size
        if height > cap or width > cap:
            scale = cap / max(height, width)
            shape = (max(1, round(height * scale)), max(1, round(width * scale)))
            maps = area_downscale(maps, shape)
        return keras.ops.cast(maps, "float16")

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        count = len(batch.rows)
        size = self.config.batch_size
        images, labels, regions = batch.images, batch.labels, batch.regions
        if count < size:  # keep one traced shape
            images, labels, regions = (pad_batch(a, size) for a in (images, labels, regions))
        out = self.program(images, self._target_sets(labels), regions.astype("float32"))
        self.cam.check_scores(out["logits"][:count])
        return {key: value[:count] for key, value in out.items()}


def chunk_records(
    measured: list[tuple[Batch, dict[str, np.ndarray]]],
    skipped: dict[int, str],
    entries: Entries,
    class_names: list[str],
    config: AuditConfig,
) -> pd.DataFrame:
    """One row per entry of a chunk, in row order: measured rows and skipped ones.

    Built once per chunk from plain arrays: per-batch DataFrames cost more than the
    step's own bookkeeping and hold the GIL the decode threads need.
    """
    parts = [measured_rows(batch, out, class_names, config) for batch, out in measured]
    frames = []
    if parts:
        frames.append(pd.DataFrame({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}))
    if skipped:
        frames.append(
            pd.DataFrame(
                {"row": list(skipped), "status": "skipped", "skip_reason": list(skipped.values())}
            )
        )
    table = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    table = table.sort_values("row", kind="stable").reset_index(drop=True)
    source = entries.table.iloc[table["row"].to_numpy()].reset_index(drop=True)
    keep = [c for c in source.columns if c not in table.columns]
    return pd.concat([table, source[keep]], axis=1)


def measured_rows(batch, out, class_names, config) -> dict[str, np.ndarray]:
    region_names = [region.name for region in config.regions]
    other_prefix = spec.OTHER_PREFIX[config.model.target]
    predictions = out["logits"].argmax(-1)
    frame = {
        "row": np.asarray(batch.rows, dtype="int64"),
        "label_index": batch.labels,
        "pred": predictions,
        "pred_label": np.asarray(class_names, dtype=object)[predictions],
        "confidence": out["probabilities"].max(-1),
        "correct": predictions == batch.labels,
        "target": out["target"],
        "target_score": np.take_along_axis(out["logits"], out["target"][:, None], 1)[:, 0],
        "cam_total": out["cam_total"],
        "zero_map": out["main_zero_map"],
        "status": np.where(out["finite"], "ok", "skipped").astype(object),
        "skip_reason": np.where(out["finite"], None, "non-finite activations or gradients"),
    }
    measured = (("", "main", spec.names()), (other_prefix, "other", spec.names(other_map=True)))
    for prefix, key, metrics in measured:
        for index, name in enumerate(region_names):
            for metric in metrics:
                values = out[f"{key}_{metric}"][:, index].astype("float64")
                frame[spec.column(metric, name, prefix)] = np.where(out["finite"], values, np.nan)
    for index, name in enumerate(region_names):
        values = out["cf_mass"][:, index].astype("float64")
        frame[spec.counterfactual_column(name)] = np.where(out["finite"], values, np.nan)
    frame["cf_total"] = out["cf_total"]
    # Connected components run on the host, on the measuring grid: here on the writer's
    # thread (local engine), or already in the actor (Ray).
    if "loc_iou" in out:
        loc_iou = out["loc_iou"]
    else:
        loc_iou = localisation_iou(out["loc_hot"], out.get("loc_truth"))
    frame["loc_iou"] = np.where(out["finite"], loc_iou, np.nan)
    return frame
