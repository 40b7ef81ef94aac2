"""Audit pipeline throughput against the model's plain forward pass, and its peak memory.

Throughput: a PNG dataset with object masks and a manifest is written to a temporary
folder; in one process, in interleaved rounds, it times

* the plain compiled forward pass of the same model over the same images, fed by the
  same loader (``audit.data.loader.load_batches`` with the same preprocessing, batch size and
  the audit's decode threads) reading what a forward pass reads: the images, not the
  masks; so image decoding is included on both sides,
* the whole audit, ``audit.run.run_audit``, writing a fresh run each round, and
* the same forward pass as a job of its own (load the model, compile, run), to set
  beside the audit pass, which also loads and compiles,

and prints images/s and the ratios to the forward pass (the project's target is
>= 0.9x), then (without ``--quick``) a breakdown of where one instrumented audit run
spends its time and the rates of its pieces called on their own:

    python -m benchmarks.bench_audit                       # demo CNN, 1024 images 48x48
    python -m benchmarks.bench_audit --size 224            # MobileNetV2 (alpha 0.35), 224x224
    python -m benchmarks.bench_audit --size 224 --alpha 1.0 --images 128
    python -m benchmarks.bench_audit --size 224 --alpha 1.0 --images 10240 --rounds 1 --quick

Memory: ``--memory`` audits N=1000 and N=10000 images of a 48x48 dataset, each in a
fresh child process, and prints each child's peak RSS (VmHWM) and their ratio (the
target is flat, a ratio near 1.0):

    python -m benchmarks.bench_audit --memory

Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from audit.config import AuditConfig, build_config  # noqa: E402
from audit.data.decode import DECODE_THREADS  # noqa: E402
from audit.data.loader import load_batches  # noqa: E402
from audit.data.manifest import class_names_for  # noqa: E402
from audit.data.preprocess import Preprocessor  # noqa: E402
from audit.data.sources import read_entries  # noqa: E402
from audit.engine.explain import PREDICTED, GradCAM  # noqa: E402
from audit.engine.maps import pad_batch  # noqa: E402
from audit.engine.models import load_model  # noqa: E402
from audit.measure import spec  # noqa: E402
from audit.measure.metrics import region_metrics  # noqa: E402
from audit.measure.step import AuditStep, chunk_records  # noqa: E402
from audit.run import BATCHES_PER_CHUNK, run_audit  # noqa: E402
from audit.timing import listen  # noqa: E402
from benchmarks.timing import interleaved_rates  # noqa: E402
from pipelines.demo import demo_model, write_dataset  # noqa: E402
from pipelines.demo_data import DemoSet, make_demo_set  # noqa: E402

MEMORY_COUNTS = (1000, 10000)


# ------------------------------------------------------------------ data and models


class _Resized:
    """Lazily resized view of an (N, h, w[, 3]) array: images bilinear, masks nearest."""

    def __init__(self, array: np.ndarray, size: int, mask: bool) -> None:
        self.array, self.size, self.mask = array, size, mask

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> np.ndarray:
        if self.mask:
            pixels = Image.fromarray(self.array[index].astype("uint8") * 255)
            return np.asarray(pixels.resize((self.size, self.size), Image.NEAREST)) > 127
        pixels = Image.fromarray((self.array[index] * 255).round().astype("uint8"))
        resized = pixels.resize((self.size, self.size), Image.BILINEAR)
        return np.asarray(resized).astype("float32") / 255


def write_demo_dataset(root: Path, count: int, size: int, seed: int = 1) -> Path:
    """The demo's audit set (digits on textures) as PNGs + masks + manifest, at ``size``."""
    manifest = root / "manifest.csv"
    if manifest.exists() and len(pd.read_csv(manifest)) == count:
        return manifest  # reused from an earlier run with --workdir
    demo = make_demo_set(count, seed=seed)
    if size != demo.images.shape[1]:
        demo = DemoSet(
            _Resized(demo.images, size, mask=False),
            demo.labels,
            _Resized(demo.masks, size, mask=True),
            demo.backgrounds,
        )
    return write_dataset(demo, root)


