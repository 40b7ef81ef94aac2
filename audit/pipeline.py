"""The local (embedded) audit: load -> explain -> measure -> store, streamed in chunks.

One compiled step per batch runs the forward pass, a head-only backward pass for
the configured target and for the other one (true vs predicted class), the CAMs,
their upsampling to the mask size and every region metric, all on device. Rows go
to disk chunk by chunk, so memory stays flat in dataset size and a killed run
resumes at the first missing chunk.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import math
import os
import platform
import re
import time
import warnings
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from audit.analysis.analyse import analyse
from audit.config import AuditConfig, ConfigError, RegionSection
from audit.data.decode import DECODE_THREADS, forget_resolved_paths
from audit.data.faces import FACE_COLUMNS, LANDMARK_COLUMNS
from audit.data.loader import Batch, load_batches
from audit.data.manifest import (
    BOX_COLUMNS,
    RESERVED_COLUMNS,
    Entries,
    class_names_for,
    read_entries,
)
from audit.data.preprocess import Preprocessor
from audit.engine.explain import PREDICTED, GradCAM, area_downscale, pad_batch, upsample
from audit.engine.models import load_model
from audit.metrics import METRICS, hot_mask, region_mass, region_metrics
from audit.report.write import write_reports
from audit.runs.history import index_run
from audit.runs.store import RunBusyError, RunStore, file_sha256, hold_run, latest_run, this_process

# Rows per stored chunk, in batches: the unit of resume and of memory.
BATCHES_PER_CHUNK = 4


@dataclass(frozen=True)
class AuditResult:
    """A finished (or resumed-to-completion) run."""

    run_dir: Path
    images: pd.DataFrame
    manifest: dict
    reused: bool = False  # a complete run with the same key was returned, not recomputed


# The other target's map (pred_* or true_*) skips rank_acc: it needs a sort of
# every map, the costliest metric, and no flag reads it.
OTHER_METRICS = tuple(metric for metric in METRICS if metric != "rank_acc")


def dataset_fingerprint(entries: Entries) -> tuple[str, str]:
    """Two hashes of the entries table and the files it names, in one pass.

    The identity (the table and every file's size) is what a baseline must share: a
    copy restored without its file times is the same dataset. The version adds the
    modification times (what make and rsync go by): a run key and the face cache are
    keyed on it, so a file rewritten in place, even at the same size, is new data,
    never a reused run's.
    """
    buffer = io.StringIO()
    entries.table.to_csv(buffer, index=False)
    identity, version = hashlib.sha256(), hashlib.sha256()
    for digest in (identity, version):
        digest.update(buffer.getvalue().encode())
    for column, base in (("path", entries.root), ("mask_path", entries.mask_base)):
        if column in entries.table.columns:
            for value in entries.table[column].dropna():
                path = base / str(value)
                try:
                    stat = path.stat()
                except (OSError, ValueError):  # missing or unreadable: a skipped row
                    identity.update(b"-1")
                    version.update(b"-1")
                    continue
                identity.update(str(stat.st_size).encode())
                version.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return identity.hexdigest(), version.hexdigest()


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
                ranked=key == "main",
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


def _chunk_records(
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
    parts = [_measured_rows(batch, out, class_names, config) for batch, out in measured]
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


def _measured_rows(batch, out, class_names, config) -> dict[str, np.ndarray]:
    region_names = [region.name for region in config.regions]
    other_prefix = "pred_" if config.model.target == "true" else "true_"
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
    for prefix, key, metrics in (("", "main", METRICS), (other_prefix, "other", OTHER_METRICS)):
        for index, name in enumerate(region_names):
            for metric in metrics:
                values = out[f"{key}_{metric}"][:, index].astype("float64")
                frame[f"{prefix}{metric}_{name}"] = np.where(out["finite"], values, np.nan)
    for index, name in enumerate(region_names):
        values = out["cf_mass"][:, index].astype("float64")
        frame[f"cf_mass_{name}"] = np.where(out["finite"], values, np.nan)
    frame["cf_total"] = out["cf_total"]
    # Connected components run on the host, on the measuring grid: here on the writer's
    # thread (local engine), or already in the actor (Ray).
    if "loc_iou" in out:
        loc_iou = out["loc_iou"]
    else:
        loc_iou = localisation_iou(out["loc_hot"], out.get("loc_truth"))
    frame["loc_iou"] = np.where(out["finite"], loc_iou, np.nan)
    return frame


def localisation_iou(hot: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """Weak localisation (the Grad-CAM paper's ILSVRC protocol), per image.

    The map's box bounds the largest connected component of ``hot`` (map >= t * max);
    the true box bounds ``truth``, the expected regions' pixels (at least half
    covered). Returns their box IoU; 0 for a zero map (no box), NaN when there is no
    expected region (``truth`` None or empty).
    """
    from scipy import ndimage

    result = np.full(len(hot), np.nan)
    if truth is None:
        return result
    for index, (mask, target) in enumerate(zip(hot, truth, strict=True)):
        if not target.any():
            continue
        labelled, count = ndimage.label(mask)
        if count == 0:  # a zero map draws no box: a miss
            result[index] = 0.0
            continue
        sizes = np.bincount(labelled.ravel())[1:]
        found = _box(labelled == 1 + int(sizes.argmax()))
        result[index] = box_iou(found, _box(target))
    return result


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1), inclusive-exclusive, of a non-empty mask's pixels."""
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of two (y0, x0, y1, x1) boxes."""
    height = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    width = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = height * width
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def _versions() -> dict:
    import audit

    backend = keras.backend.backend()
    versions = {
        "bias_audit": audit.__version__,
        "keras_backend": backend,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    if backend != "tensorflow":
        versions[backend] = importlib.import_module(backend).__version__
    return versions


def _input_size(model: keras.Model, config: AuditConfig) -> tuple[int, int]:
    shape = model.input_shape
    if config.preprocess.size is not None:
        size = tuple(config.preprocess.size)
        fixed = not isinstance(shape, list) and len(shape) == 4 and None not in shape[1:3]
        if fixed and size != tuple(shape[1:3]):
            raise ConfigError(
                f"preprocess.size {list(size)} differs from the model's input size "
                f"{list(shape[1:3])}; images are resized to preprocess.size, so set it to "
                f"{list(shape[1:3])} or leave it out"
            )
        return size
    if isinstance(shape, list) or len(shape) != 4 or None in shape[1:3]:
        raise ConfigError(
            f"cannot tell the model's image size from its input shape {shape}; set "
            "preprocess.size: [height, width]"
        )
    return int(shape[1]), int(shape[2])


def _input_channels(cam: GradCAM, config: AuditConfig) -> int:
    """The model's input channels: 3 (images decoded as RGB) or 1 (decoded as grey)."""
    channels = cam.input_channels
    if channels not in (1, 3):
        raise ConfigError(
            f"the model's input has {channels} channels; the audit decodes images as RGB "
            "(3 channels) or grey (1 channel)"
        )
    if channels == 1 and config.preprocess.keras_preprocess is not None:
        raise ConfigError(
            f"preprocess.keras_preprocess {config.preprocess.keras_preprocess!r} expects RGB "
            "images, but the model takes one channel (grey); use preprocess.scale (and "
            "mean/std with one value) instead"
        )
    for key in ("mean", "std"):
        values = getattr(config.preprocess, key)
        if values is not None and len(values) != channels:
            raise ConfigError(
                f"preprocess.{key} has {len(values)} values, but the model's input has "
                f"{channels} channel{'s' if channels > 1 else ''}; give one value per channel"
            )
    return channels


@contextlib.contextmanager
def _failed_on_error(run: RunStore):
    """A run that stops on an error ends ``failed`` with the reason in its manifest
    (``bias-audit history``, the dashboard and ``--resume`` show it), and the error goes
    on up naming the run (``audit.errors.failed_run``). A Ctrl-C leaves it ``running``:
    no process holds it, so it shows as interrupted. Where even the manifest cannot be
    written (the disk full), it shows as interrupted too."""
    try:
        yield
    except Exception as error:
        if run.exists():
            failure = {
                "error": type(error).__name__,
                "message": str(error),
                "at": datetime.now(timezone.utc).isoformat(),
            }
            with contextlib.suppress(AttributeError):  # an exception class with __slots__
                error.failed_run = run.root
            with contextlib.suppress(OSError, ValueError):
                run.update_manifest(status="failed", failure=failure)
                index_run(run.root.parent, run.root)
        raise


def _remove_temporaries(run_dir: Path) -> None:
    """The temporary files of writes a killed process left (``atomic_write``'s
    ``.<name>.*.tmp``): the run's lock is held, so no write of it is under way."""
    for temporary in run_dir.rglob(".*.tmp"):
        with contextlib.suppress(OSError):
            temporary.unlink()


def _open_run(config: AuditConfig, run_key: str, resume: bool) -> tuple[RunStore, bool]:
    store_root = Path(config.output.store)
    if config.output.run_id:
        run = RunStore(store_root / config.output.run_id)
        if run.exists():
            existing = run.manifest().get("run_key")
            if existing != run_key:
                raise ConfigError(
                    f"run {run.root} exists with a different model, data or config (or was "
                    "made by an earlier bias-audit, whose run keys differ); runs are never "
                    "overwritten: choose another output.run_id"
                )
            if not resume and run.manifest().get("status") != "complete":
                raise ConfigError(f"run {run.root} is incomplete; pass --resume to continue it")
            return run, True
        return run, False
    # A complete run of this key first: one killed since (the same inputs started
    # again) must not make the finished one be computed again.
    previous = latest_run(store_root, run_key, prefer_complete=True)
    if resume and previous is not None:
        return RunStore(previous), True
    if previous is not None and RunStore(previous).manifest().get("status") != "complete":
        warnings.warn(
            f"an unfinished run of the same model, data and config is in {previous}; this "
            "starts a new one (--resume would have continued it)",
            stacklevel=3,
        )
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    name = f"{stamp}-{run_key[:8]}"
    root, count = store_root / name, 1
    while root.exists():  # the same inputs started again within the same second
        count += 1
        root = store_root / f"{name}-{count}"
    return RunStore(root), False


@dataclass
class PassWork:
    """What an engine needs to measure the rows still to do and write their chunks."""

    config: AuditConfig
    run: RunStore
    entries: Entries
    class_names: list[str]
    class_index: dict[str, int]
    preprocessor: Preprocessor
    chunk_rows: int
    positions: list[int]
    progress: bool
    done_rows: int

    def progress_bar(self):
        from tqdm.auto import tqdm

        return tqdm(
            total=self.done_rows + len(self.positions),
            initial=self.done_rows,
            unit="img",
            desc="auditing",
            disable=not self.progress,
        )

    def write_chunk(self, chunk: int, measured, skipped: dict[int, str]) -> None:
        """Records and CAMs of one whole chunk, in row order (the same for every engine)."""
        rows = _chunk_records(measured, skipped, self.entries, self.class_names, self.config)
        cam_rows = [row for batch, _ in measured for row in batch.rows]
        cams = [out["cams"] for _, out in measured]
        maps = np.concatenate(cams) if cams else np.zeros((0, 1, 1), "float16")
        self.run.write_chunk(chunk, rows, cam_rows, maps)


class ChunkWriter:
    """Writes chunks on a background thread so the step never waits for Parquet.

    At most ``pending`` chunks wait in memory (memory stays flat); the first write
    error is raised in the caller at the next ``submit`` or at ``close``. A killed run
    loses only unwritten chunks, which resume recomputes (a part file marks a chunk
    done only once it is complete).
    """

    def __init__(self, work: PassWork, pending: int = 2) -> None:
        self.work = work
        self.pending = pending
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-writer")
        self.futures: deque = deque()

    def submit(self, chunk: int, measured, skipped: dict[int, str]) -> None:
        # Collect finished writes (raising their errors) and wait while the window is full.
        while self.futures and (len(self.futures) >= self.pending or self.futures[0].done()):
            self.futures.popleft().result()
        self.futures.append(self.pool.submit(self.work.write_chunk, chunk, measured, skipped))

    def close(self) -> None:
        try:
            while self.futures:
                self.futures.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def measure_local(work: PassWork, step: AuditStep) -> float:
    """The embedded engine: decode threads feed the compiled step, a writer thread stores
    the chunks; returns compute seconds."""
    compute_seconds = 0.0
    measured, skipped = [], {}
    bar = work.progress_bar()
    writer = ChunkWriter(work)
    try:
        with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
            for batch in load_batches(
                work.entries,
                work.positions,
                class_index=work.class_index,
                preprocessor=work.preprocessor,
                regions=work.config.regions,
                batch_size=work.config.batch_size,
                pool=pool,
                chunk_rows=work.chunk_rows,
            ):
                tick = time.perf_counter()
                out = step(batch) if batch.rows else None
                compute_seconds += time.perf_counter() - tick
                if out is not None:  # the writer needs the rows and labels, not the pixels
                    measured.append((replace(batch, images=None, regions=None), out))
                skipped.update(batch.skipped)
                bar.update(len(batch.rows) + len(batch.skipped))
                if batch.chunk_end:
                    writer.submit(batch.chunk, measured, skipped)
                    measured, skipped = [], {}
    finally:
        writer.close()
        bar.close()
    return compute_seconds


def latest_baseline(config: AuditConfig, fingerprint: str, class_names: list[str]) -> Path:
    """The newest complete run in the store that audited this dataset with the same
    regions and class names: the runs a baseline comparison means something against."""
    from audit.runs.store import baseline_mismatch, latest_run, run_manifests

    store = Path(config.output.store)
    regions = [region.model_dump() for region in config.regions]
    wanted = {"fingerprint": fingerprint, "regions": regions, "class_names": class_names}
    found = latest_run(store, complete=True, **wanted)
    if found is not None:
        return found
    finished = run_manifests(store)[0].values()  # latest_run warned of unreadable ones
    differ = Counter(
        baseline_mismatch(run, **wanted) for run in finished if run.get("status") == "complete"
    )
    why = ", ".join(f"{count} in {what}" for what, count in differ.most_common())
    raise ConfigError(
        f"--baseline latest: no complete run in {store} audited this dataset "
        f"(fingerprint {fingerprint[:12]}) with the same regions "
        f"({', '.join(region['name'] for region in regions)}) and class names "
        f"({f'the complete runs there differ: {why}' if why else 'none is complete'}); "
        "name a run with --baseline RUN, or run this audit once without --baseline "
        "to make the first one"
    )


def skip_kind(reason: str) -> str:
    """A skip reason without its particulars (quoted values, paths, lists), so the run's
    counts group rows by kind of problem: "image file not found: …" once, with a
    count, not once per file. ``images.parquet`` keeps every row's full reason."""
    return re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\S*[/\\]\S*", "…", str(reason))


def _check_store_path(store: Path) -> None:
    """The run store must be (or become) a folder this user can write: a file in its
    place, or a read-only folder, is a usage error."""
    for path in (store, *store.parents):
        if path.exists():
            if not path.is_dir():
                raise ConfigError(
                    f"the run store {store} (output.store, --out) must be a folder, but "
                    f"{path} is a file; give a folder path"
                )
            if not os.access(path, os.W_OK | os.X_OK):
                raise ConfigError(
                    f"the run store {store} (output.store, --out) cannot be written: {path} "
                    "is read-only for this user; give a folder you can write to"
                )
            return


def result_columns(config: AuditConfig) -> set[str]:
    """The names of the columns the audit writes into images.parquet, for ``config``'s
    regions and target (as ``_measured_rows`` names them)."""
    other_prefix = "pred_" if config.model.target == "true" else "true_"
    names = set(RESERVED_COLUMNS) | {"cf_total", "loc_iou"}
    for region in config.regions:
        names.add(f"cf_mass_{region.name}")
        names.update(f"{metric}_{region.name}" for metric in METRICS)
        names.update(f"{other_prefix}{metric}_{region.name}" for metric in OTHER_METRICS)
    return names


def _check_slice_columns(entries: Entries, config: AuditConfig) -> None:
    """A slice column named like a result column would be overwritten by (or overwrite)
    the audit's numbers: a setup error."""
    clashes = sorted(set(entries.slice_columns) & result_columns(config))
    if clashes:
        raise ConfigError(
            f"the dataset ({entries.name}) has column(s) {', '.join(clashes)}, which are "
            "names of result columns in images.parquet; rename them (e.g. to slice_<name>)"
        )


def _region_sources(entries: Entries, face_detector: bool = False) -> dict[str, bool]:
    """Which region sources the dataset has on some row: masks, boxes, faces."""
    table = entries.table

    def filled(columns) -> bool:  # some row has all of these columns
        return all(c in table for c in columns) and table[list(columns)].notna().all(1).any()

    return {
        "mask": filled(["mask_path"]) or filled(["mask_rle"]),
        "box": filled(BOX_COLUMNS),
        "face": face_detector or filled(FACE_COLUMNS) or filled(LANDMARK_COLUMNS),
    }


def regions_for_data(config: AuditConfig, entries: Entries) -> tuple[AuditConfig, str | None]:
    """The config with default regions that follow the data, and a sentence saying
    which it chose (None when the config names its regions or the data has masks).

    Without configured regions the object is the mask; a dataset without masks but with
    boxes gets the box as its object, and one with only face boxes or landmarks the
    face as the expected region (a face-attribute model: configure the face as
    spurious for, say, an occupation model). The background is the rest either way.
    """
    if "regions" in config.model_fields_set:
        return config, None
    has = _region_sources(entries, face_detector=config.dataset.face_detector is not None)
    if has["mask"] or not (has["box"] or has["face"]):
        return config, None  # masks, or nothing: the default (and its clear error)
    source = "box" if has["box"] else "face"
    regions = (
        RegionSection(name="object" if source == "box" else "face", source=source),
        RegionSection(name="background", source="background", role="spurious"),
    )
    what = "boxes (x_min, y_min, x_max, y_max)" if source == "box" else "face boxes"
    note = (
        f"regions: the dataset has no masks, so the expected region is its {what}: "
        f"'{regions[0].name}' ({source}, expected) and 'background' (the rest, spurious)"
    )
    return config.model_copy(update={"regions": regions}), note


def _check_regions_have_data(entries: Entries, regions, face_detector: bool = False) -> None:
    """Fail fast when a region's source is absent from the whole dataset (every row
    would be skipped for it, or a spurious face region empty on every row): a setup
    error, not a bad row."""
    has = _region_sources(entries, face_detector)
    needs = {"mask": "object masks", "box": "boxes", "face": "face boxes"}
    fixes = {
        "mask": "a mask_path or mask_rle column in the manifest, a masks folder for class "
        "folders (dataset.masks, or --masks DIR with --data), COCO annotations or a tfds "
        "mask_key, or boxes (x_min, y_min, x_max, y_max columns), which the default "
        "regions then use",
        "box": "the columns x_min, y_min, x_max, y_max in the manifest",
        "face": f"the columns {', '.join(FACE_COLUMNS)} or the five landmarks "
        f"({', '.join(LANDMARK_COLUMNS[::2])} and *_y) in the manifest, or "
        "dataset.face_detector: mtcnn",
    }
    for region in regions:
        if region.source in has and not has[region.source]:
            raise ConfigError(
                f"region {region.name!r} (source: {region.source}) needs "
                f"{needs[region.source]} and the dataset ({entries.name}) has none: give "
                f"{fixes[region.source]}, or configure regions the data has "
                "(docs/config.md, regions). Without any object region an audit can give "
                "accuracy per class and slice but no map metrics, flags or interventions, "
                "so it is refused"
            )


def run_audit(
    config: AuditConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    baseline: Path | str | None = None,
    engine: str = "local",
    ray_address: str | None = None,
) -> AuditResult:
    """Audit a dataset as configured and return the stored run.

    ``resume``: return a complete run with the same model, data and config as it is
    (``reused``), or else continue the newest unfinished one, instead of starting a
    new run; with ``output.run_id``, that run is returned or continued.
    ``baseline``: a previous run folder, or ``"latest"`` (the newest complete run in the
    store of the same dataset, regions and class names); flags then compare each group with itself
    in that run instead of with the other groups.
    ``engine``: ``local`` (embedded, the default) or ``ray`` (Ray Data; same records).
    """
    started = time.perf_counter()
    if config.output.mlflow:
        from audit.runs.mlflow_log import require_mlflow

        try:
            require_mlflow()
        except ImportError as error:
            raise ConfigError(f"{error}, or turn output.mlflow off") from None
    if engine == "ray":  # before any run folder: a wrong address is a usage error
        from pipelines.ray_engine import check_ray_address

        check_ray_address(ray_address)
    _check_store_path(Path(config.output.store))
    forget_resolved_paths()
    model = load_model(config.model.path, safe_mode=config.model.safe_mode)
    cam = GradCAM.for_config(model, config)
    if config.dataset.tfds is not None:
        from audit.data.sources import read_tfds

        entries = read_tfds(config.dataset)
    else:
        entries = read_entries(config.dataset)
    if entries.table.empty:
        raise ConfigError(f"the dataset ({entries.name}) has no rows: there is nothing to audit")
    class_names = class_names_for(
        entries.table["label"],
        cam.num_classes,
        config.model.class_names or entries.class_names,
        entries.class_folders,
    )
    config, regions_note = regions_for_data(config, entries)
    _check_slice_columns(entries, config)
    _check_regions_have_data(
        entries, config.regions, face_detector=config.dataset.face_detector is not None
    )
    size = _input_size(model, config)
    channels = _input_channels(cam, config)
    model_hash = file_sha256(Path(config.model.path))
    data_hash, data_version = dataset_fingerprint(entries)
    if config.dataset.face_detector is not None:
        from audit.data.faces import with_detected_faces

        cache = Path(config.output.store) / ".cache"
        entries = with_detected_faces(entries, cache, data_version, progress=progress)
    if baseline == "latest":
        baseline = latest_baseline(config, data_hash, class_names)
    # Flags against a baseline answer another question (did a class get worse?), so a
    # run with one is never reused for a run without one, nor for another baseline.
    against = "" if baseline is None else f"baseline:{Path(baseline).resolve()}"
    # The class names too: when not configured they come from the source (its class
    # folders, an export's marker file), not from the rows the data version hashes.
    run_key = hashlib.sha256(
        f"{config.fingerprint()}{model_hash}{data_version}{class_names}{against}".encode()
    ).hexdigest()
    run, reopened = _open_run(config, run_key, resume)
    chunk_rows = config.batch_size * BATCHES_PER_CHUNK
    existing = run.manifest() if reopened else {}
    made_on = existing.get("versions", {}).get("keras_backend", "tensorflow")
    if reopened and existing.get("status") == "complete":
        if made_on != keras.backend.backend():  # the same audit, computed elsewhere
            warnings.warn(
                f"returning the finished run {run.root}, computed on Keras' {made_on!r} "
                f"backend (this process uses {keras.backend.backend()!r}); for a run of "
                "this backend, give another output.run_id and leave out --resume",
                stacklevel=2,
            )
        if config.output.mlflow:  # a run first made without MLflow logging gets logged
            from audit.runs.mlflow_log import log_run

            log_run(run.root, once=True)
        return AuditResult(run.root, run.images(), existing, reused=True)
    if reopened and made_on != keras.backend.backend():  # one run never mixes backends
        raise ConfigError(
            f"run {run.root} was started on Keras' {made_on!r} backend and this "
            f"process uses {keras.backend.backend()!r}: resume it with "
            f"KERAS_BACKEND={made_on}, or start a new run (another output.run_id)"
        )
    # Two processes writing one run would interleave their chunks: the run's lock says
    # which process computes it (and, once that process is gone, that it was cut short).
    run.root.mkdir(parents=True, exist_ok=True)
    try:
        lock = hold_run(run.root)
    except RunBusyError:
        process = existing.get("process") or {}
        holder = f" (pid {process['pid']} on {process['host']})" if process else ""
        raise ConfigError(
            f"run {run.root} is being computed by another process{holder}: wait for it to "
            "finish, or stop it and resume again"
        ) from None
    with lock, _failed_on_error(run):
        if reopened:
            # Computed by this process now; a failure's reason is history (the run's
            # status says it is running again).
            manifest = run.manifest() | {"status": "running", "process": this_process()}
            failure = manifest.pop("failure", None)
            if failure:
                warnings.warn(
                    f"continuing run {run.root}, which failed on {failure['at']}: "
                    f"{failure['error']}: {failure['message']}",
                    stacklevel=3,
                )
            run.write_manifest(manifest)
            _remove_temporaries(run.root)
        else:
            run.write_manifest(
                {
                    "run_id": run.root.name,
                    "run_key": run_key,
                    "status": "running",
                    "started": datetime.now(timezone.utc).isoformat(),
                    "process": this_process(),
                    "config": config.model_dump(mode="json"),
                    "model": {
                        "path": str(config.model.path),
                        "sha256": model_hash,
                        "layer": cam.layer_path,
                        "method": config.model.method,
                        "softmax_bypassed": cam.softmax_bypassed,
                        "multi_label": cam.multi_label,
                    },
                    "dataset": {
                        "source": entries.name,
                        # Absolute, so the dashboard and `bias-audit report` find the
                        # images from any working directory.
                        "root": str(Path(entries.root).absolute()),
                        "mask_root": str(Path(entries.mask_base).absolute()),
                        "fingerprint": data_hash,
                        "rows": len(entries.table),
                        "slice_columns": entries.slice_columns,
                    },
                    "class_names": class_names,
                    "regions": [region.model_dump() for region in config.regions],
                    # Why the regions are what they are, when they followed the data.
                    "regions_note": regions_note,
                    "input_size": list(size),
                    "chunk_rows": chunk_rows,
                    "versions": _versions(),
                }
            )
        chunk_rows = run.manifest()["chunk_rows"]
        total = len(entries.table)
        chunks = range((total + chunk_rows - 1) // chunk_rows)
        done = run.done_chunks()
        step = AuditStep(cam, config, size)
        preprocessor = Preprocessor(
            size, config.preprocess, region_size=step.metric_size, channels=channels
        )
        class_index = {name: index for index, name in enumerate(class_names)}
        todo = [
            position
            for chunk in chunks
            if chunk not in done
            for position in range(chunk * chunk_rows, min(total, (chunk + 1) * chunk_rows))
        ]
        work = PassWork(
            config=config,
            run=run,
            entries=entries,
            class_names=class_names,
            class_index=class_index,
            preprocessor=preprocessor,
            chunk_rows=chunk_rows,
            positions=todo,
            progress=progress,
            done_rows=total - len(todo),
        )
        if engine not in ("local", "ray"):
            raise ConfigError(f"unknown engine {engine!r}; use local or ray")
        # The Ray actors compile their own steps; locally the step is compiled before the loop.
        trace_seconds = None if engine == "ray" else step.warm_up() if todo else 0.0
        tick = time.perf_counter()
        if engine == "local":
            compute_seconds = measure_local(work, step)
        else:
            from pipelines.ray_engine import measure_ray

            compute_seconds = measure_ray(work, ray_address=ray_address)
        measure_seconds = time.perf_counter() - tick
        images = run.assemble()
        pass_seconds = time.perf_counter() - started
        analyse(
            run,
            config,
            model=model,
            entries=entries,
            # Without region_size: full-resolution masks.
            preprocessor=Preprocessor(size, config.preprocess, channels=channels),
            class_index=class_index,
            baseline=baseline,
        )
        reasons = Counter(
            skip_kind(reason) for reason in images.loc[images["status"] == "skipped", "skip_reason"]
        )
        manifest = run.update_manifest(
            counts={
                "rows": int(len(images)),
                "ok": int((images["status"] == "ok").sum()),
                "skipped": int((images["status"] == "skipped").sum()),
                "skip_reasons": dict(reasons.most_common()),
            },
            timings={
                # load -> explain -> measure -> store (model loading and tracing included)
                "pass_seconds": round(pass_seconds, 3),
                # the step's compile on zeros, then the measuring loop (decode -> step ->
                # store) and the step's share of it
                "trace_seconds": None if trace_seconds is None else round(trace_seconds, 3),
                "measure_seconds": round(measure_seconds, 3),
                "measured_rows": len(todo),
                "compute_seconds": round(compute_seconds, 3),
                "analysis_seconds": round(time.perf_counter() - started - pass_seconds, 3),
            },
            baseline=None if baseline is None else str(baseline),
        )
        write_reports(run.root)
        # Complete only once its reports exist: a run killed before this point is resumed,
        # never shown as finished without a report.
        manifest = run.update_manifest(
            status="complete",
            finished=datetime.now(timezone.utc).isoformat(),
            timings=manifest["timings"]
            | {"total_seconds": round(time.perf_counter() - started, 3)},
        )
        index_run(run.root.parent, run.root)
        if config.output.mlflow:
            from audit.runs.mlflow_log import log_run

            log_run(run.root)
        return AuditResult(run.root, images, manifest)
