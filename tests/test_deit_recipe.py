"""DeiT's recipe in examples/train_imagenet.py and the ``--optimizer`` flag of the training
application: the defaults of deit_small resolve to DeiT's (AdamW, lr 5e-4 x global batch / 512,
weight decay 0.05, 5 warm-up epochs, label smoothing 0.1) where no flag is given, explicit
flags win, ``--optimizer adamw`` builds BAMEAdamW / torch.optim.AdamW over groups that give the
position embedding, the class token and the 1-D parameters no decay, methods without an AdamW
variant are refused naming the flag, and a tiny DeiT trains end to end with the recipe."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("accelerate")

from bame_apps.integrations.training import ConfigError, TrainingConfig, parse_config
from bame_apps.integrations.training.build import (
    build_training_model,
    build_training_optimizer,
)
from bame_apps.integrations.training.recipes import DEIT_RECIPE, launched_processes
from bame_optim import BAMESGD, BAMEAdamW

NO_DECAY = {"class_token", "encoder.pos_embedding"}
QKV = "encoder.layers.encoder_layer_0.self_attention.in_proj_weight"


@pytest.fixture(scope="module")
def imagenet_script(load_example) -> ModuleType:
    return load_example("train_imagenet")


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    """No launcher: one process (the global batch of the recipe's lr)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)


def _parse(script: ModuleType, *flags: str):
    return parse_config(["--data", "d", "--model", "deit_small", *flags], script.CONFIG)


def _exit_message(capsys, script: ModuleType, *flags: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _parse(script, *flags)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The defaults


def test_deit_defaults_are_deits_recipe_and_are_printed(imagenet_script, capsys):
    config = _parse(imagenet_script)
    assert config.optim.optimizer == "adamw" and config.registered_method == "bame_adamw"
    assert config.optim.lr == pytest.approx(5e-4 * 256 / 512)  # batch 256, one process
    assert config.optim.weight_decay == 0.05 and config.optim.label_smoothing == 0.1
    assert config.optim.warmup_epochs == 5.0 and config.optim.epochs == 300
    assert config.optim.betas == (0.9, 0.999) and config.optim.eps == 1e-8
    assert config.outputs.output_dir == Path("runs/train_imagenet-deit_small-bame_adamw-2of4")
    out = capsys.readouterr().out
    line = "deit_small: DeiT's recipe for the flags not given: --optimizer adamw, --lr 0.00025 ("
    assert line in out
    assert "--weight-decay 0.05, --warmup-epochs 5, --label-smoothing 0.1" in out


def test_the_lr_scales_with_the_global_batch(imagenet_script, monkeypatch):
    config = _parse(imagenet_script, "--batch-size", "64", "--grad-accum", "2")
    assert config.optim.lr == pytest.approx(5e-4 * 128 / 512)
    monkeypatch.setenv("WORLD_SIZE", "4")  # e.g. torchrun --nproc_per_node 4
    assert launched_processes() == 4
    config = _parse(imagenet_script, "--batch-size", "64", "--grad-accum", "2")
    assert config.optim.lr == pytest.approx(5e-4 * 512 / 512)
    assert DEIT_RECIPE.lr_for(1024) == pytest.approx(1e-3)  # DeiT's own batch


def test_a_short_run_warms_up_for_half_its_epochs(imagenet_script, capsys):
    assert _parse(imagenet_script, "--epochs", "4").optim.warmup_epochs == 2.0
    assert "--warmup-epochs 2 (5 capped at half of the 4 epochs)" in capsys.readouterr().out
    assert _parse(imagenet_script, "--epochs", "10").optim.warmup_epochs == 5.0


def test_explicit_flags_win(imagenet_script, capsys):
    config = _parse(
        imagenet_script, "--lr", "1e-3", "--weight-decay", "0.1", "--warmup-epochs", "0",
        "--label-smoothing", "0", "--betas", "0.9", "0.95", "--eps", "1e-6",
    )
    optim = config.optim
    assert optim.optimizer == "adamw" and optim.lr == 1e-3 and optim.weight_decay == 0.1
    assert config.optim.warmup_epochs == 0.0 and config.optim.label_smoothing == 0.0
    assert config.optim.betas == (0.9, 0.95) and config.optim.eps == 1e-6
    out = capsys.readouterr().out
    assert "recipe for the flags not given: --optimizer adamw; given: --lr 0.001" in out
    # another optimizer than the recipe's: the script's (the paper's SGD) defaults
    config = _parse(imagenet_script, "--optimizer", "sgd", "--lr", "0.1")
    optim = config.optim
    assert (optim.optimizer, config.registered_method, optim.lr) == ("sgd", "bame", 0.1)
    assert config.optim.weight_decay == 1e-4 and config.optim.momentum == 0.9
    assert config.optim.warmup_epochs == 0.0 and config.optim.label_smoothing == 0.0
    assert "--optimizer sgd given, so not DeiT's adamw recipe" in capsys.readouterr().out


def test_other_models_keep_the_papers_sgd_recipe(imagenet_script, capsys):
    config = parse_config(["--data", "d", "--model", "resnet50"], imagenet_script.CONFIG)
    optim = config.optim
    assert (optim.optimizer, optim.lr, optim.weight_decay) == ("sgd", 0.1, 1e-4)
    assert config.optim.warmup_epochs == 0.0 and config.optim.label_smoothing == 0.0
    assert capsys.readouterr().out == ""  # no recipe: nothing printed
    config = parse_config(
        ["--data", "d", "--model", "resnet50", "--optimizer", "adamw", "--lr", "1e-3"],
        imagenet_script.CONFIG,
    )
    assert config.registered_method == "bame_adamw" and config.optim.weight_decay == 1e-4


@pytest.mark.parametrize(
    "method, registered", [("dense", "dense_adamw"), ("static", "static_adamw")]
)
def test_methods_map_to_their_adamw_variants(imagenet_script, method, registered):
    config = _parse(imagenet_script, "--method", method)
    assert config.optim.optimizer == "adamw" and config.registered_method == registered


# --------------------------------------------------------------------------------------------
# Errors


def test_a_method_without_an_adamw_variant_is_refused(imagenet_script, capsys, tmp_path):
    err = _exit_message(capsys, imagenet_script, "--method", "rigl", "--optimizer", "adamw")
    assert "argument --optimizer: invalid value 'adamw' (method rigl has no adamw variant" in err
    assert "the methods with one: dense, static, bame" in err
    err = _exit_message(capsys, imagenet_script, "--method", "rigl")  # adamw from the recipe
    assert "argument --method: invalid value 'rigl' (it has no adamw variant" in err
    assert "give --optimizer sgd" in err
    config = _parse(imagenet_script, "--method", "rigl", "--optimizer", "sgd")
    assert config.network.method == "rigl"
    with pytest.raises(ConfigError, match="Invalid optimizer value: 'adamw'") as info:
        TrainingConfig.build(data="d", output_dir=tmp_path, method="lbc", optimizer="adamw")
    assert info.value.field == "optimizer" and "method lbc has no adamw variant" in str(info.value)
    with pytest.raises(ConfigError, match="Invalid method value: 'bame_adamw'"):
        TrainingConfig.build(data="d", output_dir=tmp_path, method="bame_adamw")
    with pytest.raises(ConfigError, match="Invalid optimizer value: 'adam'"):
        TrainingConfig.build(data="d", output_dir=tmp_path, optimizer="adam")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--momentum", "0.8"], "argument --momentum: invalid value 0.8 (--optimizer adamw"),
        (["--optimizer", "sgd", "--eps", "1e-6"], "argument --eps: invalid value 1e-06 (AdamW's"),
        (["--optimizer", "sgd", "--betas", "0.9", "0.9"], "argument --betas: invalid value"),
        (["--betas", "0.9", "1.0"], "argument --betas: invalid value (0.9, 1.0) (each beta"),
        (["--eps", "0"], "argument --eps: invalid value 0.0"),
        (["--vit-width", "96"], "argument --vit-width: invalid value 96 (a multiple of 64"),
        (["--vit-patch", "0"], "argument --vit-patch: invalid value 0"),
        (["--vit-patch", "5"], "argument --image-size: invalid value 224 (DeiT needs a mult"),
        (["--optimizer", "sgdw"], "argument --optimizer: invalid choice: 'sgdw'"),
        (["--method", "bame_adamw"], "argument --method: invalid choice: 'bame_adamw'"),
    ],
)
def test_bad_optimizer_flags_name_the_flag(imagenet_script, capsys, flags, message):
    assert message in _exit_message(capsys, imagenet_script, *flags)


# --------------------------------------------------------------------------------------------
# The optimizer and its groups


def _tiny_vit(tmp_path: Path, **fields):
    config = TrainingConfig.build(
        data="d", output_dir=tmp_path, model="deit_small", vit_depth=1, vit_width=64,
        vit_patch=8, image_size=16, delta_t=1, **fields,
    )
    data = SimpleNamespace(info={"input_shape": [3, 16, 16]}, num_classes=3, in_channels=3)
    torch.manual_seed(0)
    return config, build_training_model(config, data)  # type: ignore[arg-type]


def _decay_of(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {
        name: group["weight_decay"]
        for group in optimizer.param_groups
        for name in group["param_names"]
    }


@pytest.mark.parametrize(
    "method, expected", [("bame", BAMEAdamW), ("static", BAMEAdamW), ("dense", torch.optim.AdamW)]
)
def test_adamw_builds_the_variant_with_no_decay_groups(tmp_path, method, expected):
    config, model = _tiny_vit(
        tmp_path, method=method, optimizer="adamw", lr=1e-3, weight_decay=0.05,
        betas=(0.8, 0.99), eps=1e-7,
    )
    assert model.encoder.layers[0].self_attention.num_heads == 1  # width 64: one head
    optimizer = build_training_optimizer(config, model, total_steps=30)
    assert type(optimizer) is expected
    decay = _decay_of(optimizer)
    assert decay.keys() == {name for name, _ in model.named_parameters()}
    one_d = {name for name, p in model.named_parameters() if p.ndim == 1}
    for name in NO_DECAY | one_d:
        assert decay[name] == 0.0, name
    for name in ("conv_proj.weight", "heads.head.weight", QKV):
        assert decay[name] == 0.05, name
    group = next(g for g in optimizer.param_groups if QKV in g["param_names"])
    assert group["betas"] == (0.8, 0.99) and group["eps"] == 1e-7 and "momentum" not in group
    if expected is BAMEAdamW:
        assert group["sparse"] and (group["n"], group["m"]) == (2, 4)


def test_sgd_keeps_its_groups(tmp_path):
    config, model = _tiny_vit(tmp_path, weight_decay=0.05)
    optimizer = build_training_optimizer(config, model, total_steps=30)
    assert type(optimizer) is BAMESGD
    decay = _decay_of(optimizer)
    assert decay["class_token"] == 0.05 and decay["encoder.ln.weight"] == 0.0  # 1-D rule only


def test_the_patch_size_must_divide_the_images(tmp_path):
    config = TrainingConfig.build(data="d", output_dir=tmp_path, model="deit_small", vit_patch=16)
    data = SimpleNamespace(info={"input_shape": [1, 28, 28]}, num_classes=10, in_channels=1)
    with pytest.raises(ConfigError, match=r"Invalid vit_patch value: 16 \(the images are 28"):
        build_training_model(config, data)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# End to end


def _write_colour_folder(root: Path) -> None:
    """Three classes of 16x16 images, each a noisy version of its class's colour."""
    rng = np.random.default_rng(0)
    colours = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
    for split, count in (("train", 8), ("val", 2)):
        for label, colour in colours.items():
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                noise = rng.integers(-40, 40, (16, 16, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")


def test_a_tiny_deit_trains_with_the_recipe(imagenet_script, tmp_path, capsys,
                                           fresh_accelerate_state):
    root = tmp_path / "images"
    _write_colour_folder(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = imagenet_script.main([
            "--data", str(root), "--model", "deit_small", "--vit-depth", "1", "--vit-width",
            "64", "--vit-patch", "8", "--image-size", "16", "--epochs", "6", "--batch-size", "8",
            "--lr", "3e-3", "--warmup-epochs", "1", "--delta-t", "1", "--workers", "0",
            "--no-progress", "--checkpoint-every", "0", "--cache-dir", str(tmp_path / "cache"),
            "--output-dir", str(tmp_path / "out"),
        ])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "--optimizer adamw" in out and "--weight-decay 0.05" in out
    assert "train_imagenet: deit_small bame_adamw 2:4 on " in out
    assert isinstance(result.optimizer, BAMEAdamW)
    args = result.metrics["args"]
    assert args["optimizer"] == "adamw" and args["weight_decay"] == 0.05
    assert args["label_smoothing"] == 0.1 and args["betas"] == [0.9, 0.999]
    losses = [row["train_loss"] for row in result.metrics["history"]]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses
    weight = dict(result.model.named_parameters())[QKV].detach()
    assert (weight.reshape(-1, 4) != 0).sum(-1).max() <= 2  # 2:4 throughout
