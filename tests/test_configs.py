"""The example configs load, the config reference lists every key, and errors name the key."""

import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from audit.cli.main import main
from audit.config import AuditConfig, ConfigError, build_config, load_config, merge
from audit.config.sections import DEFAULT_REGIONS, RegionSection

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
CONFIG_DOC = ROOT / "docs" / "config.md"


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models inside a field's annotation (``X``, ``X | None``, ``tuple[X, ...]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _is_sequence(annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_sequence(arg) for arg in typing.get_args(annotation))
    return origin in (tuple, list)


def config_keys(model: type[BaseModel] = AuditConfig, prefix: str = "") -> dict[str, object]:
    """Every key reachable from ``model`` as a dotted path (``regions[].name``) -> annotation."""
    keys: dict[str, object] = {}
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys[dotted] = field.annotation
        for section in _models_in(field.annotation):
            inner = f"{dotted}[]." if _is_sequence(field.annotation) else f"{dotted}."
            keys.update(config_keys(section, inner))
    return keys


def _literal_choices(annotation) -> list[str]:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(choice) for choice in typing.get_args(annotation)]
    return [c for arg in typing.get_args(annotation) for c in _literal_choices(arg)]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "audit.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- example configs


def test_the_example_configs_are_there():
    names = {path.name for path in CONFIGS}
    expected = {"demo.yaml", "manifest_boxes.yaml", "folders_masks.yaml", "coco.yaml"}
    assert expected | {"tfds_pets.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[path.name for path in CONFIGS])
def test_every_example_config_loads(path):
    config = load_config(path)
    raw = yaml.safe_load(path.read_text())
    # Relative paths start at the config's folder, the store's default too.
    if "path" in raw["model"]:
        assert config.model.path == path.parent / raw["model"]["path"]
    else:  # a scheduled audit: the versions give the model path
        assert config.schedule.models == path.parent / raw["schedule"]["models"]
    assert config.output.store == path.parent / raw.get("output", {}).get("store", "runs")


def test_demo_config_points_at_the_demo_and_keeps_the_default_regions():
    config = load_config(ROOT / "configs" / "demo.yaml")
    configs = ROOT / "configs"
    assert config.model.path == configs / "../demo-runs/demo_model.keras"
    assert config.dataset.manifest == configs / "../demo-runs/audit_data/manifest.csv"
    assert config.output.store == configs / "../runs"
    assert config.regions == DEFAULT_REGIONS


def test_tfds_example_leaves_class_names_out():
    config = load_config(ROOT / "configs" / "tfds_pets.yaml")
    assert config.dataset.tfds == "oxford_iiit_pet" and config.dataset.tfds_split == "test"
    assert config.dataset.mask_key == "segmentation_mask"
    assert config.model.class_names is None


# ---------------------------------------------------------------- docs stay complete


def test_walker_reaches_every_section():
    keys = config_keys()
    for key in ("model.path", "dataset.limit", "regions[].box_from_mask", "metrics.cam_size"):
        assert key in keys
    assert len([key for key in keys if key.startswith("regions[].")]) == len(
        RegionSection.model_fields
    )


def test_config_doc_lists_every_key():
    text = CONFIG_DOC.read_text()
    missing = [key for key in config_keys() if f"`{key}`" not in text]
    assert not missing, f"docs/config.md does not list {missing}"


def test_config_doc_lists_every_built_in_cam_method():
    from audit.engine.registry import built_in_names

    text = CONFIG_DOC.read_text()
    assert all(f"`{name}`" in text for name in built_in_names())


def test_config_doc_lists_every_choice():
    text = CONFIG_DOC.read_text()
    for key, annotation in config_keys().items():
        for choice in _literal_choices(annotation):
            assert choice in text, f"docs/config.md does not mention {key} = {choice}"


# ---------------------------------------------------------------- errors name the key


def test_unknown_key_names_the_key(tmp_path):
    path = _write(tmp_path, "model: {path: m.keras, layr: x}\ndataset: {manifest: d.csv}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "model.layr" in str(error.value) and "unknown key" in str(error.value)
    assert str(path) in str(error.value)


def test_unknown_key_inside_a_region_names_its_index():
    data = {
        "model": {"path": "m.keras"},
        "dataset": {"manifest": "d.csv"},
        "regions": [{"name": "object", "source": "mask", "widht": 3}],
    }
    with pytest.raises(ConfigError, match=r"regions\.0\.widht: unknown key"):
        build_config(data)
    # A key of another source would be ignored: refused too.
    data["regions"] = [{"name": "object", "source": "mask", "width": 3}]
    with pytest.raises(ConfigError, match=r"regions\.0: width applies to regions with source: "):
        build_config(data)
    frame = {"name": "frame", "source": "border", "width": 3, "role": "spurious"}
    data["regions"] = [{"name": "object", "source": "mask"}, frame]
    assert build_config(data).regions[1].width == 3
    # A dumped config (every key, defaults included) loads back.
    dumped = build_config(data).model_dump(mode="json")
    assert build_config(dumped).regions == build_config(data).regions
    # A fixed-length list given too few values names the list, not its missing item.
    with pytest.raises(ConfigError, match=r"preprocess\.size: too few values \(item 1 is"):
        build_config({**data, "preprocess": {"size": [32]}})


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"model": {"path": "m.keras", "method": "magic"}}, "model.method"),
        ({"metrics": {"iou_threshold": 1.5}}, "metrics.iou_threshold"),
        ({"dataset": {"manifest": "d.csv", "limit": 0}}, "dataset.limit"),
        ({"regions": [{"name": "the object", "source": "mask"}]}, "regions.0.name"),
    ],
)
def test_bad_value_names_the_key(change, key):
    data = merge({"model": {"path": "m.keras"}, "dataset": {"manifest": "d.csv"}}, change)
    with pytest.raises(ConfigError) as error:
        build_config(data)
    lines = str(error.value).splitlines()
    assert any(line.strip().startswith(f"{key}:") for line in lines), lines


