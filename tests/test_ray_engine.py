"""The Ray Data engine gives the local engine's rows and flags on the same inputs."""

import numpy as np
import pandas as pd
import pytest
from conftest import ink_model

from audit.config import build_config
from audit.run import run_audit
from pipelines.demo import write_dataset
from pipelines.demo_data import make_demo_set


@pytest.mark.slow
def test_ray_engine_matches_the_local_engine(tmp_path):
    pytest.importorskip("ray")  # a test extra; installed in CI
    import ray

    manifest = write_dataset(make_demo_set(90, seed=8), tmp_path / "data")
    table = pd.read_csv(manifest)
    table.loc[5, "path"] = "images/missing.png"  # a skipped row must come through too
    table.to_csv(manifest, index=False)
    ink_model().save(tmp_path / "ink.keras")

    def config(store):
        return build_config(
            {
                "model": {"path": str(tmp_path / "ink.keras"), "class_names": list("0123456789")},
                "dataset": {"manifest": str(manifest)},
                "output": {"store": str(tmp_path / store)},
                "batch_size": 16,
                "policy": {"intervention_samples": 20, "min_support": 5},
            }
        )

    local = run_audit(config("local"), progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        distributed = run_audit(config("ray"), progress=False, engine="ray")
    finally:
        ray.shutdown()
    left, right = local.images, distributed.images
    assert len(right) == 90 and right["row"].tolist() == list(range(90))
    assert right.loc[5, "status"] == "skipped" and "not found" in right.loc[5, "skip_reason"]
    pd.testing.assert_index_equal(left.columns, right.columns)
    numeric = left.select_dtypes("number").columns
    np.testing.assert_allclose(left[numeric], right[numeric], rtol=1e-5, atol=1e-6)
    other = left.columns.difference(numeric)
    pd.testing.assert_frame_equal(left[other], right[other])
    flags_left = pd.read_parquet(local.run_dir / "flags.parquet")
    flags_right = pd.read_parquet(distributed.run_dir / "flags.parquet")
    assert flags_left["flagged"].tolist() == flags_right["flagged"].tolist()


def test_a_ray_address_nobody_answers_is_a_usage_error_at_once():
    import socket

    from audit.config import ConfigError
    from audit.engines.ray import check_ray_address

    with socket.socket() as probe:  # a free port, closed again: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConfigError, match=f"--ray-address 127.0.0.1:{port}: no Ray cluster"):
        check_ray_address(f"127.0.0.1:{port}", timeout=2)
    with pytest.raises(ConfigError, match="no Ray cluster"):
        check_ray_address("not-an-address")
    check_ray_address(None)  # a local Ray: nothing to check
    check_ray_address("auto")
