"""The whole audit against the forward pass at large N, paired slice by slice.

On a small shared machine the speed drifts (by a quarter within half an hour on the
2-core machines this project is built on), so an audit timed after a forward pass
over the same N images compares two different machines. Here one ``run_audit`` over
N images is paused at a chunk boundary every ``--slice`` images:

1. the machine is let go quiet: the chunk writer's pending writes finish and the
   decode threads drain their read-ahead window (the process's CPU time stops
   rising); this wait is charged to the audit, which errs against it;
2. the plain forward pass (the same loader decoding the images, not the masks, and
   the compiled model call) runs over the very rows the audit just measured, timed
   on its own;
3. the audit resumes.

The audit's time is ``run_audit``'s wall time minus the paused forward passes: its
setup and tracing, every slice, the analysis and the reports. Every row goes through
both, once, minutes apart at most, so drift hits both sides alike:

    python -m benchmarks.bench_paired --images 10240
    python -m benchmarks.bench_paired --images 51200 --workdir /tmp/bw51k

It prints both rates, their ratio (the project's target is >= 0.9x), a 95% bootstrap
interval of the ratio over the slices (the fixed parts held as measured), the ratio
per steady slice, and the ratio to the forward pass as a job of its own (plus its
model loading and tracing, measured before the audit). Timings are printed, never
asserted.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import audit.engines.local as local_engine  # noqa: E402
import audit.run as pipeline  # noqa: E402
from audit.engine.models import load_model  # noqa: E402
from audit.timing import listen  # noqa: E402
from benchmarks.bench_audit import (  # noqa: E402
    WEIGHTS,
    Loader,
    forward_runner,
    make_config,
    save_model,
    with_run_id,
    workdir,
    write_demo_dataset,
)

QUIET_POLL = 0.02  # seconds between looks at the process's CPU time
QUIET_CPU = 0.1  # quiet: under a tenth of a core busy over one poll
QUIET_LIMIT = 5.0  # give up waiting (and say so) after this many seconds


def wait_quiet() -> tuple[float, bool]:
    """Wait until this process's threads stop using the CPU; (seconds, went quiet)."""
    start = time.perf_counter()
    while time.perf_counter() - start < QUIET_LIMIT:
        cpu, wall = time.process_time(), time.perf_counter()
        time.sleep(QUIET_POLL)
        if (time.process_time() - cpu) / (time.perf_counter() - wall) < QUIET_CPU:
            return time.perf_counter() - start, True
    return time.perf_counter() - start, False


class Pauses:
    """Patches ``local_engine.ChunkWriter`` so ``run_audit`` pauses for the forward pass every
    ``slice_rows`` rows (at a chunk boundary) and once more when its last chunk is in."""

    def __init__(self, forward: Callable[[list[int]], int], slice_rows: int) -> None:
        self.forward, self.slice_rows = forward, slice_rows
        self.pending: list[int] = []  # rows measured since the last pause
        self.slices: list[dict] = []  # per pause: rows, audit seconds, forward seconds
        self.started = self.last = 0.0
        self.excluded = 0.0  # seconds of run_audit spent in the forward passes
        self.loud = 0  # pauses where the process did not go quiet in time
        self.waited = 0.0  # seconds (charged to the audit) waiting for writes and quiet

    def pause(self, writer) -> None:
        start = time.perf_counter()
        for future in list(writer.futures):  # writes pending now finish on the audit's time
            future.result()
        _, quiet = wait_quiet()
        self.loud += not quiet
        audit_end = time.perf_counter()
        rows, self.pending = sorted(self.pending), []
        count = self.forward(rows)
        end = time.perf_counter()
        if count != len(rows):
            raise RuntimeError(f"the forward pass read {count} of {len(rows)} rows")
        self.slices.append(
            {"rows": len(rows), "audit": audit_end - self.last, "forward": end - audit_end}
        )
        self.excluded += end - audit_end
        self.waited += audit_end - start
        self.last = end

    def __enter__(self) -> Pauses:
        writer = local_engine.ChunkWriter
        self.undo = (writer.submit, writer.close)
        submit, close = self.undo
        pauses = self

        def paused_submit(writer, chunk, measured, skipped):
            submit(writer, chunk, measured, skipped)
            pauses.pending += [row for batch, _ in measured for row in batch.rows]
            pauses.pending += list(skipped)
            if len(pauses.pending) >= pauses.slice_rows:
                pauses.pause(writer)

        def paused_close(writer):
            close(writer)
            if pauses.pending:
                pauses.pause(writer)

        writer.submit, writer.close = paused_submit, paused_close
        self.started = self.last = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        local_engine.ChunkWriter.submit, local_engine.ChunkWriter.close = self.undo


class StageTimes:
    """Seconds of the analysis stages that run after the pass and the images their
    forward passes see (the interventions, the transplant test and the trust checks'
    deletion and insertion curves), as the library reports them (``audit.timing``)."""

    STAGES = {
        "interventions": ("analysis: interventions", "analysis: transplant test"),
        "trust checks": ("analysis: trust checks",),
        "guided examples": ("analysis: guided examples",),
        "strategy clusters": ("analysis: strategy clusters",),
        "probabilities": ("forward passes",),
    }

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self.forward_images = 0
        self._listening = listen(self.heard)

    def heard(self, event: str, name: str, value: float) -> None:
        if event == "count" and name == "forward images":
            self.forward_images += int(value)
        elif event == "end":
            for stage, names in self.STAGES.items():
                if name in names:
                    self.seconds[stage] += value

    def __enter__(self) -> StageTimes:
        self._listening.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._listening.__exit__(*exc)

    def line(self) -> str:
        stages = ", ".join(
            f"{stage} {seconds:.1f} s"
            for stage, seconds in self.seconds.items()
            if stage != "probabilities"
        )
        return (
            f"  analysis stages: {stages}; their forward passes saw {self.forward_images} "
            f"images in {self.seconds['probabilities']:.1f} s"
        )


