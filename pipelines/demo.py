"""The built-in demo: a biased digits model, trained in seconds, and its audit.

``bias-audit demo`` (or ``python -m pipelines.demo``) does, from nothing but
scikit-learn's digits:

1. builds a training set where digit 3 sits on stripes and digit 7 on a checkerboard
   95% of the time (a planted background shortcut) and an audit set with uniformly
   drawn backgrounds, written as PNGs with object masks and a manifest CSV;
2. trains a small CNN (10 epochs, 10-20 s on two CPU cores) and saves it as ``.keras``;
3. audits the model on that set (``audit.run.run_audit``: the same run as
   ``bias-audit run configs/demo.yaml``), prints per class how much of the
   Grad-CAM mass falls on the digit and on the background, and writes overlays.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.demo_data import IMAGE_SIZE, DemoSet, make_demo_set

# Keras, pandas and the audit are imported where they are used: `bias-audit demo
# --help` answers at once.

SHORTCUTS = {3: "stripes", 7: "checker"}
CLASS_NAMES = [str(digit) for digit in range(10)]


@dataclass(frozen=True)
class DemoFiles:
    """Where the demo wrote its model and audit dataset."""

    root: Path
    model: Path
    manifest: Path


def demo_model(num_classes: int = 10):
    """A small CNN whose last conv layer gives 12x12 maps on 48x48 images."""
    import keras

    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="classifier")(x)
    return keras.Model(inputs, outputs, name="demo_digits_cnn")


def train_demo_model(train: DemoSet, *, epochs: int = 10, seed: int = 0, progress: bool = False):
    """The demo's model trained on ``train``; ``progress`` prints a line per epoch."""
    import keras

    keras.utils.set_random_seed(seed)
    model = demo_model()
    model.compile(
        keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    callbacks = []
    if progress:
        callbacks.append(
            keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: print(
                    f"  epoch {epoch + 1}/{epochs}: training accuracy {logs['accuracy']:.2f}",
                    flush=True,
                )
            )
        )
    model.fit(
        train.images, train.labels, epochs=epochs, batch_size=64, verbose=0, callbacks=callbacks
    )
    return model


def write_dataset(dataset: DemoSet, root: Path) -> Path:
    """Write images and masks as PNGs and a manifest CSV (paths relative to it)."""
    import pandas as pd
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(len(dataset)):
        name = f"{index:05d}.png"
        pixels = (dataset.images[index] * 255).round().astype("uint8")
        Image.fromarray(pixels).save(root / "images" / name)
        Image.fromarray(dataset.masks[index].astype("uint8") * 255).save(root / "masks" / name)
        rows.append(
            {
                "path": f"images/{name}",
                "label": CLASS_NAMES[dataset.labels[index]],
                "mask_path": f"masks/{name}",
                "background_type": dataset.backgrounds[index],
            }
        )
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def prepare_demo(
    root: Path,
    *,
    seed: int = 0,
    train_size: int = 4000,
    audit_size: int = 1000,
    epochs: int = 10,
    progress: bool = False,
) -> DemoFiles:
    """Generate the biased training set, train and save the model (``progress``: a
    line per epoch), write the audit set."""
    root.mkdir(parents=True, exist_ok=True)
    train = make_demo_set(train_size, seed=seed, shortcut_classes=SHORTCUTS, shortcut_rate=0.95)
    model = train_demo_model(train, epochs=epochs, seed=seed, progress=progress)
    model_path = root / "demo_model.keras"
    model.save(model_path)
    audit_set = make_demo_set(audit_size, seed=seed + 1)
    manifest = write_dataset(audit_set, root / "audit_data")
    return DemoFiles(root=root, model=model_path, manifest=manifest)


def demo_config(files: DemoFiles, store: Path):
    """The audit config of the demo (the same as configs/demo.yaml)."""
    from audit.config import build_config

    return build_config(
        {
            "model": {"path": str(files.model), "class_names": CLASS_NAMES},
            "dataset": {"manifest": str(files.manifest)},
            "output": {"store": str(store)},
        }
    )


def write_overlays(run_dir: Path, out: Path, per_class: int = 3) -> int:
    """Overlays of the stored CAMs for the first images of each class (reads the store)."""
    from audit.report.overlay import stored_overlay
    from audit.runs.store import RunStore

    run = RunStore(run_dir)
    images = run.images()
    rows, cams = run.cams()
    cam_of = dict(zip(rows.tolist(), cams, strict=True))
    dataset = run.manifest()["dataset"]
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for label, group in images[images["status"] == "ok"].groupby("label"):
        for row in group.head(per_class).itertuples():
            picture = stored_overlay(dataset, row.path, row.mask_path, cam_of[row.row])
            picture.save(out / f"class_{label}_{row.row:05d}.png")
            written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bias-audit demo", description="Train a biased digits model and audit it."
    )
    parser.add_argument("--out", type=Path, default=Path("demo-runs"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the training")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    args = parser.parse_args(argv)
    from audit.cli.run import format_gate
    from audit.report.summary import format_summary
    from audit.run import run_audit

    started = time.perf_counter()
    print(f"Building the biased demo data and training a small CNN in {args.out} ...")
    files = prepare_demo(args.out, seed=args.seed, epochs=args.epochs, progress=True)
    print(f"  model: {files.model}\n  audit manifest: {files.manifest}")
    print("Auditing the model on the audit set (uniformly drawn backgrounds) ...")
    result = run_audit(demo_config(files, args.out / "runs"), progress=True)
    report = json.loads((result.run_dir / "report.json").read_text())
    print(format_summary(report, result.manifest))
    print(format_gate(report))
    overlays = args.out / "overlays"
    write_overlays(result.run_dir, overlays)
    print(
        f"\nDigits 3 and 7 were trained on a background shortcut ({SHORTCUTS}): their maps "
        "move to the background and swapping the background flips their predictions."
    )
    print(f"Run store and reports: {result.run_dir}  (open report.html)\nOverlays: {overlays}")
    print(f"Done in {time.perf_counter() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    from audit.errors import guarded

    raise SystemExit(guarded("demo", main))
