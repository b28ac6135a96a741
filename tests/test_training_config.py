"""bame_apps.integrations.training's config and command line: every invalid field of
TrainingConfig raises a ValueError naming the field and the value, the command line turns each
into an exit (status 2) naming the flag, defaults that depend on other flags are filled in, and
resume targets are checked before anything is built."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("accelerate")

from bame_apps.integrations.models import MODELS
from bame_apps.integrations.training import (
    ConfigError,
    ScriptConfig,
    TrainingConfig,
    build_parser,
    parse_config,
)
from bame_apps.integrations.training.cli import flag_of
from bame_apps.integrations.training.config import (
    RUN_DEFINING,
    SECTIONS,
    InputConfig,
    NetworkConfig,
    OptimConfig,
    config_dict,
)
from bame_apps.integrations.training.options import option_of
from bame_apps.integrations.training.resume import check_resume_compatible, resolve_resume

SCRIPT = ScriptConfig(
    name="train_test",
    description="test script",
    models=("small_cnn", "resnet32", "deit_small"),
    default_model="small_cnn",
    default_epochs={"deit_small": 7, "*": 3},
    default_preset="cifar10",
    default_weight_decay=1e-4,
)

# (field, bad value, flag value as typed, what the message says of the value)
BAD = [
    ("data", "", "", "''"),
    ("model", "lenet", None, "'lenet'"),
    ("method", "sgd", None, "'sgd'"),
    ("data_kind", "csv", None, "'csv'"),
    ("preset", "svhn", None, "'svhn'"),
    ("mixed_precision", "fp8", None, "'fp8'"),
    ("report_to", "neptune", None, "'neptune'"),
    ("m", 1, "1", "1"),
    ("n", 4, "4", "4"),
    ("n", 0, "0", "0"),
    ("epochs", 0, "0", "0"),
    ("batch_size", -3, "-3", "-3"),
    ("grad_accum", 0, "0", "0"),
    ("delta_t", 0, "0", "0"),
    ("vit_depth", 0, "0", "0"),
    ("vit_width", 32, "32", "32"),
    ("vit_width", 100, "100", "100"),
    ("vit_patch", 0, "0", "0"),
    ("optimizer", "adam", None, "'adam'"),
    ("eps", 0.0, None, "0.0"),
    ("betas", (0.9, 1.0), None, "(0.9, 1.0)"),
    ("image_size", 0, "0", "0"),
    ("max_train_samples", 0, "0", "0"),
    ("max_eval_samples", -1, "-1", "-1"),
    ("workers", -1, "-1", "-1"),
    ("seed", -1, "-1", "-1"),
    ("checkpoint_every", -1, "-1", "-1"),
    ("keep_checkpoints", 0, "0", "0"),
    ("eval_every", 0, "0", "0"),
    ("lr", 0.0, "0", "0.0"),
    ("lr", math.nan, "nan", "nan"),
    ("lr", math.inf, "inf", "inf"),
    ("momentum", 1.0, "1", "1.0"),
    ("momentum", -0.1, "-0.1", "-0.1"),
    ("weight_decay", -1e-4, "-1e-4", "-0.0001"),
    ("label_smoothing", 1.0, "1", "1.0"),
    ("warmup_epochs", -1.0, "-1", "-1.0"),
    ("alpha", 2.0, "2", "2.0"),
    ("beta", -0.5, "-0.5", "-0.5"),
    ("train_split", "", "", "''"),
]


def _config(tmp_path: Path, **fields) -> TrainingConfig:
    return TrainingConfig.build(**{"data": "data", "output_dir": tmp_path / "out", **fields})


def _exit_message(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv, SCRIPT)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("field, value, typed, shown", BAD)
def test_each_bad_field_raises_a_value_error_naming_it(tmp_path, field, value, typed, shown):
    with pytest.raises(ValueError, match=rf"^Invalid {field} value: ") as info:
        _config(tmp_path, **{field: value})
    assert isinstance(info.value, ConfigError) and info.value.field == field
    assert str(info.value).startswith(f"Invalid {field} value: {shown} (")


@pytest.mark.parametrize("field, value, typed, shown", [b for b in BAD if b[2] is not None])
def test_the_command_line_exits_naming_the_flag(tmp_path, capsys, field, value, typed, shown):
    # the bad flag comes last: it overrides the valid --data given first
    argv = ["--data", "data", "--output-dir", str(tmp_path), f"{flag_of(field)}={typed}"]
    err = _exit_message(capsys, argv)
    assert f"argument {flag_of(field)}: invalid value {shown} (" in err, err


@pytest.mark.parametrize(
    "fields, field, reason",
    [
        ({"method": "lma", "alpha": 0.3}, "alpha", "method lma fixes alpha=0.0"),
        ({"method": "srste", "beta": 0.3}, "beta", "method srste does not use beta"),
        ({"method": "static", "alpha": 0.3}, "alpha", "method static has no evolve phase"),
        ({"method": "dense", "alpha": 0.5}, "alpha", "method dense does not use alpha"),
        ({"method": "rigl", "optimizer": "adamw"}, "optimizer", "rigl has no adamw variant"),
        ({"method": "dense", "optimizer": "adamw", "beta": 0.5}, "beta",
         "method dense_adamw does not use beta"),
        ({"method": "bame_adamw"}, "method", "one of dense, static"),
        ({"epochs": 5, "warmup_epochs": 5.0}, "warmup_epochs", "< 5"),
        ({"model": "deit_small", "image_size": 40}, "image_size", "patch size 16"),
        ({"epochs": True}, "epochs", "an integer >= 1"),
        ({"lr": "0.1"}, "lr", "a finite number > 0"),
        ({"exclude": (1, 2)}, "exclude", "module-name patterns"),
        ({"progress": "yes"}, "progress", "True or False"),
    ],
)
def test_cross_field_and_type_checks(tmp_path, fields, field, reason):
    with pytest.raises(ConfigError, match=rf"^Invalid {field} value: ") as info:
        _config(tmp_path, **fields)
    assert info.value.field == field and reason in info.value.reason


def test_cross_field_errors_on_the_command_line(tmp_path, capsys):
    out = ["--data", "d", "--output-dir", str(tmp_path)]
    err = _exit_message(capsys, [*out, "--method", "lma", "--alpha", "0.3"])
    assert "argument --alpha: invalid value 0.3 (method lma fixes alpha=0.0)" in err
    err = _exit_message(capsys, [*out, "--epochs", "5", "--warmup-epochs", "5"])
    assert "argument --warmup-epochs: invalid value 5.0" in err
    err = _exit_message(capsys, [*out, "--model", "deit_small", "--image-size", "40"])
    assert "argument --image-size: invalid value 40" in err
    err = _exit_message(capsys, [*out, "--model", "resnet50"])  # not one of the script's
    assert "argument --model: invalid choice: 'resnet50'" in err


def test_a_valid_config_is_frozen_normalised_and_recorded(tmp_path):
    config = TrainingConfig.build(data="d", output_dir=str(tmp_path), exclude=["fc"], method="lma")
    assert config.outputs.output_dir == tmp_path and config.network.exclude == ("fc",)
    assert config.obf == (0.0, 0.5) and _config(tmp_path).obf == (0.5, 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.epochs = 3  # type: ignore[misc]
    record = config_dict(config)
    assert record == json.loads(json.dumps(record))
    assert record["alpha"] == 0.0 and record["exclude"] == ["fc"]
    assert record["output_dir"] == str(tmp_path)
    with pytest.raises(ConfigError, match="Invalid epochs value: 0"):
        config.replace(epochs=0)  # replace validates again


def test_parse_config_fills_the_script_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = parse_config(["--data", "d", "--no-progress"], SCRIPT)
    assert config.network.model == "small_cnn" and config.optim.epochs == 3
    assert config.optim.weight_decay == 1e-4
    assert config.outputs.output_dir == Path("runs") / "train_test-small_cnn-bame-2of4"
    assert config.outputs.script == "train_test" and config.inputs.default_preset == "cifar10"
    assert config.outputs.progress is False
    assert config.network.alpha is None and config.network.exclude is None
    deit = parse_config(["--data", "d", "--model", "deit_small", "--exclude"], SCRIPT)
    assert deit.optim.epochs == 7 and deit.network.exclude == ()
    assert "--resume PATH|auto" in build_parser(SCRIPT).format_help()


def test_resume_targets_are_checked(tmp_path):
    out = tmp_path / "out"
    assert resolve_resume(_config(tmp_path)) is None
    assert resolve_resume(_config(tmp_path, resume="auto")) is None  # nothing yet: fresh
    checkpoint = out / "checkpoints" / "epoch_0002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    with pytest.raises(ConfigError, match="Invalid output_dir value") as info:
        resolve_resume(_config(tmp_path))
    assert "epoch_0002" in info.value.reason
    assert resolve_resume(_config(tmp_path, resume="auto")) == checkpoint
    assert resolve_resume(_config(tmp_path, resume=str(out))) == checkpoint
    with pytest.raises(ConfigError, match="Invalid resume value: '/no/such'"):
        resolve_resume(_config(tmp_path, resume="/no/such"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resolve_resume(_config(tmp_path, resume=str(tmp_path / "empty")))
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        resolve_resume(TrainingConfig.build(data="d", output_dir=afile))

    saved = {"args": config_dict(_config(tmp_path, epochs=3)), "world_size": 1}
    check_resume_compatible(saved, _config(tmp_path, epochs=3), 1, checkpoint)
    with pytest.raises(ConfigError, match=r"Invalid epochs value: 4 .*made with epochs=3"):
        check_resume_compatible(saved, _config(tmp_path, epochs=4), 1, checkpoint)
    with pytest.raises(ConfigError, match="made with 1 processes, this run has 2"):
        check_resume_compatible(saved, _config(tmp_path, epochs=3), 2, checkpoint)


# One home for each default: the sections' fields (their Option metadata) drive the parser.

PLAIN = ScriptConfig(
    name="train_plain",
    description="a script with no defaults of its own",
    models=tuple(MODELS),
    default_model=NetworkConfig.model,
    default_epochs={"*": OptimConfig.epochs},
    default_preset=InputConfig.default_preset,
    default_weight_decay=OptimConfig.weight_decay,
)
"""A script that overrides no field's default (every model, so every flag exists)."""


