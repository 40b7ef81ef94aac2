"""The audit pass on Ray Data: the same stages and records as the local engine, at scale.

``bias-audit run ... --engine ray [--ray-address ADDR]`` (or ``run_audit(config,
engine="ray")``):

1. a CPU stage decodes and preprocesses the rows (``map_batches`` on a pool of
   decoder actors), carrying skipped rows along with their reason;
2. an actor class holds the model and the compiled step (``map_batches`` with the
   config's batch size, ``concurrency`` actors, ``num_gpus`` when the cluster has
   GPUs) and returns every row's outputs;
3. the driver writes the run store chunk by chunk as each chunk's rows arrive, with
   the very code the local engine uses, so ``images.parquet`` and the flags match.

The analysis that follows reads the stored rows; its accumulators merge exactly, so
per-shard partial aggregates would combine to the same numbers.
"""

from __future__ import annotations

import socket
import time
from collections import defaultdict

import keras
import numpy as np

from audit.config import AuditConfig, ConfigError
from audit.data.decode import forget_resolved_paths
from audit.data.loader import Batch, load_entry
from audit.engine.explain import GradCAM
from audit.engines.local import PassWork
from audit.measure.localisation import localisation_iou
from audit.measure.step import AuditStep


class _Decode:
    """Ray CPU stage: manifest rows -> preprocessed images and regions, or skips."""

    def __init__(self, work: PassWork) -> None:
        forget_resolved_paths()  # a worker process may outlive a run: resolve afresh
        self.entries = work.entries
        self.preprocessor = work.preprocessor
        self.regions = work.config.regions
        self.class_index = work.class_index
        height, width = self.preprocessor.size
        region_height, region_width = self.preprocessor.region_size or self.preprocessor.size
        self.blank_image = np.zeros((height, width, self.preprocessor.channels), "float32")
        self.blank_regions = np.zeros((len(self.regions), region_height, region_width), "float32")

    def __call__(self, batch: dict) -> dict:
        positions = [int(position) for position in batch["position"]]
        records = self.entries.records(positions)
        rows = [self._one(p, record) for p, record in zip(positions, records, strict=True)]
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

    def _one(self, position: int, record: dict) -> dict:
        reason, loaded = load_entry(
            self.entries, position, self.class_index, self.preprocessor, self.regions, record
        )
        if loaded is None:
            blank = {"label": -1, "image": self.blank_image, "regions": self.blank_regions}
            return {"position": position, "reason": reason, **blank}
        label, row = loaded
        return {
            "position": position,
            "reason": "",
            "label": label,
            "image": row.image,
            "regions": row.regions.astype("float32"),
        }


class _Measure:
    """Ray actor: holds the model and the compiled audit step."""

    def __init__(self, config_json: str, size: tuple[int, int], backend: str) -> None:
        import keras

        from audit.engine.models import load_for_config

        if keras.backend.backend() != backend:  # runtime_env below sets it; say if not
            raise RuntimeError(
                f"this Ray worker runs Keras on {keras.backend.backend()!r}, the driver on "
                f"{backend!r}: set KERAS_BACKEND={backend} on the cluster's workers"
            )

        config = AuditConfig.model_validate_json(config_json)
        model, config = load_for_config(config)  # as the driver loads it
        cam = GradCAM.for_config(model, config)
        self.step = AuditStep(cam, config, tuple(size))

    def __call__(self, batch: dict) -> dict:
        ok = batch["reason"] == ""
        result = {"position": batch["position"], "reason": batch["reason"]}
        if not ok.any():
            return result | {"measured": ok}
        inputs = Batch(
            rows=batch["position"][ok].tolist(),
            images=batch["image"][ok],
            regions=batch["regions"][ok],
            labels=batch["label"][ok].astype("int32"),
        )
        out = self.step(inputs)
        # Weak localisation here, in parallel actors: its two masks per row stay here.
        out["loc_iou"] = localisation_iou(out.pop("loc_hot"), out.pop("loc_truth", None))
        for key, values in out.items():  # one row per input row; skipped rows hold zeros
            full = np.zeros((len(ok), *values.shape[1:]), dtype=values.dtype)
            full[ok] = values
            result[f"out_{key}"] = full
        return result | {"measured": ok}


