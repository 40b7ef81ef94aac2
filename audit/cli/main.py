"""The ``bias-audit`` command line (also ``python -m audit``).

Exit codes, for every command (``audit.errors``):
  0  ok (`run`, `schedule run`: the outcome is below the --fail-on / schedule.fail_on level)
  1  the policy failed: the outcome reached that level (PASS < INCONCLUSIVE < WARN < FAIL;
     `--fail-on inconclusive` is the strict level), or `compare` found a new flag
  2  usage or configuration error, or no image could be audited (no verdict)
  3  the command stopped on an error (a bug, the disk full, a store it cannot write);
     no verdict; the run is marked failed and `--resume` continues it
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import sys

from audit.errors import EXIT_OK, EXIT_POLICY, EXIT_USAGE, guarded


def _run(argv: list[str]) -> int:
    from audit.cli.run import main as run_main

    return run_main(argv)


def _report(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="bias-audit report", description="Write a run's report from its store."
    )
    parser.add_argument("run", help="a run folder (STORE/<run_id>)")
    parser.add_argument(
        "--format", choices=["html", "md", "json"], default="html", help="which report to write"
    )
    args = parser.parse_args(argv)
    from pathlib import Path

    from audit.report.write import write_reports
    from audit.runs.store import IMAGES, RunStore, run_state

    run_dir = Path(args.run)
    run = RunStore(run_dir)
    if not run.exists():
        print(f"bias-audit report: {run_dir} is not a run folder", file=sys.stderr)
        return EXIT_USAGE
    status = run_state(run_dir, run.manifest())
    if status != "complete" or not (run_dir / IMAGES).exists():
        # A killed run, or one whose analysis failed: it has no results to report yet.
        print(
            f"bias-audit report: run {run_dir} is incomplete (status {status}); resume it with "
            "`bias-audit run CONFIG --resume` (the config it was started with)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    written = write_reports(run_dir, formats=("json", args.format))
    print(written[args.format])
    return EXIT_OK


def _compare(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="bias-audit compare",
        description="Compare two runs; exit 1 when the new run adds a flag (a new run that "
        "is INCONCLUSIVE is noted, not gated: gate it with `run --fail-on inconclusive`).",
    )
    parser.add_argument("old", help="the earlier run folder")
    parser.add_argument("new", help="the later run folder")
    args = parser.parse_args(argv)
    from pathlib import Path

    from audit.config import ConfigError
    from audit.runs.compare import compare_runs, format_comparison

    try:
        result = compare_runs(Path(args.old), Path(args.new))
    except (FileNotFoundError, ConfigError) as error:
        print(f"bias-audit compare: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(format_comparison(result))
    return EXIT_POLICY if result["new_flags"] else EXIT_OK


def _dashboard(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="bias-audit dashboard", description="Review runs in a Streamlit dashboard."
    )
    parser.add_argument("--store", default="runs", help="the run store folder (default: runs)")
    parser.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    parser.add_argument("--address", default="localhost", help="interface to listen on")
    args = parser.parse_args(argv)
    import os
    from pathlib import Path

    store = Path(args.store).resolve()
    if not store.is_dir():
        print(f"bias-audit dashboard: store folder not found: {store}", file=sys.stderr)
        return EXIT_USAGE
    app = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
    command = [
        sys.executable, "-m", "streamlit", "run", str(app),
        "--server.port", str(args.port), "--server.address", args.address,
        "--server.headless", "true", "--browser.gatherUsageStats", "false",
        "--", "--store", str(store),
    ]  # fmt: skip
    print(f"Dashboard for {store} on http://{args.address}:{args.port}", flush=True)
    os.environ["BIAS_AUDIT_STORE"] = str(store)
    # Become the Streamlit server (no child process left behind when this one stops).
    os.execv(sys.executable, command)


SCHEDULE_HELP = """usage: bias-audit schedule run CONFIG [--fail-on inconclusive|warn|fail|never]
                               [--progress]

Audit every model version that a config's schedule: section names and that has no
complete run yet, and compare each with the previous version.

subcommands:
  run CONFIG   audit the new versions; exit 1 when the newest version's outcome
               reaches schedule.fail_on (PASS < INCONCLUSIVE < WARN < FAIL), 2 when
               none of its images could be audited or a version cannot be read
               ('bias-audit schedule run --help' for its options)
