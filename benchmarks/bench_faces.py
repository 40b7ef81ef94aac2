"""Face detection before a face audit: MTCNN one image per call against batched calls.

    python -m benchmarks.bench_faces                 # 32 photos of 256x256, 3 rounds

The photos are scikit-image's astronaut at half size, each shifted sideways by a few
pixels (so no two are the same). Both contenders use one loaded detector and return
the same boxes; rates are images/s of interleaved rounds, and the ratio is batched /
one at a time. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from audit.data.faces import DETECT_BATCH, _detector, detect_faces
from benchmarks.timing import interleaved_rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    from skimage import data

    photo = data.astronaut()[::2, ::2]
    photos = [np.ascontiguousarray(np.roll(photo, 3 * i, axis=1)) for i in range(args.images)]
    detector = _detector()

    def one_at_a_time() -> int:
        for image in photos:
            detect_faces([image], detector=detector)
        return len(photos)

    def batched() -> int:
        detect_faces(photos, detector=detector)
        return len(photos)

    same = [detect_faces([image], detector=detector)[0] for image in photos]
    assert same == detect_faces(photos, detector=detector), "batching changed a box"
    rates = interleaved_rates({"one at a time": one_at_a_time, "batched": batched}, args.rounds)
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(
        f"MTCNN on {args.images} photos of {photo.shape[1]}x{photo.shape[0]}, "
        f"median of {args.rounds} interleaved rounds, batches of {DETECT_BATCH}"
    )
    for name, value in median.items():
        rounds = " ".join(f"{rate:.1f}" for rate in rates[name])
        print(f"{name:<16s} {value:7.1f} images/s   rounds: {rounds}")
    print(f"batched / one at a time = {median['batched'] / median['one at a time']:.2f}x")


if __name__ == "__main__":
    main()
