"""Peak memory of the loader on very large images: ordinary images alone, then with
four 12000 x 12000 PNGs and one 8000 x 6000 JPEG among them.

    python -m benchmarks.bench_large_images                    # 224 px input, box region
    python -m benchmarks.bench_large_images --size 48 --regions none --workdir /tmp/big

It writes ``--images`` ordinary 500x375 JPEGs, one 12000 x 12000 PNG (flat colours and
shapes, a few hundred KB on disk, copied four times) and one 8000 x 6000 JPEG, and two
manifests: the ordinary images alone, and the same with the five large ones spread
among them. For each manifest a fresh process loads every row through the audit's
loader (``load_batches`` in ``DECODE_THREADS`` threads, the preprocessor at ``--size``,
a box region and the background) and reports its peak resident memory
(``ru_maxrss``). Printed: both peaks, what the large images added, and the ratio.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

LARGE_PNG_SIDE = 12000
LARGE_PNG_COPIES = 4
LARGE_JPEG_SIZE = (8000, 6000)  # width, height


def _drawing(size: tuple[int, int], seed: int) -> Image.Image:
    """Flat colour with a few rectangles and ellipses: compresses to little on disk."""
    rng = np.random.default_rng(seed)
    width, height = size
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height * 3 // 4))
        x1 = x0 + int(rng.integers(width // 20, width // 4))
        y1 = y0 + int(rng.integers(height // 20, height // 4))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return image


def write_data(folder: Path, count: int) -> None:
    """The ordinary images, the large ones and the two manifests ``ordinary.csv`` and
    ``with_large.csv`` (kept when present)."""
    small, large = folder / "ordinary.csv", folder / "with_large.csv"
    if small.exists() and large.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        name = f"ordinary_{index:04d}.jpg"
        _drawing((500, 375), index).save(folder / name, quality=90)
        rows.append({"path": name, "label": "a", "x_min": 100, "y_min": 80})
        rows[-1] |= {"x_max": 400, "y_max": 300}
    side = LARGE_PNG_SIDE
    _drawing((side, side), 10_000).save(folder / "large_0.png")
    for copy in range(1, LARGE_PNG_COPIES):
        shutil.copyfile(folder / "large_0.png", folder / f"large_{copy}.png")
    _drawing(LARGE_JPEG_SIZE, 10_001).save(folder / "large.jpg", quality=90)
    box = {"x_min": side // 4, "y_min": side // 4, "x_max": side // 2, "y_max": side // 2}
    large_rows = [{"path": f"large_{c}.png", "label": "a"} | box for c in range(LARGE_PNG_COPIES)]
    width, height = LARGE_JPEG_SIZE
    large_rows.append(
        {"path": "large.jpg", "label": "a", "x_min": width // 4, "y_min": height // 4}
        | {"x_max": width // 2, "y_max": height // 2}
    )
    mixed = list(rows)
    for position, row in enumerate(large_rows):  # spread among the ordinary rows
        mixed.insert((position + 1) * len(mixed) // (len(large_rows) + 1), row)
    pd.DataFrame(rows).to_csv(small, index=False)
    pd.DataFrame(mixed).to_csv(large, index=False)


def child(manifest: Path, size: int, regions: str, batch_size: int) -> None:
    """Load every row of ``manifest`` in this (fresh) process; print one JSON line."""
    from audit.config.sections import PreprocessSection, RegionSection
    from audit.data.decode import DECODE_THREADS
    from audit.data.loader import load_batches
    from audit.data.manifest import read_manifest
    from audit.data.preprocess import Preprocessor

    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # 144 Mpx is on purpose
    entries = read_manifest(manifest)
    chosen = []
    if regions == "box":
        chosen = [
            RegionSection(name="object", source="box"),
            RegionSection(name="background", source="background", role="spurious"),
        ]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    loaded, skipped = 0, {}
    with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
        for batch in load_batches(
            entries,
            range(len(entries.table)),
            class_index={"a": 0},
            preprocessor=Preprocessor((size, size), PreprocessSection()),
            regions=chosen,
            batch_size=batch_size,
            pool=pool,
        ):
            loaded += len(batch.rows)
            skipped |= batch.skipped
    report = {
        "rows": len(entries.table),
        "loaded": loaded,
        "skipped": {str(k): v for k, v in skipped.items()},
        "seconds": time.perf_counter() - start,
        "threads": DECODE_THREADS,
        "maxrss_before_kib": before,  # Linux reports kibibytes
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    print("BENCH_LARGE_CHILD " + json.dumps(report))


def _child(*arguments: str) -> str:
    """This script in a fresh process; its standard output."""
    command = [sys.executable, "-m", "benchmarks.bench_large_images", *arguments]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{' '.join(arguments)} failed ({done.returncode})")
    return done.stdout


def _measure(manifest: Path, args) -> dict:
    options = ["--size", str(args.size), "--regions", args.regions]
    output = _child("--child", str(manifest), *options, "--batch-size", str(args.batch_size))
    lines = [line for line in output.splitlines() if line.startswith("BENCH_LARGE_CHILD ")]
    return json.loads(lines[-1].split(" ", 1)[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="ordinary images")
    parser.add_argument("--size", type=int, default=224, help="the model's input side")
    parser.add_argument("--regions", choices=("box", "none"), default="box")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workdir", default=None, help="keep and reuse the images here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--write", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(Path(args.child), args.size, args.regions, args.batch_size)
        return
    if args.write is not None:
        write_data(Path(args.write), args.images)
        return
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(args.workdir) if args.workdir else Path(temporary)
        start = time.perf_counter()
        # In a process of its own: Linux's ru_maxrss of a child counts the RSS of the
        # parent it was forked from, and drawing a 12000 x 12000 image takes 0.5 GB.
        _child("--write", str(folder), "--images", str(args.images))
        print(f"images in {folder} ({time.perf_counter() - start:.1f} s)")
        manifests = {"ordinary": folder / "ordinary.csv", "large": folder / "with_large.csv"}
        results = {name: _measure(path, args) for name, path in manifests.items()}
    print(
        f"\nPeak RSS of the loader, {args.size}x{args.size} input, regions: {args.regions}, "
        f"{results['ordinary']['threads']} decode threads, {os.cpu_count()} CPUs, one fresh "
        "process per manifest"
    )
    for name, label in (("ordinary", f"{args.images} ordinary images"), ("large", "+ 5 large")):
        report = results[name]
        print(
            f"{label:24s} {report['loaded']:4d} loaded {len(report['skipped']):2d} skipped "
            f"{report['seconds']:6.1f} s   peak RSS {report['maxrss_kib'] / 1024:7.0f} MiB"
        )
        for row, reason in list(report["skipped"].items())[:3]:
            print(f"    skipped row {row}: {reason}")
    ordinary, large = (results[name]["maxrss_kib"] for name in ("ordinary", "large"))
    print(
        f"the large images added {(large - ordinary) / 1024:.0f} MiB; peak ratio with / without "
        f"them: {large / ordinary:.2f}x"
    )


if __name__ == "__main__":
    main()