def test_cross_key_rules_fail():
    with pytest.raises(ConfigError, match="exactly one of manifest, folders, coco or tfds"):
        build_config({"model": {"path": "m"}, "dataset": {"manifest": "a", "folders": "b"}})
    with pytest.raises(ConfigError, match="role: expected"):
        build_config(
            {
                "model": {"path": "m"},
                "dataset": {"manifest": "a"},
                "regions": [{"name": "bg", "source": "background", "role": "spurious"}],
            }
        )


def test_run_exits_2_on_an_unknown_key(tmp_path, capsys):
    path = _write(tmp_path, "model: {path: m.keras, layr: x}\ndataset: {manifest: d.csv}\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.layr" in err and "unknown key" in err


# ---------------------------------------------------------------- overrides and paths


def test_overrides_merge_nested_keys_and_win(tmp_path):
    path = _write(
        tmp_path,
        "model: {path: m.keras, method: hirescam, layer: conv1}\n"
        "dataset: {manifest: data/d.csv, limit: 10}\n"
        "batch_size: 16\n",
    )
    overrides = {"model": {"layer": "conv2"}, "dataset": {"limit": 5}, "batch_size": 8}
    config = load_config(path, overrides)
    assert config.model.layer == "conv2" and config.model.method == "hirescam"
    assert config.dataset.limit == 5 and config.dataset.manifest == tmp_path / "data/d.csv"
    assert config.batch_size == 8
    assert config.model.path == tmp_path / "m.keras"


def test_merge_replaces_lists_and_leaves_its_inputs_alone():
    base = {"model": {"path": "a"}, "regions": [{"name": "x"}, {"name": "y"}]}
    merged = merge(base, {"model": {"layer": "l"}, "regions": [{"name": "z"}]})
    assert merged == {"model": {"path": "a", "layer": "l"}, "regions": [{"name": "z"}]}
    assert base == {"model": {"path": "a"}, "regions": [{"name": "x"}, {"name": "y"}]}


def test_relative_paths_start_at_the_config_folder(tmp_path):
    path = _write(tmp_path, "model: {path: m.keras}\ndataset: {tfds: mnist}\n")
    config = load_config(path)
    assert config.model.path == tmp_path / "m.keras"
    assert config.dataset.tfds == "mnist"  # a name, not a path
    assert config.output.store == tmp_path / "runs"  # the default store too


def test_absolute_paths_stay_as_they_are(tmp_path):
    path = _write(tmp_path, "model: {path: /abs/m.keras}\ndataset: {manifest: /abs/d.csv}\n")
    config = load_config(path, {"output": {"store": "/abs/runs"}})
    assert config.model.path == Path("/abs/m.keras")
    assert config.dataset.manifest == Path("/abs/d.csv")
    assert config.output.store == Path("/abs/runs")


# ---------------------------------------------------------------- values that would break a run


@pytest.mark.parametrize(
    ("change", "key", "fragment"),
    [
        ({"preprocess": {"size": [0, 0]}}, "preprocess.size", "at least 1 pixel, got [0, 0]"),
        ({"preprocess": {"size": [-1, 48]}}, "preprocess.size", "at least 1 pixel"),
        ({"preprocess": {"std": [0, 0, 0]}}, "preprocess.std", "no channel may be 0"),
        ({"preprocess": {"std": [0.2, 0, 0.2]}}, "preprocess.std", "no channel may be 0"),
        ({"preprocess": {"scale": 0}}, "preprocess.scale", "black"),
        ({"preprocess": {"mean": [0.5, float("nan"), 0.5]}}, "preprocess.mean.1", "finite"),
        (
            {"model": {"path": "m.keras", "class_names": ["cat", "dog", "cat"]}},
            "model.class_names",
            "'cat' listed more than once",
        ),
        ({"output": {"run_id": "../escape"}}, "output.run_id", "not a plain folder name"),
        ({"output": {"run_id": "a/b"}}, "output.run_id", "not a plain folder name"),
        ({"output": {"run_id": "a\\b"}}, "output.run_id", "not a plain folder name"),
        ({"output": {"run_id": ".."}}, "output.run_id", "not a plain folder name"),
        ({"output": {"run_id": "."}}, "output.run_id", "not a plain folder name"),
        (
            {"regions": [{"name": "a", "source": "mask"}, {"name": "a", "source": "box"}]},
            "regions",
            "region names must be unique",
        ),
        (
            {"regions": [{"name": "bg", "source": "background", "role": "spurious"}]},
            "regions",
            "at least one region needs role: expected",
        ),
    ],
)
def test_values_that_would_break_a_run_fail_validation(change, key, fragment):
    data = merge({"model": {"path": "m.keras"}, "dataset": {"manifest": "d.csv"}}, change)
    with pytest.raises(ConfigError) as error:
        build_config(data)
    lines = str(error.value).splitlines()
    assert any(line.strip().startswith(f"{key}: ") and fragment in line for line in lines), lines
    assert "Value error" not in str(error.value)  # pydantic's prefix is not the user's business


def test_good_values_near_the_limits_pass():
    config = build_config(
        {
            "model": {"path": "m.keras", "class_names": ["cat", "dog"], "target": True},
            "dataset": {"manifest": "d.csv"},
            "preprocess": {"size": [1, 1], "std": [-0.5, 0.25, 1e-3]},
            "output": {"run_id": "products-v2.1"},
        }
    )
    assert config.preprocess.size == (1, 1) and config.output.run_id == "products-v2.1"
    assert config.model.target == "true"  # YAML's unquoted `true` means the true label


def test_a_tilde_in_a_config_path_is_the_home_folder(tmp_path):
    path = _write(tmp_path, "model: {path: ~/m.keras}\ndataset: {manifest: ~/data/d.csv}\n")
    config = load_config(path)
    assert config.model.path == Path.home() / "m.keras"
    assert config.dataset.manifest == Path.home() / "data" / "d.csv"


def test_run_exits_2_on_a_zero_size_and_leaves_no_run_folder(tmp_path, capsys):
    path = _write(
        tmp_path,
        "model: {path: m.keras}\ndataset: {manifest: d.csv}\npreprocess: {size: [0, 0]}\n",
    )
    assert main(["run", str(path)]) == 2
    assert "preprocess.size: height and width must be at least 1 pixel" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_fingerprint_covers_settings_not_where_the_files_are(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")

    def fingerprint(model, manifest, **settings):
        data = {"model": {"path": model}, "dataset": {"manifest": manifest}, **settings}
        return build_config(data).fingerprint()

    same = fingerprint(str(tmp_path / "m.keras"), str(tmp_path / "d.csv"))
    assert fingerprint("../m.keras", "../sub/../d.csv") == same
    # The run key has the model file's hash and the dataset's rows and files.
    assert fingerprint("/elsewhere/other.keras", "/moved/d.csv") == same
    assert fingerprint("../m.keras", "../d.csv", output={"run_id": "r", "store": "s"}) == same
    assert fingerprint("../m.keras", "../d.csv", batch_size=8) != same
    folders = build_config({"model": {"path": "m.keras"}, "dataset": {"folders": "d.csv"}})
    assert folders.fingerprint() != same  # another kind of source


def test_a_schedule_needs_no_model_section_and_an_audit_says_what_it_lacks():
    schedule = build_config({"dataset": {"manifest": "d.csv"}, "schedule": {"models": "m"}})
    assert schedule.model.path is None
    with pytest.raises(ConfigError, match="model.path is required"):
        build_config({"dataset": {"manifest": "d.csv"}})


def test_a_number_key_takes_a_number_not_a_bool_or_text():
    base = {"model": {"path": "m.keras"}, "dataset": {"manifest": "d.csv"}}
    with pytest.raises(ConfigError, match="batch_size: true is a yes/no value, not a number"):
        build_config({**base, "batch_size": True})
    with pytest.raises(ConfigError, match="policy.alpha: '0.1' is text, not a number"):
        build_config({**base, "policy": {"alpha": "0.1"}})
    # Optional numbers and lists of numbers too (limit: yes would audit one image).
    with pytest.raises(ConfigError, match="dataset.limit: true is a yes/no value"):
        build_config({**base, "dataset": {"manifest": "d.csv", "limit": True}})
    with pytest.raises(ConfigError, match=r"preprocess.size: in \['24', '24'\]: '24' is text"):
        build_config({**base, "preprocess": {"size": ["24", "24"]}})
    assert build_config({**base, "batch_size": 16, "policy": {"gap_floor": 0}}).batch_size == 16
