"""``bias-audit run``: a config file, command-line flags, or both (flags win)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from audit.config import ConfigError, build_config, load_config

EXIT_OK, EXIT_USAGE = 0, 2


def _data_section(path: Path) -> dict:
    if path.is_dir():
        return {"folders": str(path)}
    if path.suffix == ".json":
        raise ConfigError(
            f"{path}: for a COCO file use a config with dataset.coco and dataset.coco_images"
        )
    return {"manifest": str(path)}


def overrides_from(args: argparse.Namespace) -> dict:
    """Flags as a nested config dict; paths made absolute (they are relative to the cwd)."""
    overrides: dict = {}

    def put(section: str, key: str, value) -> None:
        if value is not None:
            overrides.setdefault(section, {})[key] = value

    put("model", "path", args.model and str(Path(args.model).resolve()))
    put("model", "layer", args.layer)
    put("model", "method", args.method)
    put("model", "target", args.target)
    if args.unsafe_model:
        put("model", "safe_mode", False)
    if args.data is not None:
        overrides["dataset"] = _data_section(Path(args.data).resolve())
    put("dataset", "limit", args.limit)
    put("output", "store", args.out and str(Path(args.out).resolve()))
    put("output", "run_id", args.run_id)
    if args.size is not None:
        put("preprocess", "size", list(args.size))
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    return overrides


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bias-audit run",
        description="Run Grad-CAM over a labeled dataset and store per-image metrics.",
    )
    p.add_argument("config", nargs="?", help="YAML audit config (docs/config.md)")
    p.add_argument("--model", help="model file (.keras/.h5)")
    p.add_argument("--data", help="manifest CSV/Parquet, or a class-folder root")
    p.add_argument("--out", help="run store folder (default: runs/)")
    p.add_argument("--run-id", help="name of the run folder")
    p.add_argument("--layer", help="target layer name or path")
    p.add_argument("--method", help="gradcam, hirescam, gradcam++, xgradcam or layercam")
    p.add_argument("--target", choices=["true", "predicted"], help="class the maps explain")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"))
    p.add_argument("--limit", type=int, help="audit only the first N entries")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument(
        "--unsafe-model", action="store_true", help="load models with code (trusted files only)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        overrides = overrides_from(args)
        if args.config:
            config = load_config(args.config, overrides)
        else:
            if args.model is None or args.data is None:
                raise ConfigError("give a config file, or at least --model and --data")
            config = build_config(overrides, "(command line)")
        from audit.models import ModelStructureError
        from audit.pipeline import run_audit
        from audit.summary import format_summary

        try:
            result = run_audit(config, resume=args.resume, progress=not args.no_progress)
        except (ModelStructureError, FileNotFoundError) as error:
            raise ConfigError(str(error)) from None
    except ConfigError as error:
        print(f"bias-audit run: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(format_summary(result.images, result.manifest))
    print(f"stored in {result.run_dir}")
    return EXIT_OK
