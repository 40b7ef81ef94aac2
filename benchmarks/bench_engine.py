"""Grad-CAM engine throughput against the model's plain compiled forward pass.

Everything runs in one process, on the same model, images and batch size, in
interleaved rounds (the machines are noisy), and prints images/s and the ratio to
the forward pass:

    python -m benchmarks.bench_engine                    # MobileNetV2 224x224, batch 32
    python -m benchmarks.bench_engine --images 128 --rounds 2
    python -m benchmarks.bench_engine --xla --images 128 --rounds 2

Rows: the compiled forward pass; ``GradCAM.explain`` at the layer's resolution and
upsampled to the input size; tf-keras-vis' batched ``Gradcam`` (if installed); and
the Keras example's per-image loop, run on fewer images because it is slow. With
``--xla`` the forward pass and ``GradCAM.explain`` also run compiled with XLA
(``jit_compile=True``), to see whether XLA pays on this machine.
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from audit import GradCAM  # noqa: E402
from benchmarks.references import keras_example_heatmap, logit_clone  # noqa: E402
from benchmarks.timing import interleaved_rates  # noqa: E402


def batches(images: np.ndarray, size: int):
    for start in range(0, len(images), size):
        yield images[start : start + size]


def make_runners(model, images, batch_size, layer, example_images, xla: bool = False):
    forward = tf.function(lambda x: model(x, training=False))

    def forward_runner(function):
        def run():
            for batch in batches(images, batch_size):
                function(tf.convert_to_tensor(batch)).numpy()
            return len(images)

        return run

    cam = GradCAM(model, batch_size=batch_size)
    size = images.shape[1:3]

    runners = {
        "forward (compiled)": forward_runner(forward),
        "GradCAM.explain": lambda: len(cam.explain(images)),
        "GradCAM.explain upsampled": lambda: len(cam.explain(images, size=size)),
    }
    if xla:
        xla_forward = tf.function(lambda x: model(x, training=False), jit_compile=True)
        xla_cam = GradCAM(model, batch_size=batch_size, jit_compile=True)
        runners["forward (XLA)"] = forward_runner(xla_forward)
        runners["GradCAM.explain (XLA)"] = lambda: len(xla_cam.explain(images))
    try:
        from tf_keras_vis.gradcam import Gradcam
        from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
        from tf_keras_vis.utils.scores import CategoricalScore

        vis = Gradcam(model, model_modifier=ReplaceToLinear(), clone=True)
        predictions = np.concatenate(
            [forward(tf.convert_to_tensor(b)).numpy().argmax(-1) for b in batches(images, 32)]
        )

        def run_tf_keras_vis():
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size]
                score = CategoricalScore(list(predictions[start : start + batch_size]))
                np.asarray(vis(score, batch, penultimate_layer=layer))
            return len(images)

        runners["tf-keras-vis Gradcam (batched)"] = run_tf_keras_vis
    except ImportError:
        print("tf-keras-vis is not installed; skipping it (pip install tf-keras-vis)")

    reference_model = logit_clone(model)

    def run_keras_example():
        for image in example_images:
            keras_example_heatmap(image[None], reference_model, layer)
        return len(example_images)

    runners["Keras example (per-image loop)"] = run_keras_example
    return runners


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--example-images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--xla", action="store_true", help="also time the forward pass and GradCAM with XLA"
    )
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    shape = (args.image_size, args.image_size, 3)
    model = keras.applications.MobileNetV2(input_shape=shape, weights=None)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(args.images, *shape)).astype("float32")
    runners = make_runners(
        model, images, args.batch_size, "out_relu", images[: args.example_images], xla=args.xla
    )

    rates = interleaved_rates(runners, args.rounds)

    print(
        f"\nMobileNetV2 {args.image_size}x{args.image_size}, random weights, batch "
        f"{args.batch_size}, {args.images} images, median of {args.rounds} interleaved "
        f"rounds, TF {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs"
    )
    base = statistics.median(rates["forward (compiled)"])
    print(f"{'':34s} {'images/s':>9s} {'x forward':>10s}")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"{name:34s} {rate:9.1f} {rate / base:9.2f}x")


if __name__ == "__main__":
    main()
