"""The config's sections on decisions and their output (pydantic models): when a class
is flagged (policy), scheduled audits, the trust checks and the run store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from audit.config.sections import Section

# Interventions sample sequentially (intervention_look) from this many classes up: with
# fewer, the median each class is compared with rests on too few classes' looks.
SEQUENTIAL_MIN_CLASSES = 5


class PolicySection(Section):
    """When a class or slice is flagged (docs/flags.md)."""

    statistic: str = Field(
        "mass",
        description="Which spurious-region statistic is tested: a flaggable metric "
        "(built in: mass, lift; audit.measure.spec).",
    )

    @field_validator("statistic")
    @classmethod
    def _flaggable(cls, value: str) -> str:
        from audit.measure import spec

        flaggable = spec.names(flaggable=True)
        if value not in flaggable:
            raise ValueError(f"{value!r} is not a flaggable metric; choose one of {flaggable}")
        return value

    alpha: float = Field(0.05, gt=0, lt=1, description="Benjamini-Hochberg q-value threshold.")
    min_support: int = Field(20, ge=2, description="Smaller groups are not tested.")
    effect_floor: float = Field(
        0.05,
        ge=0,
        description="The 95% CI lower bound of (group - reference) must exceed this (mass units; "
        "for lift, lift units).",
    )
    bootstrap_resamples: int = Field(1000, ge=100, le=100_000)
    seed: int = Field(0, description="Seed of every bootstrap and sample.")
    intervention_samples: int = Field(
        200,
        ge=0,
        description="At most this many images per class for the interventions (0 turns them off).",
    )
    intervention_look: int = Field(
        40,
        ge=0,
        description="Sequential sampling: Mixed-Rand (and the transplant test, by predicted "
        "class) probes this many more images of each class at a time and stops a class "
        "once it has min_support results and the CI "
        "upper bound of its BG-gap's excess over the other classes' median is at most "
        "gap_floor (it cannot become evidence); with fewer than "
        f"{SEQUENTIAL_MIN_CLASSES} classes, or 0, every sampled image is probed.",
    )
    intervention_details: Literal["flagged", "all"] = Field(
        "flagged",
        description="Which classes also get the object-only and background-only "
        "interventions, on their first look's images (two more forward passes per image; "
        "Mixed-Rand, the evidence, runs for every class): those with a heatmap flag or "
        "intervention evidence, or all.",
    )
    gap_floor: float = Field(
        0.10,
        ge=0,
        description="The causal tests' effect floor: Mixed-Rand's BG-gap and the transplant "
        "rate are evidence when they exceed the other classes' median by this much, a "
        "slice association when its false-positive difference or the class's accuracy "
        "excess does (each on its CI's lower bound, with q < alpha); a test whose CI upper "
        "bound is at most this rules a shortcut out.",
    )


class ScheduleSection(Section):
    """Which model versions a scheduled audit covers (``bias-audit schedule run``)."""

    models: Path | list[Path] = Field(
        description="A folder of model versions (matched by `pattern`, in version order: "
        "v2, v2.1, v10), or a list of model files in version order."
    )
    pattern: str = Field("*.keras", description="With a folder: which files are versions.")
    fail_on: Literal["inconclusive", "warn", "fail", "never"] | None = Field(
        "fail",
        description="Exit 1 when the newest version's outcome reaches this level, in the "
        "order PASS < INCONCLUSIVE < WARN < FAIL (`inconclusive`, the strict level, also "
        "fails a run with too few images to test most classes; `never` or null: no gate).",
    )


class TrustSection(Section):
    """Checks of the maps themselves, run per audit on a sample (docs/trust.md)."""

    samples: int = Field(
        16, ge=0, description="Images (ok rows, spread over classes) checked; 0 turns them off."
    )
    steps: int = Field(8, ge=2, le=100, description="Deletion/insertion steps per curve.")
    baseline: Literal["blur", "mean"] = Field(
        "blur", description="What deleted pixels become: a blurred copy or the image's mean."
    )
    max_correlation: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Randomisation passes when at every cascade stage the randomised model's "
        "maps correlate less than this with the trained model's (mean Spearman).",
    )
    random_logit_max: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Random-logit passes when a random other class's maps correlate less "
        "than this (CI upper bound).",
    )
    guided_examples: bool = Field(
        True, description="Guided Grad-CAM pictures for the report's example images."
    )
    guided_min_side: int = Field(
        64,
        ge=0,
        description="Draw Guided Grad-CAM only when the model's input is at least this many "
        "pixels on its shorter side: below it the pictures read as noise, not as an image. "
        "0 draws them at any size.",
    )


class OutputSection(Section):
    store: Path = Field(Path("runs"), description="The run store folder.")
    run_id: str | None = Field(None, description="Name the run; default: time + config hash.")
    mlflow: bool = Field(
        False, description="Log verdicts and reports to MLflow (needs the mlflow package)."
    )

    @field_validator("run_id")
    @classmethod
    def _folder_name(cls, run_id: str | None) -> str | None:
        # The run folder is STORE/<run_id>: a path here would put it (and the history
        # index beside it) outside the store.
        if run_id is not None and (
            run_id.strip() in ("", ".", "..") or any(c in run_id for c in "/\\\0")
        ):
            raise ValueError(
                f"{run_id!r} is not a plain folder name; a run id names a folder inside "
                "output.store: no '/' or '\\', not '.' or '..' (e.g. products-v2)"
            )
        return run_id