"""


def _schedule(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(SCHEDULE_HELP, end="")
        return EXIT_OK
    if not argv or argv[0] != "run":
        print(SCHEDULE_HELP, end="", file=sys.stderr)
        return EXIT_USAGE
    from audit.runs.schedule import main as schedule_main

    return schedule_main(argv[1:])


def _history(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="bias-audit history",
        description="List the runs in a store with their status and, once complete, their "
        "verdict and flags (one line each, with the decision in force).",
    )
    parser.add_argument("--store", default="runs", help="the run store folder (default: runs)")
    parser.add_argument("--model-line", help="only this model line")
    args = parser.parse_args(argv)
    from pathlib import Path

    from audit.runs.history import history

    store = Path(args.store)
    if not store.is_dir():
        print(f"bias-audit history: store folder not found: {store}", file=sys.stderr)
        return EXIT_USAGE
    runs = history(store)
    if not len(runs):
        print(f"no runs in {store}")
        return EXIT_OK
    if args.model_line is not None:
        lines = sorted(set(runs["model_line"]))
        runs = runs[runs["model_line"] == args.model_line]
        if not len(runs):
            print(
                f"no runs match model line {args.model_line} in {store}; its model lines: "
                + ", ".join(lines)
            )
            return EXIT_OK
    # The model file tells the versions of a line apart.
    runs = runs.assign(model=[Path(path).name for path in runs["model_path"].fillna("")])
    columns = ["run_id", "model_line", "model", "status", "outcome", "bias_driven", "suspected"]
    # An unfinished run has no verdict: n/a, as the dashboard shows it.
    table = runs[columns].astype(object).where(runs[columns].notna(), "n/a")
    header, *rows = table.to_string(index=False).splitlines()
    print(header)
    for row, flags, failure in zip(rows, runs["flags"], runs["failure"], strict=True):
        print(row)
        for flag in flags:  # in full, one a line under its run
            print(f"    {flag}")
        if failure:  # a failed run: why it stopped (--resume continues it)
            print(f"    stopped on an error: {failure}")
    return EXIT_OK


def _plugin(name: str):
    """A command that an application of the distribution provides (``pipelines/``),
    found through the ``bias_audit.commands`` entry points that ``pip install`` records
    (pyproject.toml): the library itself never imports the applications."""

    def handler(argv: list[str]) -> int:
        from importlib.metadata import entry_points

        found = entry_points(group="bias_audit.commands", name=name)
        if not found:
            print(
                f"bias-audit {name}: this command comes with the bias-audit distribution's "
                "applications; install it from its source folder (pip install -e .)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        return next(iter(found)).load()(argv)

    return handler


COMMANDS = {
    "run": (_run, "audit a dataset (a YAML config, or --model/--data/--out)"),
    "report": (_report, "write a run's report (html, md or json)"),
    "compare": (_compare, "compare two runs: per-class deltas, new and resolved flags"),
    "dashboard": (_dashboard, "review runs and record decisions in a Streamlit dashboard"),
    "schedule": (_schedule, "'schedule run CONFIG': audit every new model version, gate"),
    "history": (_history, "list the store's runs, flags and decisions"),
    "demo": (_plugin("demo"), "train a small biased model on generated digits and audit it"),
}


def _short_warnings() -> None:
    """The tool's own warnings as one line each (``bias-audit: warning: ...``), without
    the source line Python shows under them; other libraries' keep their format."""
    import warnings
    from pathlib import Path

    ours = Path(__file__).resolve().parents[2]  # the folder that holds audit/
    default = warnings.formatwarning
    if getattr(default, "bias_audit", False):  # main() ran before in this process
        return

    def format_warning(message, category, filename, lineno, line=None):
        path = Path(filename).resolve()
        if path.is_relative_to(ours / "audit") or path.is_relative_to(ours / "pipelines"):
            return f"bias-audit: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    format_warning.bias_audit = True
    warnings.formatwarning = format_warning


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _short_warnings()
    parser = argparse.ArgumentParser(
        prog="bias-audit",
        description="Grad-CAM dataset-bias audits for Keras image classifiers.",
        epilog="Run 'bias-audit COMMAND --help' for a command's options.",
    )
    parser.add_argument(
        "command",
        choices=sorted(COMMANDS),
        help="; ".join(f"{name}: {text}" for name, (_, text) in sorted(COMMANDS.items())),
    )
    parser.add_argument("--version", action="version", version="bias-audit 0.1.0")
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser.parse_args(argv or ["--help"])
    if argv[0] not in COMMANDS:
        parser.print_usage(sys.stderr)
        print(
            f"bias-audit: unknown command {argv[0]!r}; choose from {', '.join(sorted(COMMANDS))}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    handler, _ = COMMANDS[argv[0]]
    return guarded(argv[0], lambda: handler(argv[1:]))


if __name__ == "__main__":
    raise SystemExit(main())
