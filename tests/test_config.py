"""Config loading, validation, `--set` overrides and round-trips (`cnncli/config.py`).

Expected values come from the shipped YAML files (read with PyYAML directly) or from the test's own input;
error tests check that the message names the key path and the offending value.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from cnncli.config import (
    AdamConfig,
    Config,
    SGDConfig,
    apply_overrides,
    build_config,
    config_from_json,
    config_to_dict,
    config_to_yaml,
    load_config,
)
from cnncli.host.errors import CnnError, ConfigError
from cnncli.nn.layers import Conv2D, Flatten, Linear, MaxPool2D, ReLU
from cnncli.nn.model import build_model

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "configs" / "seed.yaml"
DIAGRAM = ROOT / "configs" / "seed-diagram.yaml"
SHIPPED = [SEED, DIAGRAM]

SPEC_CLASSES = {
    "conv": Conv2D.Options,
    "relu": ReLU.Options,
    "maxpool": MaxPool2D.Options,
    "flatten": Flatten.Options,
    "linear": Linear.Options,
}

MINIMAL_LAYERS = [{"type": "flatten"}, {"type": "linear", "out_features": 10}]


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _write(tmp_path: Path, raw: object, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return p


def _error(raw: object) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    return str(info.value)


# --------------------------------------------------------------------------------------- loading the files


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load_with_every_value_from_the_file(path: Path) -> None:
    raw = _raw(path)
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.name == path.stem
    assert cfg.seed == raw["seed"]
    assert cfg.model.input_shape == tuple(raw["model"]["input_shape"])
    assert len(cfg.model.layers) == len(raw["model"]["layers"])
    for spec, layer_raw in zip(cfg.model.layers, raw["model"]["layers"], strict=True):
        assert type(spec) is SPEC_CLASSES[layer_raw["type"]]
        for key, value in layer_raw.items():
            assert getattr(spec, key) == value, (key, spec)
    d = raw["data"]
    assert cfg.data.val_size == d["val_size"]
    assert cfg.data.normalize.mean == pytest.approx(tuple(d["normalize"]["mean"]))
    assert cfg.data.normalize.std == pytest.approx(tuple(d["normalize"]["std"]))
    assert cfg.data.augment.flip is d["augment"]["flip"]
    assert cfg.data.augment.crop_padding == d["augment"]["crop_padding"]
    t = raw["train"]
    assert cfg.train.epochs == t["epochs"]
    assert cfg.train.batch_size == t["batch_size"]
    assert isinstance(cfg.train.optimizer, SGDConfig)
    for key, value in t["optimizer"].items():
        assert getattr(cfg.train.optimizer, key) == value
    assert cfg.train.schedule.type == t["schedule"]["type"]
    assert cfg.train.schedule.warmup_epochs == t["schedule"]["warmup_epochs"]


def test_omitted_keys_take_defaults_and_values_are_converted(tmp_path: Path) -> None:
    raw = {"model": {"layers": [{"type": "conv"}, {"type": "maxpool"}, *MINIMAL_LAYERS]}, "train": {"epochs": 2}}
    cfg = load_config(_write(tmp_path, raw, "tiny.yaml"))
    assert cfg.name == "tiny"
    conv, pool = cfg.model.layers[0], cfg.model.layers[1]
    assert conv.name is None  # the model fills in conv1, ...
    assert pool.stride is None  # the model uses the kernel size
    assert cfg.train.epochs == 2
    assert cfg.data.limit is None
    # lists become tuples, so the config is hashable and immutable
    assert isinstance(cfg.model.input_shape, tuple)
    assert isinstance(cfg.model.layers, tuple)
    hash(cfg)
    with pytest.raises(AttributeError):
        cfg.seed = 3  # type: ignore[misc]


def test_integers_are_accepted_for_floats_and_integral_floats_for_integers() -> None:
    raw = {"model": {"layers": MINIMAL_LAYERS}, "train": {"optimizer": {"type": "adam", "lr": 1}, "epochs": 3.0}}
    cfg = build_config(raw)
    assert isinstance(cfg.train.optimizer, AdamConfig)
    assert cfg.train.optimizer.lr == 1.0 and isinstance(cfg.train.optimizer.lr, float)
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)


# -------------------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("layer", "key", "shown"),
    [
        ({"type": "conv", "kernel_size": "3"}, "kernel_size", '"3"'),
        ({"type": "conv", "stride": 1.5}, "stride", "1.5"),
        ({"type": "conv", "out_channels": True}, "out_channels", "true"),  # as YAML writes it
        ({"type": "conv", "padding": [1]}, "padding", "[1]"),
    ],
)
def test_wrong_types_name_the_key_path_and_the_value(layer: dict, key: str, shown: str) -> None:
    msg = _error({"model": {"layers": [layer, *MINIMAL_LAYERS]}})
    assert f"model.layers[0].{key}" in msg
    assert shown in msg


@pytest.mark.parametrize(
    ("raw", "path", "value"),
    [
        ({"model": {"layers": [{"type": "conv", "out_channels": 0}, *MINIMAL_LAYERS]}}, "model.layers[0].out_channels",
         "0"),
        ({"model": {"layers": [{"type": "conv", "kernel_size": -2}, *MINIMAL_LAYERS]}}, "model.layers[0].kernel_size",
         "-2"),
        ({"model": {"layers": [{"type": "conv", "padding": -1}, *MINIMAL_LAYERS]}}, "model.layers[0].padding", "-1"),
        ({"model": {"input_shape": [3, 0, 32], "layers": MINIMAL_LAYERS}}, "model.input_shape[1]", "0"),
        ({"model": {"layers": MINIMAL_LAYERS}, "train": {"optimizer": {"type": "sgd", "lr": 0}}},
         "train.optimizer.lr", "0"),
        ({"model": {"layers": MINIMAL_LAYERS}, "train": {"optimizer": {"type": "sgd", "momentum": 1.0}}},
         "train.optimizer.momentum", "1.0"),
        ({"model": {"layers": MINIMAL_LAYERS}, "data": {"val_size": -5}}, "data.val_size", "-5"),
        ({"model": {"layers": MINIMAL_LAYERS}, "seed": -1}, "seed", "-1"),
    ],
)
def test_out_of_range_values_name_the_key_path_and_the_value(raw: dict, path: str, value: str) -> None:
    msg = _error(raw)
    assert msg.startswith(path + ":") or f" {path}:" in msg
    assert re.search(rf"(?<![\d.]){re.escape(value)}(?![\d.])", msg.split(path, 1)[1]), msg


def test_wrong_list_length_and_bad_choice_and_non_finite() -> None:
    msg = _error({"model": {"input_shape": [3, 32], "layers": MINIMAL_LAYERS}})
    assert "model.input_shape" in msg and "3" in msg
    msg = _error({"model": {"layers": MINIMAL_LAYERS}, "train": {"schedule": {"type": "linear"}}})
    assert "train.schedule.type" in msg and '"linear"' in msg
    msg = _error({"model": {"layers": MINIMAL_LAYERS}, "train": {"optimizer": {"type": "adam", "lr": float("nan")}}})
    assert "train.optimizer.lr" in msg and "nan" in msg


def test_unknown_key_names_its_full_path_and_suggests_the_nearest_key() -> None:
    raw = _raw(SEED)
    raw["model"]["layers"][2]["kernal_size"] = raw["model"]["layers"][2].pop("kernel_size")
    msg = _error(raw)
    assert "model.layers[2].kernal_size" in msg
    assert re.search(r"did you mean\W+(model\.layers\[2\]\.)?kernel_size\b", msg), msg


def test_unknown_top_level_key_suggests_the_nearest_key() -> None:
    raw = _raw(SEED)
    raw["trian"] = raw.pop("train")
    msg = _error(raw)
    assert "trian" in msg
    assert re.search(r"did you mean\W+train\b", msg), msg


def test_unknown_layer_type_names_it_and_suggests_a_known_one() -> None:
    msg = _error({"model": {"layers": [{"type": "conv3d"}, *MINIMAL_LAYERS]}})
    assert "model.layers[0]" in msg
    assert "conv3d" in msg
    assert re.search(r"did you mean\W+conv\b", msg), msg


def test_layer_without_type_and_missing_or_empty_layers() -> None:
    assert "model.layers[0]" in _error({"model": {"layers": [{"out_channels": 4}, *MINIMAL_LAYERS]}})
    assert "model.layers" in _error({"model": {"input_shape": [3, 32, 32]}})
    assert "model.layers" in _error({"model": {"layers": []}})
    assert "model.layers" in _error(None)
    assert "top level" in _error([1, 2, 3]) or "mapping" in _error([1, 2, 3])


def test_config_error_is_a_cnn_error() -> None:
    assert issubclass(ConfigError, CnnError)


# ------------------------------------------------------------------------------------------- file errors


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


def test_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_undecodable_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"seed: \xff\xfe\x00\x81\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("seed: 0\nmodel:\n\tinput_shape: [3, 32, 32]\n", 3),  # a tab cannot start a token
        ("seed: 0\nmodel:\n  input_shape: [3, 32, 32]\n  layers:\n    - {type: flatten}\n"
         "    - {type: linear}\ndata:\n  val_size: 10\n   limit: 5\n", 9),  # bad indentation
    ],
)
def test_invalid_yaml_names_the_file_and_the_line(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg
    assert re.search(rf"line {line}\b", msg), msg


def test_value_errors_from_a_file_name_the_file(tmp_path: Path) -> None:
    raw = _raw(SEED)
    raw["model"]["layers"][0]["out_channels"] = 0
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "model.layers[0].out_channels" in str(info.value)


# -------------------------------------------------------------------------------------------- overrides


def test_overrides_change_the_named_values_only() -> None:
    base = load_config(SEED)
    cfg = load_config(SEED, ["data.limit=3000", "data.val_size=500"])
    assert cfg.data.limit == 3000
    assert cfg.data.val_size == 500
    assert cfg.model == base.model
    assert cfg.train == base.train
    assert cfg.data.normalize == base.data.normalize


def test_override_values_are_parsed_as_yaml() -> None:
    cfg = load_config(
        SEED,
        ["train.optimizer.lr=0.05", "data.augment.flip=false", "data.normalize.mean=[0.5, 0.5, 0.5]", "seed=7"],
    )
    assert cfg.train.optimizer.lr == 0.05
    assert cfg.data.augment.flip is False
    assert cfg.data.normalize.mean == (0.5, 0.5, 0.5)
    assert cfg.seed == 7


def test_override_can_switch_a_tagged_union() -> None:
    cfg = load_config(SEED, ["train.optimizer={type: adam, lr: 0.002}"])
    assert isinstance(cfg.train.optimizer, AdamConfig)
    assert cfg.train.optimizer.lr == 0.002


def test_index_override_changes_the_built_model() -> None:
    cfg = load_config(SEED, ["model.layers[0].out_channels=8"])
    assert cfg.model.layers[0].out_channels == 8
    params = build_model(cfg.model, seed=0).named_params()
    _, h, w = cfg.model.input_shape
    assert params["conv1.W"].shape == (8, 3, 3, 3)
    assert params["conv1.b"].shape == (8,)
    # conv pad 1 keeps h×w, the 2×2 pool halves it: fc1 sees 8·(h/2)·(w/2) features
    assert params["fc1.W"].shape == (10, 8 * (h // 2) * (w // 2))


def test_negative_index_override_addresses_the_last_layer() -> None:
    cfg = load_config(SEED, ["model.layers[-1].out_features=7"])
    assert cfg.model.layers[-1].out_features == 7


def test_override_to_an_unknown_key_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SEED, ["data.limt=3000"])
    msg = str(info.value)
    assert "data.limt" in msg
    assert re.search(r"did you mean\W+(data\.)?limit\b", msg), msg


def test_override_to_an_unknown_index_key_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SEED, ["model.layers[2].kernal_size=3"])
    assert "model.layers[2].kernal_size" in str(info.value)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data.val_size=-1", "data.val_size"),
        ("model.layers[0].out_channels=0", "model.layers[0].out_channels"),
        ("model.layers[0].kernel_size='3'", "model.layers[0].kernel_size"),
        ("train.epochs=1.5", "train.epochs"),
    ],
)
def test_override_values_are_validated_like_the_file(override: str, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SEED, [override])
    assert named in str(info.value)
    assert override.split("=", 1)[1].strip("'") in str(info.value)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("model.layers[9].out_channels=8", "model.layers[9].out_channels"),  # no such layer
        ("no_equals_sign", "no_equals_sign"),
        ("=3", "=3"),
        ("model.layers[x].out_channels=1", "model.layers[x].out_channels"),
        ("seed=[1,", "[1,"),
    ],
)
def test_malformed_overrides_are_config_errors_naming_them(override: str, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SEED, [override])
    assert named in str(info.value)


def test_apply_overrides_does_not_mutate_its_input() -> None:
    raw = _raw(SEED)
    before = json.dumps(raw, sort_keys=True)
    out = apply_overrides(raw, ["data.val_size=1", "model.layers[0].padding=0"])
    assert json.dumps(raw, sort_keys=True) == before
    assert out["data"]["val_size"] == 1
    assert out["model"]["layers"][0]["padding"] == 0


def test_override_on_a_file_with_a_yaml_timestamp_gives_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "dated.yaml"
    path.write_text("seed: 2024-01-01\nmodel:\n  layers: [{type: flatten}, {type: linear}]\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.epochs=1"])  # what `cnn train --epochs 1` does
    assert "seed" in str(info.value)


# ------------------------------------------------------------------------------------------- round trips


def _variant() -> Config:
    raw = _raw(DIAGRAM)
    raw["data"].update({"limit": 3000, "dir": "/tmp/x", "url": "http://example.invalid/c.tgz"})
    raw["train"]["optimizer"] = {"type": "adam", "lr": 0.002, "betas": [0.8, 0.99], "weight_decay": 1e-4}
    raw["train"]["schedule"] = {"type": "step", "step_size": 3, "gamma": 0.5}
    raw["model"]["layers"].insert(2, {"type": "maxpool", "kernel_size": 3, "stride": 1})
    return build_config(raw, name="variant")


@pytest.fixture(params=["seed", "diagram", "variant"])
def any_config(request: pytest.FixtureRequest) -> Config:
    return {"seed": lambda: load_config(SEED), "diagram": lambda: load_config(DIAGRAM), "variant": _variant}[
        request.param
    ]()


def test_yaml_round_trip_gives_an_equal_config(any_config: Config) -> None:
    text = config_to_yaml(any_config)
    back = build_config(yaml.safe_load(text))
    assert back == any_config


def test_dict_round_trip_is_plain_data_and_gives_an_equal_config(any_config: Config) -> None:
    d = config_to_dict(any_config)
    text = json.dumps(d)  # plain JSON-ready data: no tuples or dataclasses left
    assert json.loads(text) == d
    assert build_config(json.loads(text)) == any_config


def test_round_trip_through_a_file_keeps_the_config(tmp_path: Path, any_config: Config) -> None:
    path = tmp_path / f"{any_config.name}.yaml"
    path.write_text(config_to_yaml(any_config), encoding="utf-8")
    assert load_config(path) == any_config


def test_config_from_json_round_trip(any_config: Config) -> None:
    assert config_from_json(json.dumps(config_to_dict(any_config)), "run/best.npz") == any_config


@pytest.mark.parametrize("text", ["{not json", "", '{"seed": 0,}'])
def test_config_from_json_with_bad_json_names_the_source(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_json(text, "runs/x/best.npz")
    assert "runs/x/best.npz" in str(info.value)


def test_config_from_json_with_a_bad_value_names_the_source_and_the_key() -> None:
    d = config_to_dict(load_config(SEED))
    d["model"]["layers"][0]["stride"] = 0
    with pytest.raises(ConfigError) as info:
        config_from_json(json.dumps(d), "runs/x/last.npz")
    assert "runs/x/last.npz" in str(info.value)
    assert "model.layers[0].stride" in str(info.value)


def test_changed_config_is_not_equal() -> None:
    a = load_config(SEED)
    b = load_config(SEED, ["model.layers[0].out_channels=8"])
    assert a != b
    assert build_model(b.model).named_params()["conv1.W"].shape != build_model(a.model).named_params()["conv1.W"].shape