WEIGHTS = {True: "random weights", False: "random conv weights + linear-probe head"}
PROBE_IMAGES = 512  # training images for the MobileNetV2's linear-probe head


def save_model(path: Path, size: int, alpha: float) -> Path:
    """The demo CNN (48) or a MobileNetV2 (224) whose conv weights are random and whose
    classifier is a linear probe fitted on their features: its predictions are right
    as often and spread over classes as a trained model's can be, so the analysis
    (interventions sample correctly predicted images per class) costs what it would
    on a real audit, not the few rows a model with a random head gets right."""
    if path.exists():
        return path
    keras.utils.set_random_seed(0)
    if size == 48:
        model = demo_model()
    else:
        model = keras.applications.MobileNetV2(
            input_shape=(size, size, 3), alpha=alpha, weights=None, classes=10
        )
        fit_probe_head(model, path.parent / f"probe_train_{size}", size)
    model.save(path)
    return path


def fit_probe_head(model: keras.Model, root: Path, size: int) -> None:
    """Fit the classifier ("predictions") on the pooled features of a separately drawn
    demo training set (multinomial logistic regression), decoded as the audit decodes."""
    from sklearn.linear_model import LogisticRegression

    manifest = write_demo_dataset(root, PROBE_IMAGES, size, seed=2)
    config = make_config(root / "unused.keras", manifest, root / "runs", 32)
    head = model.get_layer("predictions")
    features = keras.Model(model.input, head.input)
    loader = Loader(config, model, images_only=True)
    pooled, labels = [], []
    with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
        for batch in loader.batches(pool):
            if not batch.rows:  # a chunk boundary can yield an empty batch
                continue
            pooled.append(features(batch.images, training=False).numpy())
            labels.append(batch.labels)
    pooled, labels = np.concatenate(pooled), np.concatenate(labels)
    scale = pooled.std() or 1.0
    probe = LogisticRegression(max_iter=2000).fit(pooled / scale, labels)
    kernel = np.zeros(head.kernel.shape, "float32")
    bias = np.zeros(head.bias.shape, "float32")
    kernel[:, probe.classes_] = probe.coef_.T / scale
    bias[probe.classes_] = probe.intercept_
    head.set_weights([kernel, bias])
    accuracy = probe.score(pooled / scale, labels)
    print(f"linear-probe head fitted on {len(labels)} images (training accuracy {accuracy:.0%})")


def make_config(model: Path, manifest: Path, store: Path, batch_size: int, **dataset):
    return build_config(
        {
            "model": {"path": str(model)},
            "dataset": {"manifest": str(manifest), **dataset},
            "output": {"store": str(store)},
            "batch_size": batch_size,
        }
    )


def with_run_id(config: AuditConfig, run_id: str) -> AuditConfig:
    return config.model_copy(update={"output": config.output.model_copy(update={"run_id": run_id})})


class Loader:
    """What ``run_audit`` builds to feed its step: entries, preprocessor, class index.

    ``images_only``: what a plain forward pass reads: the images, no masks or boxes.
    """

    def __init__(self, config: AuditConfig, model: keras.Model, images_only: bool = False):
        self.config = config
        self.entries = read_entries(config.dataset)
        cam = GradCAM(model, batch_size=config.batch_size)
        num_classes = cam._ensure_cut(model.input_shape[1:]).num_classes
        given = config.model.class_names or getattr(self.entries, "class_names", None)
        names = class_names_for(self.entries.table["label"], num_classes, given)
        self.class_index = {name: index for index, name in enumerate(names)}
        self.size = tuple(model.input_shape[1:3])
        self.regions = config.regions
        if images_only:
            table = self.entries.table[["path", "label"]]
            self.entries = dataclasses.replace(self.entries, table=table)
            self.regions = []
            self.preprocessor = Preprocessor(self.size, config.preprocess)
        else:  # regions on the step's measuring grid, as run_audit decodes them
            grid = AuditStep(cam, config, self.size).metric_size
            self.preprocessor = Preprocessor(self.size, config.preprocess, region_size=grid)

    def batches(self, pool, positions=None):
        if positions is None:
            positions = range(len(self.entries.table))
        return load_batches(
            self.entries,
            positions,
            class_index=self.class_index,
            preprocessor=self.preprocessor,
            regions=self.regions,
            batch_size=self.config.batch_size,
            pool=pool,
        )


