"""The typed config: defaults, YAML + --set overrides, and one clear error per bad value."""

import pytest

from study.config import StudyConfig, load_config, parse_overrides, validate
from trainables.errors import ConfigError

from .conftest import ROOT

QUICKSTART = ROOT / "configs" / "quickstart.yaml"
CIFAR100 = ROOT / "configs" / "cifar100.yaml"


def error_for(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, list(overrides))
    message = str(info.value)
    assert "\n" not in message, "a config error is one line"
    return message


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert isinstance(load_config(path), StudyConfig), path


def test_cifar100_config_is_the_papers_table2_setup():
    cfg = load_config(CIFAR100)
    assert cfg.data.name == "cifar100" and cfg.num_classes == 100
    assert cfg.model.variant == "cifar" and cfg.model.width == 1.0
    t = cfg.train
    assert (t.batch_size, t.lr, t.momentum, t.weight_decay, t.t_max, t.epochs) == (128, 1e-2, 0.9, 5e-4, 200, 150)


def test_quickstart_is_offline_small_and_cpu():
    cfg = load_config(QUICKSTART)
    assert cfg.data.name == "shapes" and cfg.model.width < 1 and not cfg.train.use_gpu


def test_overrides_parse_as_yaml_values():
    cfg = load_config(
        QUICKSTART,
        [
            "regularization.focused_dropout.par_rate=0.25",
            "regularization.focused_dropout.gamma=[0.3, 0.6]",
            "regularization.gradient_penalty.lambda=0.1",
            "train.use_gpu=false",
            "tracking.experiment=abc",
        ],
    )
    assert cfg.regularization.focused_dropout.par_rate == 0.25
    assert cfg.regularization.focused_dropout.gamma == (0.3, 0.6)
    assert cfg.regularization.gradient_penalty.lam == 0.1
    assert cfg.tracking.experiment == "abc"


def test_dump_round_trips_through_validation():
    cfg = load_config(QUICKSTART, ["regularization.gradient_penalty.lambda=0.5"])
    again = validate(cfg.dump())
    assert again == cfg
    assert cfg.dump()["regularization"]["gradient_penalty"]["lambda"] == 0.5


def test_num_classes_defaults_to_the_dataset():
    assert load_config(QUICKSTART).num_classes == 20
    assert load_config(QUICKSTART, ["model.num_classes=7"]).num_classes == 7


@pytest.mark.parametrize("value", ["-0.1", "2", "1.01"])
def test_par_rate_outside_unit_interval_is_refused(value):
    msg = error_for(f"regularization.focused_dropout.par_rate={value}")
    assert "regularization.focused_dropout.par_rate" in msg and "[0, 1]" in msg


def test_negative_lambda_is_refused():
    msg = error_for("regularization.gradient_penalty.lambda=-0.5")
    assert "regularization.gradient_penalty.lambda" in msg and ">= 0" in msg


@pytest.mark.parametrize("gamma", ["[0.9, 0.6]", "[0, 0.5]", "[0.5, 1.0]", "[-0.1, 0.2]"])
def test_gamma_must_satisfy_0_lt_lo_le_hi_lt_1(gamma):
    msg = error_for(f"regularization.focused_dropout.gamma={gamma}")
    assert "regularization.focused_dropout.gamma" in msg and "0 < lo <= hi < 1" in msg


def test_equal_gamma_bounds_are_allowed():
    assert load_config(QUICKSTART, ["regularization.focused_dropout.gamma=[0.7, 0.7]"])


@pytest.mark.parametrize("width", ["0", "-1"])
def test_width_must_be_positive(width):
    msg = error_for(f"model.width={width}")
    assert "model.width" in msg and "(0," in msg


def test_epochs_below_one_is_refused():
    msg = error_for("train.epochs=0")
    assert "train.epochs" in msg and ">= 1" in msg


def test_unknown_key_suggests_the_close_match():
    msg = error_for("train.epoch=3")
    assert "unknown key 'train.epoch'" in msg and "did you mean 'epochs'" in msg


def test_unknown_section_is_refused():
    msg = error_for("trian.epochs=3")
    assert "unknown key 'trian'" in msg and "did you mean 'train'" in msg


@pytest.mark.parametrize(
    "override, path",
    [
        ("ablation.layer=conv5_4", "ablation.layer"),
        ("dissection.layer=conv6_1", "dissection.layer"),
        ("regularization.focused_dropout.site=pool9", "regularization.focused_dropout.site"),
    ],
)
def test_unknown_layer_name_is_refused_with_the_valid_names(override, path):
    msg = error_for(override)
    assert path in msg and "conv5_3" in msg and "valid names" in msg


