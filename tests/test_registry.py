"""A CAM method is one decorated function: the config, the CLI, the engine and a whole
audit take it by name (audit.engine.registry)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ink_model
from keras import ops

from audit.cli.main import main
from audit.config import ConfigError, build_config
from audit.engine import registry
from audit.engine.explain import GradCAM
from audit.engine.registry import cam_method, method_names
from pipelines.demo import write_dataset
from pipelines.demo_data import make_demo_set


@pytest.fixture
def absgrad():
    """A method registered for one test: |G|-weighted activations."""

    @cam_method("absgrad", class_agnostic=False)
    def absgrad(activations, gradients):
        return ops.relu(ops.sum(ops.abs(gradients) * activations, axis=-1))

    yield absgrad
    registry._REGISTRY.pop("absgrad")


def test_the_built_in_names_need_no_keras():
    code = (
        "import sys; from audit.config import build_config; "
        "c = build_config({'model': {'path': 'm.keras', 'method': 'Grad-CAM++'}, "
        "'dataset': {'manifest': 'x.csv'}}); "
        "print(c.model.method, 'keras' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["gradcam++", "False"], out.stderr[-2000:]


def test_an_unknown_method_names_the_registered_ones():
    with pytest.raises(ConfigError, match="unknown CAM method 'gradcum'.*gradcam, hirescam"):
        build_config({"model": {"path": "m.keras", "method": "gradcum"}, "dataset": {}})


def test_a_decorated_function_runs_through_config_engine_cli_and_a_whole_audit(
    absgrad, tmp_path, capsys
):
    assert "absgrad" in method_names()
    # The engine: the method's formula on the model's activations and gradients.
    images = make_demo_set(8, seed=1).images
    model = ink_model()
    maps = GradCAM(model, method="absgrad").explain(images, np.zeros(8, "int32"))
    hires = GradCAM(model, method="hirescam").explain(images, np.zeros(8, "int32"))
    # One channel with a positive gradient: |G| A = G A, so the maps equal HiResCAM's.
    np.testing.assert_allclose(maps, hires, rtol=1e-5, atol=1e-6)
    assert maps.max() > 0
    # The CLI's help, its config and a whole audit.
    from audit.cli.run import parser

    assert "absgrad" in parser().format_help()
    manifest = write_dataset(make_demo_set(40, seed=2), tmp_path / "data")
    model.save(tmp_path / "ink.keras")
    argv = ["run", "--model", str(tmp_path / "ink.keras"), "--data", str(manifest)]
    argv += ["--out", str(tmp_path / "runs"), "--method", "AbsGrad", "--no-progress"]
    assert main(argv) in (0, 1)
    [run] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    manifest_json = json.loads((run / "manifest.json").read_text())
    assert manifest_json["model"]["method"] == "absgrad"
    report = json.loads((run / "report.json").read_text())
    assert report["trust"]["random_logit"]["status"] != "not applicable"  # class-specific
    assert "absgrad" in capsys.readouterr().out