# ------------------------------------------------------------------ throughput


def forward_runner(model: keras.Model, loader: Loader):
    """The plain compiled forward pass fed by ``loader``: ``run(positions=None)`` over the
    given rows (default all) returns the rows read, skipped ones included."""
    forward = tf.function(lambda x: model(x, training=False))
    size = loader.config.batch_size

    def run(positions=None) -> int:
        count = 0
        with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
            for batch in loader.batches(pool, positions):
                real = len(batch.rows)
                if real:  # a chunk boundary can yield an empty batch
                    images = batch.images if real == size else pad_batch(batch.images, size)
                    forward(tf.convert_to_tensor(images)).numpy()
                count += real + len(batch.skipped)
        return count

    return run


def forward_job_runner(model_path: Path, loader: Loader):
    """The forward pass as a job of its own: load the model, compile, decode + forward
    (what the audit pass also pays: its rate includes model loading and tracing)."""

    def run() -> int:
        return forward_runner(load_model(model_path), loader)()

    return run


LAST_RUN: list = []  # the latest timed run's result (its accuracy, intervention sample)
PASS_RATES: list[float] = []  # images/s of each timed run's audit pass (manifest timings)
LOOP_RATES: list[float] = []  # images/s of its measuring loop (decode -> step -> store)


def audit_runner(config: AuditConfig, tag: str):
    runs = iter(range(1_000_000))

    def run() -> int:
        result = run_audit(with_run_id(config, f"{tag}-{next(runs)}"), progress=False)
        timings = result.manifest["timings"]
        PASS_RATES.append(len(result.images) / timings["pass_seconds"])
        LOOP_RATES.append(timings["measured_rows"] / timings["measure_seconds"])
        LAST_RUN[:] = [result]
        return len(result.images)

    return run


class Timings:
    """Wall seconds per stage of one ``run_audit``, as the library reports them
    (``audit.timing``); with ``track_memory``, how much each stage raised the peak RSS
    (VmHWM)."""

    def __init__(self, track_memory: bool = False) -> None:
        self.track_memory = track_memory
        self.raised: dict[str, int] = defaultdict(int)  # KiB the stage raised VmHWM by
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.nested: set[str] = set()  # stages inside another timed stage
        self._peaks: dict[str, list[int]] = defaultdict(list)  # VmHWM at each open start
        self.writes: list[tuple[float, int]] = []  # (when, rows) of each chunk written
        self._listening = listen(self.heard)

    def heard(self, event: str, name: str, value: float) -> None:
        if name.startswith(NESTED_STAGES):
            self.nested.add(name)
        if event == "start":
            self._peaks[name].append(_kib("VmHWM") if self.track_memory else 0)
        elif event == "end":
            self.seconds[name] += value
            self.calls[name] += 1
            peak = self._peaks[name].pop() if self._peaks[name] else 0
            if self.track_memory:
                self.raised[name] += _kib("VmHWM") - peak
        elif event == "count" and name == "rows written":
            self.writes.append((time.perf_counter(), int(value)))

    def __enter__(self) -> Timings:
        self._listening.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._listening.__exit__(*exc)


# Stages inside another reported stage ("pass: measure", "analysis"): not added twice.
NESTED_STAGES = (
    "pass: wait for decoded batches",
    "pass: step",
    "pass: chunk records",
    "pass: write chunk",
    "analysis: ",
)


def instrumented_audit(config: AuditConfig) -> tuple[float, Timings]:
    with Timings() as timings:
        start = time.perf_counter()
        run_audit(config, progress=False)
        total = time.perf_counter() - start
    return total, timings


