"""Known-answer verdicts: planted shortcuts found, clean models passed, at several seeds.

For each scenario of ``pipelines.scenarios`` and each seed, a biased model (planted
background shortcuts in training) and a clean one (the same data and training, no
shortcut) are trained, then audited on a held-out set whose backgrounds are drawn
independently of the class, with the quick form's defaults. Prints one line per
audit and a summary table: planted classes found (bias-driven), false bias-driven
classes, the outcomes of the clean models (WARN or worse counts against them), and
the forward passes the analysis spent per causal test.

    python -m benchmarks.bench_verdicts                  # every scenario, seeds 0 1 2
    python -m benchmarks.bench_verdicts --scenarios rare_background --seeds 0 1

Targets (issue 23): every planted class found at every seed, no false bias-driven
class, every clean model PASS.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass(frozen=True)
class VerdictResult:
    """One audit of a known-answer scenario."""

    scenario: str
    seed: int
    variant: str  # "biased" or "clean"
    planted: tuple[str, ...]
    bias_driven: tuple[str, ...]
    suspected: tuple[str, ...]
    outcome: str
    forward_passes: dict[str, int]
    seconds: float

    @property
    def found(self) -> int:
        return len(set(self.planted) & set(self.bias_driven))

    @property
    def false_bias_driven(self) -> tuple[str, ...]:
        return tuple(name for name in self.bias_driven if name not in self.planted)


def audit_scenario(name: str, seed: int, clean: bool, workdir: Path, **policy) -> VerdictResult:
    """Build (train) one scenario's model and audit set, audit it, read its verdicts."""
    from audit.run import run_audit
    from pipelines.scenarios import build_scenario, scenario_config

    started = time.perf_counter()
    variant = "clean" if clean else "biased"
    files = build_scenario(name, workdir / f"{name}-{seed}-{variant}", seed=seed, clean=clean)
    result = run_audit(scenario_config(files, files.root / "runs", **policy))
    report = json.loads((result.run_dir / "report.json").read_text())
    by_status = {
        status: tuple(c["class_name"] for c in report["classes"] if c["status"] == status)
        for status in ("bias-driven", "suspected")
    }
    return VerdictResult(
        scenario=name,
        seed=seed,
        variant=variant,
        planted=tuple(files.class_names[index] for index in files.planted),
        bias_driven=by_status["bias-driven"],
        suspected=by_status["suspected"],
        outcome=report["outcome"],
        forward_passes=report["forward_passes"],
        seconds=time.perf_counter() - started,
    )


def summarise(results: list[VerdictResult]) -> pd.DataFrame:
    """Per scenario: planted found / planted, false bias-driven, clean WARN-or-worse,
    and the mean forward passes per audit of each test."""
    rows = []
    for name in dict.fromkeys(r.scenario for r in results):
        mine = [r for r in results if r.scenario == name]
        clean = [r for r in mine if r.variant == "clean"]
        planted = sum(len(r.planted) for r in mine)
        rows.append(
            {
                "scenario": name,
                "seeds": len({r.seed for r in mine}),
                "planted found": f"{sum(r.found for r in mine)}/{planted}",
                "false bias-driven": sum(len(r.false_bias_driven) for r in mine),
                "clean not PASS": f"{sum(r.outcome != 'PASS' for r in clean)}/{len(clean)}",
                **{
                    f"fwd {test}": round(sum(r.forward_passes[test] for r in mine) / len(mine))
                    for test in ("mixed_rand", "mixed_same", "diagnostics", "transplant")
                },
            }
        )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    from pipelines.scenarios import SCENARIOS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, help="keep the models and runs here")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        for name in args.scenarios:
            for seed in args.seeds:
                for clean in (False, True):
                    result = audit_scenario(name, seed, clean, workdir)
                    results.append(result)
                    print(
                        f"{name:16s} seed {seed} {result.variant:6s} {result.outcome:12s} "
                        f"planted {list(result.planted)} bias-driven {list(result.bias_driven)} "
                        f"suspected {list(result.suspected)} forward {result.forward_passes} "
                        f"({result.seconds:.0f} s)",
                        flush=True,
                    )
    print()
    print(summarise(results).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
