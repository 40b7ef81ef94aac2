"""The embedded engine: decode threads feed the compiled step, a writer thread stores
the chunks (``PassWork``: what any engine needs to measure the rows still to do).
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from audit.config import AuditConfig
from audit.data.decode import DECODE_THREADS
from audit.data.loader import load_batches
from audit.data.manifest import (
    Entries,
)
from audit.data.preprocess import Preprocessor
from audit.measure.step import AuditStep, chunk_records
from audit.runs.store import RunStore
from audit.timing import count, stage


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
        with stage("pass: chunk records"):
            rows = chunk_records(measured, skipped, self.entries, self.class_names, self.config)
        cam_rows = [row for batch, _ in measured for row in batch.rows]
        cams = [out["cams"] for _, out in measured]
        maps = np.concatenate(cams) if cams else np.zeros((0, 1, 1), "float16")
        with stage("pass: write chunk"):
            self.run.write_chunk(chunk, rows, cam_rows, maps)
        count("rows written", len(rows))


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


def measure_local(work: PassWork, step: AuditStep, address: str | None = None) -> float:
    """The embedded engine: decode threads feed the compiled step, a writer thread stores
    the chunks; returns compute seconds. (``address``: no cluster here, ignored.)"""
    compute_seconds = 0.0
    measured, skipped = [], {}
    bar = work.progress_bar()
    writer = ChunkWriter(work)
    try:
        with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
            batches = load_batches(
                work.entries,
                work.positions,
                class_index=work.class_index,
                preprocessor=work.preprocessor,
                regions=work.config.regions,
                batch_size=work.config.batch_size,
                pool=pool,
                chunk_rows=work.chunk_rows,
            )
            while True:
                with stage("pass: wait for decoded batches"):
                    batch = next(batches, None)
                if batch is None:
                    break
                tick = time.perf_counter()
                with stage("pass: step"):
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