def piece_rates(config: AuditConfig, model: keras.Model, loader: Loader) -> list[tuple]:
    """Images/s of the audit's pieces on their own (same data, warm functions)."""
    count = len(loader.entries.table)
    size = config.batch_size
    rows: list[tuple] = []

    def timed(name, function, note=""):
        start = time.perf_counter()
        result = function()
        seconds = time.perf_counter() - start
        rows.append((name, count / seconds, seconds, note))
        return result

    with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
        batches = timed(
            "decode: load_batches (images + masks)",
            lambda: list(loader.batches(pool)),
            "one stream across chunks, as run_audit",
        )

    forward = tf.function(lambda x: model(x, training=False))

    def run_forward():
        for batch in batches:
            images = batch.images if len(batch.rows) == size else pad_batch(batch.images, size)
            forward(tf.convert_to_tensor(images)).numpy()

    run_forward()  # trace
    timed("compute: forward only (decoded)", run_forward)

    cam = GradCAM(model, config.model.layer, config.model.method, batch_size=size)
    start = time.perf_counter()
    step = AuditStep(cam, config, loader.size)
    step(batches[0])
    trace = time.perf_counter() - start
    outs = timed("compute: AuditStep only (decoded)", lambda: [step(b) for b in batches])
    rows[-1] = (*rows[-1][:3], f"first call (trace) {trace:.2f} s, paid once per run_audit")
    rows.extend(step_parts(config, cam, step, batches))

    entries = loader.entries
    names = list(loader.class_index)
    pairs = list(zip(batches, outs, strict=True))
    tables = timed(
        "chunk_records only",
        lambda: [chunk_records([pair], {}, entries, names, config) for pair in pairs],
    )

    per_chunk = BATCHES_PER_CHUNK
    groups = [
        (tables[i : i + per_chunk], outs[i : i + per_chunk])
        for i in range(0, len(tables), per_chunk)
    ]

    def concat_sort():
        return [
            pd.concat(t, ignore_index=True).sort_values("row", kind="stable") for t, _ in groups
        ]

    frames = timed("chunk concat + sort (pandas)", concat_sort)

    def parquet():
        for frame in frames:
            frame.to_parquet(io.BytesIO(), index=False)

    def npz():
        for _, out in groups:
            maps = np.concatenate([o["cams"] for o in out])
            np.savez(io.BytesIO(), rows=np.arange(len(maps)), maps=maps)

    timed("rows -> parquet (in memory)", parquet, f"{len(frames)} chunk files")
    timed("cams -> npz (in memory)", npz)
    return rows


@contextmanager
def workdir(path: str | None):
    """``--workdir`` (kept, data reused), or a temporary folder removed at the end."""
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_audit_") as temporary:
            yield Path(temporary)


def step_parts(config: AuditConfig, cam: GradCAM, step, batches) -> list[tuple]:
    """The compiled step taken apart: CAMs, region metrics, and rank_acc's sort."""
    size = step.metric_size
    count = sum(len(batch.rows) for batch in batches)
    batch_size = config.batch_size
    inputs = [
        tuple(
            tf.convert_to_tensor(pad_batch(array, batch_size))
            for array in (batch.images, batch.labels, batch.regions.astype("float32"))
        )
        for batch in batches
    ]

    def upsampled_cams(images, labels):
        targets = [labels, tf.fill(tf.shape(labels), PREDICTED)]
        maps = cam.cam_batch_many(images, targets)["maps"]
        return [tf.image.resize(m[..., None], size, method="bilinear")[..., 0] for m in maps]

    cells = step.pointing_cells

    def metrics(main, other, regions):  # as the step: rank_acc for the main map only
        settings = config.metrics
        return [
            region_metrics(
                maps,
                regions,
                iou_threshold=settings.iou_threshold,
                pointing_tolerance=cells,
                names=None if maps is main else spec.names(other_map=True),
            )
            for maps in (main, other)
        ]

    def rank_sorts(main, other):  # rank_acc's one sort of each main map
        return tf.sort(tf.reshape(main, (tf.shape(main)[0], -1)), axis=1)

    functions = [tf.function(f) for f in (upsampled_cams, metrics, rank_sorts)]
    cams_function, metrics_function, sorts_function = functions
    maps = [cams_function(images, labels) for images, labels, _ in inputs]  # trace + data
    metrics_function(*maps[0], inputs[0][2])
    sorts_function(*maps[0])
    parts = {
        "  step: forward + 2 backward + CAMs + resize": lambda: [
            cams_function(images, labels) for images, labels, _ in inputs
        ],
        "  step: region_metrics, both maps": lambda: [
            metrics_function(*pair, regions)
            for pair, (_, _, regions) in zip(maps, inputs, strict=True)
        ],
        "  step: (in it) rank_acc's sort": lambda: [sorts_function(*pair) for pair in maps],
    }
    rows = []
    for name, function in parts.items():
        start = time.perf_counter()
        tf.nest.map_structure(lambda tensor: tensor.numpy(), function())
        seconds = time.perf_counter() - start
        rows.append((name, count / seconds, seconds, ""))
    return rows


