"""The ``bias-audit`` command line (also ``python -m audit``).

Exit codes: 0 ok, 1 the audit policy failed, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_POLICY, EXIT_USAGE = 0, 1, 2


def _run(argv: list[str]) -> int:
    from audit.run_cli import main as run_main

    return run_main(argv)


def _demo(argv: list[str]) -> int:
    from pipelines.demo import main as demo_main

    return demo_main(argv)


COMMANDS = {
    "run": (_run, "audit a dataset (a YAML config, or --model/--data/--out)"),
    "demo": (_demo, "train a small biased model on generated digits and audit it"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
    return handler(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