def _section_fields():
    return [(f, option_of(f)) for cls in SECTIONS.values() for f in dataclasses.fields(cls)]


def test_each_parser_default_is_the_field_default_written_once():
    parser = build_parser(PLAIN)
    flagged = [(f, spec) for f, spec in _section_fields() if spec.flag is not None]
    assert {f.name for f, _ in flagged} == {
        a.dest for a in parser._actions if a.dest != "help"
    }
    for f, spec in flagged:
        default = parser.get_default(f.name)
        if spec.filled or spec.required:  # None: parse_config tells given from not given
            assert default is None, f.name
        else:
            assert default == f.default, (f.name, default, f.default)


def test_a_plain_command_line_gives_every_field_its_default(tmp_path):
    config = parse_config(["--data", "d", "--output-dir", str(tmp_path)], PLAIN)
    built = TrainingConfig.build(data="d", output_dir=tmp_path, script="train_plain")
    assert config == built and config.flat() == built.flat()
    assert config.optim == OptimConfig() and config.network == NetworkConfig()


def test_the_script_overrides_are_the_only_other_defaults(tmp_path):
    script = dataclasses.replace(
        PLAIN, default_model="small_cnn", default_image_size=24, default_weight_decay=1e-4
    )
    parser = build_parser(script)
    assert (parser.get_default("model"), parser.get_default("image_size")) == ("small_cnn", 24)
    assert "(default: 0.0001)" in parser.format_help()  # --weight-decay, filled later
    config = parse_config(["--data", "d", "--output-dir", str(tmp_path)], script)
    assert config.network.model == "small_cnn" and config.inputs.image_size == 24
    assert config.optim.weight_decay == 1e-4