def _print_workload(result) -> None:
    """What the analysis had to do in the timed runs: it depends on how many images
    the model gets right (the interventions probe correctly predicted ones)."""
    images = result.images
    ok = images[images["status"] == "ok"]
    probes = result.run_dir / "interventions.parquet"
    table = pd.read_parquet(probes) if probes.exists() else pd.DataFrame()
    probed = int(table["n_probe"].sum()) if len(table) else 0
    # One forward per probed image, two more per image of the diagnostics.
    forwards = probed + 2 * int(table["n_details"].sum()) if len(table) else 0
    timings = result.manifest["timings"]
    print(
        f"audited model: accuracy {ok['correct'].mean():.0%} on {len(ok)} images, "
        f"{ok['pred'].nunique()} classes predicted; interventions probed {probed} images "
        f"({forwards} forward passes); analysis {timings['analysis_seconds']:.1f} s of "
        f"{timings['total_seconds']:.1f} s"
    )


def throughput(args, work: Path) -> None:
    size = args.size
    count = args.images or (1024 if size == 48 else 256)
    data_root = work / f"data_{size}_{count}"
    start = time.perf_counter()
    manifest = write_demo_dataset(data_root, count, size)
    alpha = args.alpha
    model_name = "demo CNN" if size == 48 else f"MobileNetV2 alpha {alpha}"
    model_path = save_model(work / f"model_{size}_{alpha}_probe.keras", size, alpha)
    print(f"data + model in {work} ({time.perf_counter() - start:.1f} s)")

    config = make_config(model_path, manifest, work / "runs", args.batch_size)
    model = load_model(model_path)
    loader = Loader(config, model)
    images_only = Loader(config, model, True)
    runners = {
        "forward (decode images + compiled)": forward_runner(model, images_only),
        "run_audit (whole audit)": audit_runner(config, f"r{os.getpid()}-{time.time_ns()}"),
        "forward job (+ load model, compile)": forward_job_runner(model_path, images_only),
    }
    load_before = _load_now()
    rates = interleaved_rates(runners, args.rounds)

    print(
        f"\n{model_name} {size}x{size}, {WEIGHTS[size == 48]}, batch {args.batch_size}, "
        f"{count} PNG images + masks, median of {args.rounds} interleaved rounds, "
        f"TF {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs, "
        f"load average {load_before} (before) {_load_now()} (after)"
    )
    names = list(runners)
    base = statistics.median(rates[names[0]])
    print(f"{'':36s} {'images/s':>9s} {'x forward':>10s}   rounds (images/s)")
    for name, values in rates.items():
        rate = statistics.median(values)
        spread = " ".join(f"{v:.0f}" for v in values)
        print(f"{name:36s} {rate:9.1f} {rate / base:9.2f}x   {spread}")
    ratio = statistics.median(rates[names[1]]) / base
    job = statistics.median(rates[names[2]])
    # The timed rounds' own audit passes (load -> explain -> measure -> store, with model
    # loading and tracing), without the analysis and reports that follow them.
    pass_rate = statistics.median(PASS_RATES[-args.rounds :])
    print(f"{'  of which the audit pass':36s} {pass_rate:9.1f} {pass_rate / base:9.2f}x")
    loop_rate = statistics.median(LOOP_RATES[-args.rounds :])
    print(f"{'    its measuring loop (traced)':36s} {loop_rate:9.1f} {loop_rate / base:9.2f}x")
    for label, value in (
        ("whole run / forward", ratio),
        ("audit pass / forward", pass_rate / base),
        ("audit pass / forward job (both load and compile)", pass_rate / job),
        ("measuring loop / forward", loop_rate / base),
    ):
        verdict = "meets" if value >= 0.9 else "BELOW"
        print(f"{label} = {value:.2f}x ({verdict} the 0.9x target)")
    _print_workload(LAST_RUN[0])
    if args.quick:
        return

    total, timings = instrumented_audit(with_run_id(config, f"profile-{time.time_ns()}"))
    rate = count / total
    print(f"\nWhere one instrumented run_audit spends its {total:.2f} s ({rate:.0f} img/s):")
    print(f"{'phase':42s} {'seconds':>8s} {'share':>6s} {'calls':>6s}")
    accounted = 0.0
    for key, seconds in sorted(timings.seconds.items(), key=lambda kv: -kv[1]):
        accounted += 0.0 if key in timings.nested else seconds
        calls = timings.calls[key]
        print(f"{key:42s} {seconds:8.3f} {seconds / total:6.1%} {calls:6d}")
    other = total - accounted
    label = "other (concat/sort per chunk, config, ...)"
    print(f"{label:42s} {other:8.3f} {other / total:6.1%}")
    fixed = sum(
        seconds
        for key, seconds in timings.seconds.items()
        if key.startswith("setup:") or key == "pass: compile the step"
    )
    print(f"per-run fixed costs (setup + tracing the step): {fixed:.2f} s")
    if len(timings.writes) > 1:  # chunks 2..n: no tracing, no setup
        (first, _), (last, _) = timings.writes[0], timings.writes[-1]
        steady = sum(rows for _, rows in timings.writes[1:]) / (last - first)
        print(
            f"chunks 2..{len(timings.writes)} alone (steady state, load + step + records "
            f"+ writes): {steady:.0f} img/s = {steady / base:.2f}x forward"
        )

    print("\nThe pieces on their own (same images; rates are images/s of that piece alone):")
    print(f"{'piece':44s} {'images/s':>9s} {'seconds':>8s}   note")
    for name, rate, seconds, note in piece_rates(config, model, loader):
        print(f"{name:44s} {rate:9.0f} {seconds:8.3f}   {note}")


