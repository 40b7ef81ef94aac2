"""The local (embedded) audit: load -> explain -> measure -> store, streamed in chunks.

One compiled step per batch runs the forward pass, a head-only backward pass for
the configured target and for the other one (true vs predicted class), the CAMs,
their upsampling to the mask size and every region metric, all on device. Rows go
to disk chunk by chunk, so memory stays flat in dataset size and a killed run
resumes at the first missing chunk.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import keras
import pandas as pd

from audit import engines
from audit.analysis.analyse import analyse
from audit.checks import (
    check_regions_have_data,
    check_slice_columns,
    check_store_path,
    input_channels,
    input_size,
    regions_for_data,
    skip_kind,
)
from audit.config import AuditConfig, ConfigError
from audit.data.decode import forget_resolved_paths
from audit.data.manifest import (
    class_names_for,
)
from audit.data.preprocess import Preprocessor
from audit.data.sources import read_entries
from audit.engine.explain import GradCAM
from audit.engine.models import load_for_config
from audit.engines.local import PassWork
from audit.measure.step import AuditStep
from audit.report.write import write_reports
from audit.runs.history import index_run
from audit.runs.open import (
    dataset_fingerprint,
    failed_on_error,
    latest_baseline,
    library_versions,
    open_run,
    remove_temporaries,
)
from audit.runs.store import RunBusyError, file_sha256, hold_run, this_process
from audit.timing import COMPILES, counting, stage

# Rows per stored chunk, in batches: the unit of resume and of memory.
BATCHES_PER_CHUNK = 4


@dataclass(frozen=True)
class AuditResult:
    """A finished (or resumed-to-completion) run."""

    run_dir: Path
    images: pd.DataFrame
    manifest: dict
    reused: bool = False  # a complete run with the same key was returned, not recomputed


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
    engines.check(engine, ray_address)  # before any run folder: a usage error
    check_store_path(Path(config.output.store))
    forget_resolved_paths()
    with stage("setup: load model"):
        # A Keras Hub preprocessor applied: the config feeds 0..255 pixels from here on.
        model, config = load_for_config(config)
    with stage("setup: cut model"):
        cam = GradCAM.for_config(model, config)
    with stage("setup: read dataset"):
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
    check_slice_columns(entries, config)
    check_regions_have_data(
        entries, config.regions, face_detector=config.dataset.face_detector is not None
    )
    size = input_size(model, config)
    channels = input_channels(cam, config)
    with stage("setup: model hash"):
        model_hash = file_sha256(Path(config.model.path))
    with stage("setup: dataset fingerprint"):
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
    run, reopened = open_run(config, run_key, resume)
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
    with lock, failed_on_error(run):
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
            remove_temporaries(run.root)
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
                    "versions": library_versions(),
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
        # Ray's actors compile their own steps; locally the step compiles before the loop.
        compiles = engines.engine(engine).compiles_step
        with counting(COMPILES) as pass_compiles:  # (Ray's actors compile out of sight)
            with stage("pass: compile the step"):
                trace_seconds = None if compiles else step.warm_up() if todo else 0.0
            tick = time.perf_counter()
            with stage("pass: measure"):
                compute_seconds = engines.measure(engine, work, step, ray_address)
            measure_seconds = time.perf_counter() - tick
        with stage("pass: assemble images.parquet"):
            images = run.assemble()
        pass_seconds = time.perf_counter() - started
        with stage("analysis"), counting(COMPILES) as analysis_compiles:
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
                # Compiled programs traced (TensorFlow, JAX): the step once per input
                # shape; the analysis's own engine, forward passes and guided gradients.
                "compiles": {"pass": int(pass_compiles[0]), "analysis": int(analysis_compiles[0])},
            },
            baseline=None if baseline is None else str(baseline),
        )
        with stage("reports"):
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