def test_every_field_error_names_a_flag_of_the_parser():
    options = build_parser(PLAIN)._option_string_actions
    for f, spec in _section_fields():
        if spec.flag is not None:
            assert flag_of(f.name) in options, f.name
    assert flag_of("progress") == "--no-progress"


@pytest.mark.parametrize(
    "argv, flag, shown",
    [
        (["--workers", "-2"], "--workers", "-2"),
        (["--vit-width", "96"], "--vit-width", "96"),
        (["--betas", "0.9", "1.5", "--optimizer", "adamw"], "--betas", "(0.9, 1.5)"),
        (["--eps", "-1", "--optimizer", "adamw"], "--eps", "-1.0"),
        (["--delta-t", "-5"], "--delta-t", "-5"),
    ],
)
def test_a_bad_value_names_its_flag(tmp_path, capsys, argv, flag, shown):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--data", "d", "--output-dir", str(tmp_path), *argv], PLAIN)
    assert exit_info.value.code == 2
    assert f"argument {flag}: invalid value {shown} (" in capsys.readouterr().err


def test_build_and_replace_take_fields_by_name(tmp_path):
    config = _config(tmp_path, lr=0.05, n=1, m=16, report_to="tensorboard")
    assert (config.optim.lr, config.network.n, config.outputs.report_to) == (
        0.05, 1, "tensorboard"
    )
    assert config.replace(m=8).network.m == 8 and config.network.m == 16
    with pytest.raises(TypeError, match="no field 'learning_rate'"):
        _config(tmp_path, learning_rate=0.1)
    with pytest.raises(TypeError, match="Invalid optim value"):
        TrainingConfig(inputs=InputConfig(data="d"), optim="sgd", outputs=config.outputs)
    assert set(RUN_DEFINING) <= set(config_dict(config)) and "output_dir" not in RUN_DEFINING
