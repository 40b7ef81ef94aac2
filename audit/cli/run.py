"""``bias-audit run``: a config file, command-line flags, or both (flags win)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from audit.config import AuditConfig, ConfigError, build_config, load_config

# 0: the outcome is below --fail-on (or no --fail-on); 1 (policy): it reaches it;
# 2 (usage): a config or data error, or no image could be audited (no verdict); 3: the
# run stopped on an error (`bias-audit` catches it: audit.errors.guarded).
from audit.engine.registry import method_names
from audit.errors import EXIT_OK, EXIT_POLICY, EXIT_USAGE
from audit.report.outcome import FAIL_ON_LEVELS

# Config keys the flags set, so that an error about one names its flag too.
FLAG_KEYS = (
    ("model.path", "--model"),
    ("model.class_names", "--class-names"),
    ("model.layer", "--layer"),
    ("model.method", "--method"),
    ("model.target", "--target"),
    ("model.output", "--output"),
    ("dataset", "--data"),
    ("dataset", "--masks"),
    ("dataset.manifest", "--data"),
    ("dataset.folders", "--data"),
    ("dataset.masks", "--masks"),
    ("dataset.root", "--root"),
    ("dataset.limit", "--limit"),
    ("preprocess.size", "--size"),
    ("batch_size", "--batch-size"),
    ("output.store", "--out"),
    ("output.run_id", "--run-id"),
)


def _data_section(path: Path) -> dict:
    if path.is_dir():
        return {"folders": str(path)}
    if path.suffix == ".json":
        raise ConfigError(
            f"{path}: for a COCO file use a config with dataset.coco and dataset.coco_images"
        )
    return {"manifest": str(path)}


def _absolute(path: str) -> str:
    """A path flag made absolute against the working folder (``~`` expanded)."""
    return str(Path(path).expanduser().resolve())


def check_inputs_exist(config: AuditConfig) -> None:
    """The model file and the dataset's files exist, or a ``ConfigError`` naming the key
    and the flag."""
    wanted = [("model.path (--model)", config.model.path, "model file")]
    dataset = config.dataset
    for key, kind in (
        ("manifest", "manifest"),
        ("folders", "class-folder root"),
        ("masks", "masks folder"),
        ("root", "dataset root folder"),
        ("coco", "COCO file"),
        ("coco_images", "COCO image folder"),
    ):
        flag = {
            "manifest": " (--data)",
            "folders": " (--data)",
            "masks": " (--masks)",
            "root": " (--root)",
        }
        wanted.append((f"dataset.{key}{flag.get(key, '')}", getattr(dataset, key), kind))
    for key, path, kind in wanted:
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{key}: {kind} not found: {path}")


def _class_names(value: str) -> list[str]:
    """``--class-names``: a file with one name a line (blank lines left out), else a
    comma list."""
    path = Path(value).expanduser()
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"--class-names {value}: cannot read the file: {error}") from None
        names = [line.strip() for line in lines if line.strip()]
    else:
        names = [name.strip() for name in value.split(",")]
    if not names or not all(names):
        raise ConfigError(
            f"--class-names {value!r}: give the names in output order as a comma list "
            "without empty names (cat,dog) or a file with one name a line"
        )
    return names


def overrides_from(args: argparse.Namespace) -> dict:
    """Flags as a nested config dict; paths made absolute (they are relative to the cwd)."""
    overrides: dict = {}

    def put(section: str, key: str, value) -> None:
        if value is not None:
            overrides.setdefault(section, {})[key] = value

    put("model", "path", args.model and _absolute(args.model))
    put("model", "class_names", args.class_names and _class_names(args.class_names))
    put("model", "layer", args.layer)
    put("model", "method", args.method)
    put("model", "target", args.target)
    put("model", "output", args.output)
    if args.unsafe_model:
        put("model", "safe_mode", False)
    if args.data is not None:
        # --data replaces the config's source, whatever its kind, and its source-specific
        # keys; a masks tree stays with a new class-folder root (docs/config.md).
        source = _data_section(Path(_absolute(args.data)))
        cleared = dict.fromkeys(("manifest", "folders", "coco", "coco_images", "tfds"))
        if "folders" not in source:
            cleared["masks"] = None
        overrides["dataset"] = cleared | source
    put("dataset", "masks", args.masks and _absolute(args.masks))
    put("dataset", "root", args.root and _absolute(args.root))
    put("dataset", "limit", args.limit)
    put("output", "store", args.out and _absolute(args.out))
    put("output", "run_id", args.run_id)
    if args.mlflow:
        put("output", "mlflow", True)
    if args.size is not None:
        put("preprocess", "size", list(args.size))
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    return overrides


# Where the data's files are and what its labels mean (quick form).
DATA_OPTIONS = (
    ("--masks", "DIR", "with a class-folder root: the masks tree MASKS/<class>/<stem>.png"),
    (
        "--root",
        "DIR",
        "with a manifest: where its relative paths start (default: the manifest's folder); "
        "absolute paths are used as they are",
    ),
    (
        "--class-names",
        "NAMES",
        "the model's class names in output order: a comma list (cat,dog) or a file with one "
        "name a line; the manifest's labels are these names (text labels)",
    ),
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bias-audit run",
        description="Run Grad-CAM over a labeled dataset and store per-image metrics.",
    )
    p.add_argument("config", nargs="?", help="YAML audit config (docs/config.md)")
    p.add_argument("--model", help="model file (.keras/.h5)")
    p.add_argument("--data", help="manifest CSV/Parquet, or a class-folder root")
    for flag, metavar, text in DATA_OPTIONS:
        p.add_argument(flag, metavar=metavar, help=text)
    p.add_argument(
        "--out", help="run store folder (default: runs/ beside the config, or in the cwd)"
    )
    p.add_argument("--run-id", help="name of the run folder")
    p.add_argument("--layer", help="target layer name or path")
    # The registry names the methods without importing Keras: --help stays quick.
    methods = ", ".join(method_names())
    p.add_argument("--method", help=f"CAM method: {methods} (default: gradcam)")
    p.add_argument("--target", choices=["true", "predicted"], help="class the maps explain")
    p.add_argument("--output", metavar="NAME", help="a multi-output model's classification output")
    p.add_argument("--batch-size", type=int, help="images per compiled step (default 32)")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("HEIGHT", "WIDTH"),
        help="resize images to this input size (default: the model's own input size)",
    )
    p.add_argument("--limit", type=int, help="audit only the first N entries")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument(
        "--engine", choices=["local", "ray"], default="local", help="where the audit pass runs"
    )
    p.add_argument("--ray-address", help="a Ray cluster to join (default: start a local one)")
    p.add_argument(
        "--baseline",
        help="compare each group with itself in this run folder or run id, or 'latest' (the "
        "newest complete run in the store of the same dataset, regions and class names)",
    )
    p.add_argument(
        "--fail-on",
        choices=FAIL_ON_LEVELS,
        help="exit 1 when the audit's outcome reaches this level (PASS < INCONCLUSIVE < "
        "WARN < FAIL): fail, warn, or inconclusive, the strict level that also fails a run "
        "with too few images to test most classes",
    )
    p.add_argument(
        "--unsafe-model", action="store_true", help="load models with code (trusted files only)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--mlflow", action="store_true", help="log the run to MLflow (output.mlflow)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        overrides = overrides_from(args)
        try:
            if args.config:
                config = load_config(args.config, overrides)
            else:
                if args.model is None or args.data is None:
                    raise ConfigError("give a config file, or at least --model and --data")
                config = build_config(overrides, "(command line)")
        except ConfigError as error:
            raise ConfigError(_name_flags(str(error), args)) from None
        check_inputs_exist(config)  # before Keras is imported: a typo fails in a second
        from audit.engine.models import ModelStructureError
        from audit.report.summary import format_summary
        from audit.run import run_audit

        try:
            baseline = _baseline(args.baseline, config)
            result = run_audit(
                config,
                resume=args.resume,
                progress=not args.no_progress,
                baseline=baseline,
                engine=args.engine,
                ray_address=args.ray_address,
            )
        except (ModelStructureError, FileNotFoundError) as error:
            raise ConfigError(str(error)) from None
    except ConfigError as error:
        print(f"bias-audit run: {error}", file=sys.stderr)
        return EXIT_USAGE
    import json

    report = json.loads((result.run_dir / "report.json").read_text())
    if baseline == "latest":
        print(
            f"baseline: {result.manifest['baseline']} (the newest complete run of this "
            "dataset, regions and classes)"
        )
    print(format_summary(report, result.manifest))
    if not result.manifest["counts"]["ok"]:  # a verdict on no images would be a lie
        print(
            f"bias-audit run: no image could be audited (every row was skipped; the reasons "
            f"are above and in {result.run_dir / 'images.parquet'}); fix the data or the "
            "regions and run again",
            file=sys.stderr,
        )
        return EXIT_USAGE
    print(format_gate(report))
    print(f"stored in {result.run_dir} (report.html, report.md, report.json)")
    from audit.report.outcome import reaches

    if reaches(report["outcome"], args.fail_on):
        return EXIT_POLICY
    return EXIT_OK


def _name_flags(message: str, args: argparse.Namespace) -> str:
    """Config error lines about a key that a given flag set name the flag too:
    ``batch_size (--batch-size): ...``."""

    def name(match: re.Match) -> str:
        key = match.group(2)
        flags = {
            flag: None
            for prefix, flag in FLAG_KEYS
            if getattr(args, flag[2:].replace("-", "_")) is not None
            and (
                key == prefix or (key.startswith(f"{prefix}.") and key[len(prefix) + 1 :].isdigit())
            )
        }
        return f"{match.group(1)}{key} ({', '.join(flags)}):" if flags else match.group(0)

    return re.sub(r"^(\s+)([\w.]+):", name, message, flags=re.MULTILINE)


def _baseline(value: str | None, config: AuditConfig) -> Path | str | None:
    """A baseline run folder, or ``"latest"`` (``run_audit`` finds the newest complete
    run of the same dataset, regions and class names once it knows them)."""
    if value is None or value == "latest":
        return value
    store = Path(config.output.store)
    path = Path(value)
    if not (path / "report.json").exists():
        path = store / value  # a run id in the store
    if not (path / "report.json").exists():
        raise ConfigError(f"--baseline {value}: not a finished run folder or run id in {store}")
    return path


def format_gate(report: dict) -> str:
    """The short table printed at the end of a run: the outcome (PASS, INCONCLUSIVE with
    its reason, WARN or FAIL), then the flagged classes and slices."""
    from audit.report.text import outcome_reason, slice_flag_text, untested_note

    head = f"{report['outcome']}: " + ", ".join(
        f"{count} {status}" for status, count in report["status_counts"].items()
    )
    reason = outcome_reason(report)
    lines = [f"{head}; {reason}" if reason else head]
    untested = untested_note(report)
    if untested and not reason:
        lines.append(f"  NOTE  {untested}")
    for entry in report["classes"]:
        if entry["status"] != "ok":
            level = {"fail": "FAIL", "warn": "WARN"}.get(entry["severity"], "PASS")
            lines.append(f"  {level:4s}  {entry['class_name']}: {entry['status']}")
            lines.extend(f"          {reason}" for reason in entry["reasons"])
    for test in report["slices"]["tests"]:
        if test.get("flagged"):
            level = {"fail": "FAIL", "warn": "WARN"}.get(test.get("severity"), "NOTE")
            lines.append(f"  {level:4s}  slice {slice_flag_text(test, str)}")
    return "\n".join(lines)
