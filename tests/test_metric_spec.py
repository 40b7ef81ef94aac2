"""A region metric is one specification (audit.measure.spec): the step measures it, the
row schema, aggregation, flags, reports and the run summary read it from there."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import ink_model
from keras import ops

from audit.config import ConfigError, build_config
from audit.measure import spec
from audit.measure.metrics import region_metrics
from audit.measure.spec import Metric, region_metric, register_metric, unregister_metric
from audit.report.summary import class_table
from audit.run import run_audit
from pipelines.demo import write_dataset
from pipelines.demo_data import make_demo_set


@pytest.fixture
def peak_share():
    """The map's highest value inside the region over its highest anywhere: 1 exactly
    where the pointing game scores a hit."""

    @region_metric("peak_share", flaggable=True, shown_for=("spurious",))
    def peak_share(maps, regions):
        inside = ops.cast(regions >= 0.5, "float32") * maps[:, None]
        return ops.max(inside, axis=(2, 3)) / ops.max(maps, axis=(1, 2))[:, None]

    yield peak_share
    unregister_metric("peak_share")


def test_the_built_in_specifications():
    assert spec.names() == ("mass", "area", "lift", "pointing", "rank_acc", "iou")
    assert spec.names(aggregated=True) == ("mass", "lift", "pointing")
    assert spec.names(flaggable=True) == ("mass", "lift")
    assert "rank_acc" not in spec.names(other_map=True)
    assert spec.column("mass", "background", spec.map_prefix("true", "pred")) == (
        "pred_mass_background"
    )
    assert spec.map_prefix("predicted", "pred") == ""
    assert spec.map_prefix("predicted", "true") == "true_"


def test_a_specification_is_checked():
    with pytest.raises(ValueError, match="only a mean can be flagged"):
        register_metric(Metric("hits", summary="rate", flaggable=True))
    with pytest.raises(ValueError, match="built in"):
        register_metric(Metric("mass", compute=lambda maps, regions: maps))
    with pytest.raises(ValueError, match="metric name"):
        register_metric(Metric("two__parts"))
    with pytest.raises(ConfigError, match="not a flaggable metric.*'mass', 'lift'"):
        build_config({"model": {"path": "m.keras"}, "policy": {"statistic": "pointing"}})


def test_the_spec_module_needs_no_keras():
    code = "import sys; from audit.measure import spec; spec.names(); print('keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["False"], out.stderr[-2000:]


def test_an_added_metric_is_computed_on_every_backend_op_and_null_on_a_zero_map(peak_share):
    maps = np.zeros((2, 4, 4), "float32")
    maps[0, 0, 0], maps[0, 3, 3] = 1.0, 0.5
    regions = np.zeros((2, 1, 4, 4), "float32")
    regions[:, 0, 3, 3] = 1.0
    out = region_metrics(maps, regions)
    assert float(out["peak_share"][0, 0]) == pytest.approx(0.5)
    assert np.isnan(out["peak_share"][1, 0])  # the zero map
    assert "peak_share" not in region_metrics(maps, regions, names=("mass",))


def test_an_added_metric_is_measured_aggregated_flagged_and_reported(peak_share, tmp_path):
    manifest = write_dataset(make_demo_set(60, seed=3), tmp_path / "data")
    ink_model().save(tmp_path / "ink.keras")
    config = build_config(
        {
            "model": {"path": str(tmp_path / "ink.keras")},
            "dataset": {"manifest": str(manifest)},
            "output": {"store": str(tmp_path / "runs")},
            "policy": {"statistic": "peak_share", "min_support": 5, "bootstrap_resamples": 200},
        }
    )
    result = run_audit(config, progress=False)
    images = pd.read_parquet(result.run_dir / "images.parquet")
    ok = images[images["status"] == "ok"]
    # Measured on both maps, one column per region, and right: 1 exactly on a pointing hit.
    for prefix in ("", "pred_"):
        for region in ("object", "background"):
            share = ok[spec.column("peak_share", region, prefix)]
            pointing = ok[spec.column("pointing", region, prefix)]
            both = share.notna() & pointing.notna()
            assert both.sum() > 20
            np.testing.assert_array_equal(share[both] == 1.0, pointing[both] == 1.0)
    # Aggregated with its CI, per group.
    groups = pd.read_parquet(result.run_dir / "classes.parquet")  # every group
    # (the untrained ink model predicts few classes right: predicted-label groups,
    # measured on every row with the predicted class's map).
    predicted = groups[(groups["kind"] == "pred") & groups["peak_share_background"].notna()]
    assert len(predicted)
    assert (predicted["peak_share_background_low"] <= predicted["peak_share_background"]).all()
    expected = ok.groupby("pred")["pred_peak_share_background"].mean().dropna()
    np.testing.assert_allclose(
        predicted.set_index("class_index")["peak_share_background"].loc[expected.index], expected
    )
    # Flags test it (policy.statistic), and the reports and summary show it.
    flags = pd.read_parquet(result.run_dir / "flags.parquet")
    assert set(flags["statistic"].dropna()) == {"peak_share"}
    report = json.loads((result.run_dir / "report.json").read_text())
    entry = report["classes"][0]["true_label"]["peak_share"]["background"]
    assert set(entry) == {"mean", "low", "high"}
    markdown = (result.run_dir / "report.md").read_text()
    assert "| peak_share |" in markdown
    assert "<td>peak_share</td>" in (result.run_dir / "report.html").read_text()
    assert "peak_share_background" in class_table(report).columns
