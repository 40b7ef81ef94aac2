"""The region metrics the audit knows, one specification each, and the names of their
columns, built here and nowhere else.

Every stage reads this table: the compiled step measures each metric
(``measure.metrics``), ``images.parquet`` gets a column per metric, region and map
(``column``), aggregation summarises the ``aggregated`` ones per group as a mean with
a bootstrap-t CI or a rate with a Wilson CI, ``flags.statistic`` may name a
``flaggable`` one, and the reports, the run summary, ``compare`` and the dashboard
show them. Adding a metric is one decorated function:

    from keras import ops
    from audit.measure.spec import region_metric

    @region_metric("peak_share", summary="mean", share=True)
    def peak_share(maps, regions):
        # maps (batch, H, W) >= 0; regions (batch, R, H, W) coverage in [0, 1]
        inside = ops.max(maps[:, None] * regions, axis=(2, 3))
        return inside / ops.max(maps, axis=(1, 2))[:, None]     # (batch, R)

The function is written in ``keras.ops`` and runs inside the compiled step on every
backend, on the measuring grid; its value is null (NaN) for an image whose map is zero
everywhere. A package can add metrics through the ``bias_audit.metrics`` entry points
(name = "module:function"): the module is imported when the metrics are first read.
This module imports neither Keras nor pandas, so reports and the dashboard read it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

ENTRY_POINTS = "bias_audit.metrics"
# Prefixes of the two maps' columns: the main map (``model.target``) has none, the
# other target's map is ``pred_`` (target true) or ``true_`` (target predicted).
OTHER_PREFIX = {"true": "pred_", "predicted": "true_"}


@dataclass(frozen=True)
class Metric:
    """What a region metric is and how every stage treats it.

    * ``summary``: ``mean`` (mean with a bootstrap-t CI) or ``rate`` (a 0/1 value; a
      Wilson CI);
    * ``share``: its values lie in [0, 1] (shares and rates) or not (``lift``);
    * ``aggregated``: summarised per group (class, prediction, slice) in ``classes.parquet``
      and the reports;
    * ``flaggable``: ``flags.statistic`` may test it (a mean where more is more
      spurious on a spurious region);
    * ``other_map``: also measured on the other target's map (true vs predicted class);
    * ``shown_for``: the region roles whose value the run summary and the dashboard's
      class table show;
    * ``compute``: ``(maps, regions) -> (batch, regions)`` in ``keras.ops``; ``None``
      for the built-in metrics, computed together in ``measure.metrics``.
    """

    name: str
    summary: Literal["mean", "rate"] = "mean"
    share: bool = True
    aggregated: bool = True
    flaggable: bool = False
    other_map: bool = True
    shown_for: tuple[str, ...] = ()
    compute: Callable | None = None
    description: str = ""


_BUILT_IN = (
    Metric(
        "mass",
        flaggable=True,
        shown_for=("expected", "spurious"),
        description="share of the map's mass on the region",
    ),
    Metric("area", aggregated=False, description="share of the image the region covers"),
    Metric(
        "lift",
        share=False,
        flaggable=True,
        shown_for=("expected",),
        description="mass / area (1 = uniform attention)",
    ),
    Metric("pointing", summary="rate", description="a maximal pixel of the map is in the region"),
    Metric(
        "rank_acc",
        aggregated=False,
        other_map=False,  # one sort of every map: the costliest metric, and no flag reads it
        description="share of the region among the map's top |R| pixels",
    ),
    Metric("iou", aggregated=False, description="IoU of the map's hot pixels with the region"),
)
_REGISTRY: dict[str, Metric] = {metric.name: metric for metric in _BUILT_IN}
_loaded_entry_points = False


def region_metric(
    name: str,
    *,
    summary: Literal["mean", "rate"] = "mean",
    share: bool = True,
    aggregated: bool = True,
    flaggable: bool = False,
    other_map: bool = True,
    shown_for: tuple[str, ...] = (),
    description: str = "",
):
    """Register the decorated ``(maps, regions) -> (batch, regions)`` function as the
    region metric ``name`` (see the module)."""

    def register(function: Callable) -> Callable:
        register_metric(
            Metric(
                name,
                summary,
                share,
                aggregated,
                flaggable,
                other_map,
                tuple(shown_for),
                function,
                description or (function.__doc__ or "").strip().split("\n")[0],
            )
        )
        return function

    return register


def register_metric(metric: Metric) -> None:
    if metric.summary not in ("mean", "rate"):
        raise ValueError(f"metric {metric.name!r}: summary must be 'mean' or 'rate'")
    if metric.flaggable and metric.summary != "mean":
        raise ValueError(f"metric {metric.name!r}: only a mean can be flagged")
    if not metric.name.isidentifier() or "__" in metric.name:
        raise ValueError(f"metric name {metric.name!r}: use letters, digits and single '_'")
    built_in = {m.name for m in _BUILT_IN}
    if metric.name in built_in and metric.compute is not None:
        raise ValueError(f"metric {metric.name!r} is built in; choose another name")
    _REGISTRY[metric.name] = metric


def unregister_metric(name: str) -> None:
    """Remove an added metric (tests); the built-in ones stay."""
    if name not in {m.name for m in _BUILT_IN}:
        _REGISTRY.pop(name, None)


def _load_entry_points() -> None:
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINTS):
        function = point.load()
        if point.name not in _REGISTRY:  # a module without the decorator
            region_metric(point.name)(function)


def metrics(
    *, aggregated: bool | None = None, flaggable: bool | None = None, other_map: bool | None = None
) -> Iterator[Metric]:
    """The known metrics in order (built-in first), those matching every given filter."""
    _load_entry_points()
    for metric in _REGISTRY.values():
        if aggregated is not None and metric.aggregated != aggregated:
            continue
        if flaggable is not None and metric.flaggable != flaggable:
            continue
        if other_map is not None and metric.other_map != other_map:
            continue
        yield metric


def metric(name: str) -> Metric:
    _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(_REGISTRY)}") from None


def names(**filters) -> tuple[str, ...]:
    return tuple(m.name for m in metrics(**filters))


def column(name: str, region: str, prefix: str = "") -> str:
    """The column of metric ``name`` on ``region``: ``mass_background``, or with the
    other map's prefix ``pred_mass_background``; its CI is ``<column>_low``/``_high``."""
    return f"{prefix}{name}_{region}"


def counterfactual_column(region: str) -> str:
    """The column of the counterfactual map's mass on ``region``: ``cf_mass_<region>``."""
    return column("mass", region, "cf_")


def map_prefix(target: str, maps: str) -> str:
    """The prefix of the columns measured on the ``maps`` ("true" or "pred") class's map
    in a run whose ``model.target`` is ``target`` ("true" or "predicted")."""
    main = "true" if target == "true" else "pred"
    return "" if maps == main else OTHER_PREFIX[target]