# ------------------------------------------------------------------ memory


def _load_now() -> str:
    """The 1-minute load average: other work on these few cores skews every number."""
    return f"{os.getloadavg()[0]:.1f}"


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def memory_child(args) -> None:
    """One audit in this (fresh) process; prints its peak RSS as one JSON line."""
    config = make_config(
        Path(args.model), Path(args.manifest), Path(args.store), args.batch_size, limit=args.limit
    )
    before = _kib("VmRSS")
    start = time.perf_counter()
    with Timings(track_memory=True) as timings:
        result = run_audit(config, progress=False)
    seconds = time.perf_counter() - start
    report = {
        "rows": len(result.images),
        "seconds": seconds,
        "rss_before_kib": before,
        "vmhwm_kib": _kib("VmHWM"),
        "rss_after_kib": _kib("VmRSS"),
        "raised_kib": dict(timings.raised),
        "nested": sorted(timings.nested),
    }
    print("BENCH_AUDIT_CHILD " + json.dumps(report))


def memory(args, work: Path) -> None:
    largest = max(MEMORY_COUNTS)
    start = time.perf_counter()
    manifest = write_demo_dataset(work / f"data_48_{largest}", largest, 48)
    model_path = save_model(work / "model_48_demo.keras", 48, args.alpha)
    print(f"data + model in {work} ({time.perf_counter() - start:.1f} s)")
    results = {}
    for count in MEMORY_COUNTS:
        command = [
            sys.executable,
            "-m",
            "benchmarks.bench_audit",
            "--child",
            "--model",
            str(model_path),
            "--manifest",
            str(manifest),
            "--store",
            str(work / f"runs-memory-{time.time_ns()}"),
            "--limit",
            str(count),
            "--batch-size",
            str(args.batch_size),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        line = [r for r in done.stdout.splitlines() if r.startswith("BENCH_AUDIT_CHILD ")]
        if done.returncode != 0 or not line:
            sys.stderr.write(done.stdout + done.stderr)
            raise SystemExit(f"the child audit of {count} images failed ({done.returncode})")
        results[count] = json.loads(line[-1].split(" ", 1)[1])

    print(
        f"\nPeak RSS of run_audit, demo CNN 48x48, batch {args.batch_size}, one fresh process "
        f"per N, TF {tf.__version__}, {os.cpu_count()} CPUs, load average {_load_now()}"
    )
    header = f"{'images':>7s} {'seconds':>8s} {'RSS before':>11s} {'peak (VmHWM)':>13s}"
    print(f"{header} {'peak - before':>14s}")
    for count, report in results.items():
        before, peak = report["rss_before_kib"] / 1024, report["vmhwm_kib"] / 1024
        print(
            f"{count:7d} {report['seconds']:8.1f} {before:8.0f} MiB {peak:10.0f} MiB "
            f"{peak - before:10.0f} MiB"
        )
    small, large = (results[c] for c in MEMORY_COUNTS)
    growth_small = small["vmhwm_kib"] - small["rss_before_kib"]
    growth_large = large["vmhwm_kib"] - large["rss_before_kib"]
    print(
        f"peak ratio N={MEMORY_COUNTS[1]} / N={MEMORY_COUNTS[0]}: "
        f"{large['vmhwm_kib'] / small['vmhwm_kib']:.2f}x (target: flat, ~1.0); growth during "
        f"the audit: {growth_large / max(growth_small, 1):.2f}x"
    )
    print("\nWhich phase raised the peak (MiB added to VmHWM while it ran; nested ones indented):")
    columns = "".join(f" {f'N={count}':>9s}" for count in MEMORY_COUNTS)
    print(f"{'phase':42s}{columns}")
    keys = sorted(
        {key for report in results.values() for key in report["raised_kib"]},
        key=lambda key: -large["raised_kib"].get(key, 0),
    )
    for key in keys:
        values = [results[count]["raised_kib"].get(key, 0) / 1024 for count in MEMORY_COUNTS]
        if any(value >= 0.5 for value in values):
            print(f"{key:42s}" + "".join(f" {value:9.1f}" for value in values))
    for count, report in results.items():
        counted = sum(v for k, v in report["raised_kib"].items() if k not in report["nested"])
        rest = (report["vmhwm_kib"] - report["rss_before_kib"] - counted) / 1024
        print(f"N={count}: not inside a timed phase (config, setup glue, ...): {rest:.1f} MiB")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=48, choices=(48, 224))
    parser.add_argument("--images", type=int, default=None, help="default 1024 (48), 256 (224)")
    parser.add_argument("--alpha", type=float, default=0.35, help="MobileNetV2 width (--size 224)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory", action="store_true", help="peak RSS for 1k vs 10k images")
    parser.add_argument("--workdir", default=None, help="keep and reuse data here (default: tmp)")
    parser.add_argument(
        "--quick", action="store_true", help="only the rates: no per-phase breakdown or pieces"
    )
    child = parser.add_argument_group("internal (the --memory child)")
    child.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    child.add_argument("--model", help=argparse.SUPPRESS)
    child.add_argument("--manifest", help=argparse.SUPPRESS)
    child.add_argument("--store", help=argparse.SUPPRESS)
    child.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        memory_child(args)
    else:
        with workdir(args.workdir) as work:
            (memory if args.memory else throughput)(args, work)


if __name__ == "__main__":
    main()