def check_ray_address(address: str | None, timeout: float = 5.0) -> None:
    """Fail fast (``ConfigError``) when a given cluster address does not answer: Ray
    itself retries a wrong address for minutes before it gives up."""
    if address in (None, "", "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        host = host.strip("[]") or "127.0.0.1"  # [::1]:6379, an IPv6 address
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"--ray-address {address}: no Ray cluster answers there ({error}); start one "
            "with `ray start --head` and give the address it prints (host:port), or leave "
            "--ray-address out to start a local Ray"
        ) from None


def measure_ray(work: PassWork, step=None, ray_address: str | None = None) -> float:
    """Run the audit pass on Ray Data and write the run's chunks; returns wall seconds.
    (``step``: the actors compile their own.)"""
    try:
        import ray
    except ImportError:
        raise ImportError("the Ray engine needs Ray Data: pip install 'bias-audit[ray]'") from None
    started = time.perf_counter()
    if not ray.is_initialized():
        ray.init(
            address=ray_address,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows come back in manifest order
    context.enable_progress_bars = work.progress
    gpus = int(ray.cluster_resources().get("GPU", 0))
    # The workers run the driver's Keras backend (TensorFlow, JAX or PyTorch).
    backend = keras.backend.backend()
    runtime_env = {"env_vars": {"KERAS_BACKEND": backend}}
    dataset = ray.data.from_items([{"position": p} for p in work.positions])
    decoded = dataset.map_batches(
        _Decode,
        fn_constructor_args=(work,),
        batch_size=work.config.batch_size,
        concurrency=2,
        batch_format="numpy",
        runtime_env=runtime_env,
    )
    measured = decoded.map_batches(
        _Measure,
        fn_constructor_args=(work.config.model_dump_json(), work.preprocessor.size, backend),
        batch_size=work.config.batch_size,
        concurrency=max(1, gpus),
        num_gpus=1 if gpus else 0,
        batch_format="numpy",
        runtime_env=runtime_env,
    )
    expected = defaultdict(int)
    for position in work.positions:
        expected[position // work.chunk_rows] += 1
    pending = defaultdict(lambda: {"measured": [], "skipped": {}, "seen": 0})
    bar = work.progress_bar()
    for block in measured.iter_batches(batch_size=None, batch_format="numpy"):
        _collect(block, work, pending)
        bar.update(len(block["position"]))
        for chunk in [c for c, state in pending.items() if state["seen"] == expected[c]]:
            state = pending.pop(chunk)
            work.write_chunk(chunk, state["measured"], state["skipped"])
    bar.close()
    return time.perf_counter() - started


def _collect(block: dict, work: PassWork, pending: dict) -> None:
    """Sort one output block's rows into their chunks as (Batch, outputs) and skips."""
    positions = block["position"].astype("int64")
    chunks = positions // work.chunk_rows
    for chunk in np.unique(chunks):
        mine = chunks == chunk
        state = pending[int(chunk)]
        state["seen"] += int(mine.sum())
        for position, reason in zip(positions[mine], block["reason"][mine], strict=True):
            if reason:
                state["skipped"][int(position)] = str(reason)
        ok = mine & block["measured"]
        if ok.any():
            outputs = {
                key[len("out_") :]: values[ok]
                for key, values in block.items()
                if key.startswith("out_")
            }
            batch = Batch(
                rows=positions[ok].tolist(),
                images=np.zeros((0,)),
                regions=np.zeros((0,)),
                labels=np.asarray(
                    [
                        work.class_index[label]
                        for label in work.entries.table["label"].iloc[positions[ok]]
                    ],
                    dtype="int32",
                ),
            )
            state["measured"].append((batch, outputs))
