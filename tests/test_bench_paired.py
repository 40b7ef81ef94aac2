"""The paired benchmark's harness: every row goes through the audit and, in the pauses,
through the forward pass, exactly once (its timings are printed, never asserted)."""

import pandas as pd
import pytest

import audit.engines.local as local_engine
from benchmarks import bench_paired


@pytest.mark.slow
def test_pauses_cover_every_row_once_and_leave_the_pipeline_as_it_was(
    tmp_path, capsys, monkeypatch
):
    submit, close = local_engine.ChunkWriter.submit, local_engine.ChunkWriter.close
    seen = []
    forward_runner = bench_paired.forward_runner

    def recording(model, loader):
        run = forward_runner(model, loader)

        def recorded(rows):
            seen.append(list(rows))
            return run(rows)

        return recorded

    monkeypatch.setattr(bench_paired, "forward_runner", recording)
    timed = []

    class RecordedStages(bench_paired.StageTimes):
        def __enter__(self):
            timed.append(self)
            return super().__enter__()

    monkeypatch.setattr(bench_paired, "StageTimes", RecordedStages)
    bench_paired.main(
        ["--size", "48", "--images", "300", "--slice", "128", "--workdir", str(tmp_path)]
    )
    out = capsys.readouterr().out
    # The warm-up call traces on one batch; then one pause per 128 rows (at chunk
    # boundaries of 128), and one for the 44 rows of the last chunk.
    pauses = seen[1:]
    assert [len(rows) for rows in pauses] == [128, 128, 44]
    assert sorted(row for rows in pauses for row in rows) == list(range(300))
    assert "paused 3 times" in out and "whole audit / forward = " in out
    assert (local_engine.ChunkWriter.submit, local_engine.ChunkWriter.close) == (submit, close)
    # Every analysis stage ran and was timed (the interventions and the trust checks ran
    # forward passes), as the library reports them.
    (stages,) = timed
    # (Not the Guided Grad-CAM examples: a 48 px model is under trust.guided_min_side.)
    timed_stages = {k: v for k, v in stages.seconds.items() if k != "guided examples"}
    assert all(seconds > 0 for seconds in timed_stages.values()), stages.seconds
    assert stages.forward_images > 0 and "analysis stages: interventions" in out
    (run,) = [path for path in (tmp_path / "runs").iterdir() if path.is_dir()]
    images = pd.read_parquet(run / "images.parquet")
    assert len(images) == 300 and (images["status"] == "ok").all()
