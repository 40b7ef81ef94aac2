"""The Ray Data engine's overhead on one machine: the same audit pass, local vs Ray.

    python -m benchmarks.bench_ray                 # 1024 demo images (48x48), 2 rounds
    python -m benchmarks.bench_ray --images 4096

Both engines audit the same PNG dataset with the same model and batch size; the
audit pass (load -> explain -> measure -> store) is timed from the run manifests,
Ray's own start-up separately. Prints images/s and the ratio Ray / local.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from audit.config import build_config  # noqa: E402
from audit.run import run_audit  # noqa: E402
from pipelines.demo import demo_model, write_dataset  # noqa: E402
from pipelines.demo_data import make_demo_set  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    import ray

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        manifest = write_dataset(make_demo_set(args.images, seed=0), root / "data")
        keras.utils.set_random_seed(0)
        demo_model().save(root / "model.keras")
        started = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray_start = time.perf_counter() - started

        def config(store: str, index: int):
            return build_config(
                {
                    "model": {"path": str(root / "model.keras")},
                    "dataset": {"manifest": str(manifest)},
                    "output": {"store": str(root / store), "run_id": f"r{index}"},
                    "batch_size": args.batch_size,
                    "policy": {"intervention_samples": 0},
                }
            )

        rates = {"local": [], "ray": []}
        for index in range(args.rounds + 1):  # the first round warms up
            for engine in rates:
                result = run_audit(config(engine, index), progress=False, engine=engine)
                if index:
                    seconds = result.manifest["timings"]["pass_seconds"]
                    rates[engine].append(args.images / seconds)
        ray.shutdown()
    local, distributed = (statistics.median(rates[e]) for e in ("local", "ray"))
    print(
        f"demo CNN 48x48, {args.images} PNG images, batch {args.batch_size}, median of "
        f"{args.rounds} interleaved rounds, {os.cpu_count()} CPUs, Ray {ray.__version__}"
    )
    print(f"audit pass, local engine: {local:8.1f} images/s")
    print(
        f"audit pass, Ray engine:   {distributed:8.1f} images/s  ({distributed / local:.2f}x local)"
    )
    print(f"Ray start-up (ray.init, once per process): {ray_start:.1f} s")


if __name__ == "__main__":
    main()