def bootstrap_ratio(forward: np.ndarray, audit: np.ndarray, after: float, seed: int = 0):
    """95% percentile interval of the ratio of total seconds, forward / audit, with the
    slices after the first resampled (pairs kept together). The first slice (setup and
    tracing) and the time after the last pause (analysis, reports) stay as measured."""
    if len(forward) < 3:
        ratio = forward.sum() / (audit.sum() + after)
        return np.array([ratio, ratio])
    rng = np.random.default_rng(seed)
    picks = 1 + rng.integers(0, len(forward) - 1, size=(4000, len(forward) - 1))
    totals_forward = forward[0] + forward[picks].sum(axis=1)
    totals_audit = audit[0] + after + audit[picks].sum(axis=1)
    return np.percentile(totals_forward / totals_audit, [2.5, 97.5])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10240)
    parser.add_argument("--slice", type=int, default=2048, help="rows between pauses")
    parser.add_argument("--size", type=int, default=224, choices=(48, 224))
    parser.add_argument("--alpha", type=float, default=1.0, help="MobileNetV2 width (224)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workdir", default=None, help="keep and reuse data here (default: tmp)")
    args = parser.parse_args(argv)

    with workdir(args.workdir) as work:
        start = time.perf_counter()
        manifest = write_demo_dataset(
            work / f"data_{args.size}_{args.images}", args.images, args.size
        )
        model_path = save_model(
            work / f"model_{args.size}_{args.alpha}_probe.keras", args.size, args.alpha
        )
        print(f"data + model in {work} ({time.perf_counter() - start:.1f} s)")
        # Both sides read from the page cache: the audit, first over each slice, would
        # otherwise pay the disk reads that the forward pass after it is spared.
        for path in manifest.parent.rglob("*"):
            if path.is_file():
                path.read_bytes()
        config = make_config(model_path, manifest, work / "runs", args.batch_size)

        # The forward job's own fixed costs: load the model, trace the call (one batch).
        start = time.perf_counter()
        model = load_model(model_path)
        forward = forward_runner(model, Loader(config, model, images_only=True))
        forward(range(args.batch_size))
        job_fixed = time.perf_counter() - start

        with Pauses(forward, args.slice) as pauses, StageTimes() as stages:
            result = pipeline.run_audit(
                with_run_id(config, f"paired-{time.time_ns()}"), progress=False
            )
            total = time.perf_counter() - pauses.started
        after = time.perf_counter() - pauses.last  # analysis, reports, manifest

    rows = len(result.images)
    timings = result.manifest["timings"]
    slices = pauses.slices
    forward_seconds = np.array([s["forward"] for s in slices])
    audit_seconds = np.array([s["audit"] for s in slices])
    audited = total - pauses.excluded
    covered = sum(s["rows"] for s in slices)
    if covered != rows:
        raise SystemExit(f"the pauses covered {covered} rows of {rows}")
    forward_rate = rows / forward_seconds.sum()
    audit_rate = rows / audited
    ratio = forward_seconds.sum() / audited
    low, high = bootstrap_ratio(forward_seconds, audit_seconds, after)
    job_ratio = (forward_seconds.sum() + job_fixed) / audited
    steady = forward_seconds[1:-1] / audit_seconds[1:-1] if len(slices) > 2 else np.array([])

    model_name = "demo CNN" if args.size == 48 else f"MobileNetV2 alpha {args.alpha}"
    print(
        f"\n{model_name} {args.size}x{args.size}, {WEIGHTS[args.size == 48]}, batch "
        f"{args.batch_size}, {rows} PNG images + masks, one run_audit paused {len(slices)} times "
        f"(every {args.slice} rows) for the forward pass over the rows it had just measured; "
        f"TF {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs"
    )
    print(
        f"forward pass (decode images + compiled), summed: {forward_seconds.sum():8.1f} s "
        f"{forward_rate:6.1f} images/s"
    )
    print(
        f"whole audit (run_audit minus the pauses):       {audited:8.1f} s "
        f"{audit_rate:6.1f} images/s"
    )
    print(
        f"  of which: first slice (setup, tracing) {audit_seconds[0]:.1f} s, analysis and "
        f"reports {after:.1f} s (the run's analysis_seconds {timings['analysis_seconds']:.1f}); "
        f"waiting for its writes and for quiet before the pauses {pauses.waited:.1f} s (quiet "
        f"before {len(slices) - pauses.loud} of {len(slices)} pauses)"
    )
    print(stages.line())
    verdict = "meets" if ratio >= 0.9 else "BELOW"
    print(
        f"whole audit / forward = {ratio:.3f}x, 95% CI over slices [{low:.3f}, {high:.3f}] "
        f"({verdict} the 0.9x target)"
    )
    print(
        f"whole audit / forward job (+ load model and trace, {job_fixed:.1f} s) = {job_ratio:.3f}x"
    )
    if len(steady):
        print(
            f"per steady slice (2..{len(slices) - 1}), forward seconds / audit seconds: min "
            f"{steady.min():.3f} median {np.median(steady):.3f} max {steady.max():.3f}"
        )
        print(
            "  slices (images/s forward, audit): "
            + ", ".join(
                f"{s['rows'] / s['forward']:.0f}/{s['rows'] / s['audit']:.0f}" for s in slices
            )
        )


if __name__ == "__main__":
    main()