def test_bn_layer_names_depend_on_batch_norm():
    assert load_config(QUICKSTART, ["ablation.layer=bn5_3"]).ablation.layer == "bn5_3"
    msg = error_for("model.batch_norm=false", "ablation.layer=bn5_3")
    assert "ablation.layer" in msg


def test_cifar_variant_needs_32px():
    msg = error_for("data.image_size=64")
    assert "32 px" in msg


def test_literal_choices_are_listed():
    msg = error_for("data.name=cifar10")
    assert "data.name" in msg and "cifar100" in msg


@pytest.mark.parametrize(
    "space, needle",
    [
        ("{regularization.dropout.rat: {type: uniform, low: 0, high: 1}}", "did you mean 'regularization.dropout.rate'"),
        ("{regularization.dropout.rate: {type: uniform, low: 0.5, high: 0.1}}", "must not exceed"),
        ("{regularization.gradient_penalty.lambda: {type: loguniform, low: 0, high: 1}}", "low > 0"),
        ("{regularization.gradient_penalty.method: {type: uniform, low: 0, high: 1}}", "not numeric"),
        ("{train: {type: choice, values: [1]}}", "whole section"),
        ("{train.epochs: {type: choice, values: []}}", "non-empty"),
    ],
)
def test_bad_search_spaces_are_refused(space, needle):
    assert needle in error_for(f"sweep.space={space}")


def test_set_without_equals_is_refused():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(QUICKSTART, ["train.epochs"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_cli_config_show_prints_the_resolved_config(run_study):
    out = run_study("config", "show", "--config", str(CIFAR100))
    assert out.returncode == 0, out.stderr
    assert "lr: 0.01" in out.stdout and "t_max: 200" in out.stdout and "epochs: 150" in out.stdout


def test_cli_bad_value_exits_2_with_one_line(run_study):
    out = run_study("config", "show", "--config", str(QUICKSTART), "--set", "regularization.focused_dropout.par_rate=2")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "par_rate" in lines[0] and "Traceback" not in out.stderr
    assert out.stdout == ""


def _leaf_paths(model, prefix=""):
    from pydantic import BaseModel

    for name, info in model.model_fields.items():
        key = f"{prefix}{info.alias or name}"
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _leaf_paths(ann, key + ".")
        else:
            yield key


def test_text_fields_receive_what_was_typed_not_yaml_1_1_booleans_or_numbers():
    """YAML 1.1 reads off/on/yes/no as booleans and 1.0e-3 as a float; a text field must get the text."""
    from study.config import text_field

    text_fields = [p for p in _leaf_paths(StudyConfig) if text_field(p.split("."))[0]]
    assert {"train.amp", "data.root", "data.name", "model.variant", "regularization.gradient_penalty.method",
            "tracking.experiment", "tracking.mlflow_uri", "ray.address", "ray.storage_path", "sweep.scheduler",
            "ablation.layer", "dissection.concepts", "dissection.threshold_on"} <= set(text_fields)
    for path in text_fields:
        for typed in ("off", "on", "yes", "no", "y", "true", "1.0e-3", "007", "0x10"):
            ((_, value),) = parse_overrides([f"{path}={typed}"])
            assert value == typed and isinstance(value, str), (path, typed, value)
        ((_, quoted),) = parse_overrides([f"{path}='null'"])
        assert quoted == "null"
    assert load_config(QUICKSTART, ["train.amp=off"]).train.amp == "off", "the documented value is accepted"
    assert load_config(QUICKSTART, ["tracking.experiment=1.0e-3"]).tracking.experiment == "1.0e-3"
    assert load_config(QUICKSTART, ["data.root=007"]).data.root.endswith("007")
    assert load_config(QUICKSTART, ["ray.address=null"]).ray.address is None
    with pytest.raises(ConfigError, match="data.name = 'yes' is not allowed"):
        load_config(QUICKSTART, ["data.name=yes"])
    # other fields still parse as YAML
    cfg = load_config(QUICKSTART, ["train.use_gpu=off", "train.lr=1.0e-3", "sweep.space={}", "sweep.seeds=[1, 2]"])
    assert cfg.train.use_gpu is False and cfg.train.lr == 1e-3 and cfg.sweep.seeds == [1, 2]
