import re
from pathlib import Path

import pytest

from train.config import TrainConfig, load_config
from train.fit import lr_factor

RECIPES = sorted((Path(__file__).parents[1] / "train" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipes_load(recipe):
    cfg = load_config(recipe)
    assert cfg.epochs > 0 and cfg.arch


def test_seed_recipe_is_the_seed_schedule():
    cfg = load_config(Path("train/recipes/resnet50.yaml"))
    assert (cfg.arch, cfg.epochs, cfg.lr, cfg.lr_steps) == ("resnet50", 90, 0.1, [30, 60, 80])


def test_unknown_and_mistyped_settings_fail(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"r.yaml: unknown setting\(s\) \['learning_rate'\]"):
        load_config(bad)
    with pytest.raises(ValueError, match="epochs must be int"):
        load_config(None, ["epochs=three"])
    with pytest.raises(ValueError, match="amp must be one of"):
        load_config(None, ["amp=fp8"])
    with pytest.raises(ValueError, match="expected name=value"):
        load_config(None, ["epochs"])


def test_overrides_apply_in_order(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("epochs: 3\nlr: 0.2\n")
    cfg = load_config(r, ["lr=0.4", "lr_steps=[1, 2]"])
    assert (cfg.epochs, cfg.lr, cfg.lr_steps, cfg.batch_size) == (3, 0.4, [1, 2], 256)


def test_lr_schedules():
    cfg = TrainConfig(epochs=90, lr_steps=[30, 60, 80])
    f = [lr_factor(e, cfg) for e in (0, 29.9, 30, 60, 85)]
    assert f == pytest.approx([1, 1, 0.1, 0.01, 0.001])
    cos = TrainConfig(epochs=10, lr_schedule="cosine", warmup_epochs=2)
    assert lr_factor(0, cos) == 0 and lr_factor(1, cos) == pytest.approx(0.5)
    assert lr_factor(2, cos) == pytest.approx(1) and lr_factor(10, cos) < 1e-9
    lin = TrainConfig(epochs=10, lr_schedule="linear")
    assert lr_factor(5, lin) == pytest.approx(0.5) and lr_factor(10, lin) == 0


def test_torchvision_and_timm_flags_are_shorthands_for_settings():
    from train.main import parse_args

    args = parse_args(["--data", "d", "--model", "resnet18", "-b", "8", "--lr", "0.2", "--wd",
                       "5e-5", "-j", "0", "--amp", "--label-smoothing", "0.1", "--epochs", "2",
                       "--set", "epochs=3"])
    cfg = load_config(None, args.set)
    assert (cfg.arch, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.workers, cfg.amp,
            cfg.label_smoothing) == ("resnet18", 8, 0.2, 5e-5, 0, "bf16", 0.1)
    assert cfg.epochs == 3  # --set comes last
    assert load_config(None, parse_args(["--data", "d", "--amp", "fp16"]).set).amp == "fp16"


@pytest.mark.parametrize("argv, hint", [(["--lrr", "0.1"], "unknown flag --lrr (did you mean "
                                         "--lr?)"),
                                        (["--bach-size", "3"], "did you mean --batch-size"),
                                        (["--ep", "3"], "unknown flag --ep")])
def test_unknown_flag_lists_the_close_ones(capsys, argv, hint):
    from train.main import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--data", "d", *argv])
    assert hint in capsys.readouterr().err


def test_exponent_floats_without_a_dot():
    cfg = load_config(None, ["lr=1e-3", "weight_decay=5e-05"])
    assert cfg.lr == 0.001 and cfg.weight_decay == 5e-5


@pytest.mark.parametrize("setting,message", [
    ("label_smoothing=1.0", "label_smoothing must be in [0, 1)"),
    ("label_smoothing=-0.1", "label_smoothing must be in [0, 1)"),
    ("momentum=-0.9", "momentum must be at least 0"),
    ("min_scale=0", "min_scale must be in (0, 1]"),
    ("min_scale=1.5", "min_scale must be in (0, 1]"),
    ("lr_gamma=0", "lr_gamma must be above 0"),
    ("warmup_epochs=-1", "warmup_epochs must be at least 0"),
    ("val_crop=300", "val_crop 300 is larger than val_resize 256"),
    ("lr_steps=[60,30]", "lr_steps must be increasing epochs"),
    ("arch=resnet51", "arch 'resnet51' is not a torchvision classification model; did you "
                      "mean resnet50"),
])
def test_every_setting_is_checked_before_any_work(setting, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, [setting])


def _main(*argv):
    from train.main import main

    with pytest.raises(SystemExit) as info:
        main(list(argv))
    return str(info.value)


@pytest.mark.parametrize("device,message", [
    ("tpu", "expected cpu, cuda (or gpu) or cuda:N"),
    ("cuda", "CUDA is not available here"),
    ("gpu", "CUDA is not available here"),
    ("cuda:1", "CUDA is not available here"),
])
def test_device_is_parsed_never_the_cpu_silently(device, message):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a machine with a GPU: these devices exist")
    text = _main("--data", "/nonexistent", "--device", device)
    assert text.startswith("error: --device") and message in text


def test_output_dir_that_is_a_file_and_which_setting_wins(tmp_path, capsys):
    from tests.conftest import sharded_sample

    shards = sharded_sample(tmp_path, "ilsvrc2017", 2, classes=2, train_per_class=4,
                            val_per_class=1, size=32)
    (tmp_path / "notes").write_text("mine")
    text = _main("--data", str(shards), "--device", "cpu", "--output-dir",
                 str(tmp_path / "notes"), "--epochs", "2", "--set", "epochs=1")
    assert "notes is a file, not a directory" in text
    assert (tmp_path / "notes").read_text() == "mine"
    assert "epochs is given twice (epochs=2 by its flag, --set epochs=1); --set is applied " \
        "last and wins" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_command_lines_in_recipe_comments_work(recipe):
    """A recipe's comment that shows flags (`--set ...`) must be what the trainer accepts."""
    from train.main import parse_args

    for line in recipe.read_text().splitlines():
        if line.startswith("#") and "--set" in line:
            flags = line[line.index("--set"):].rstrip(".").split()
            args = parse_args(["--data", "x", *flags])
            cfg = load_config(recipe, args.set)
            assert args.set and all(k.split("=")[0] in cfg.to_dict() for k in args.set)


def test_help_lists_every_setting():
    from dataclasses import fields

    from train.config import settings_help

    text = settings_help()
    listed = [line.split()[0] for line in text.splitlines()[1:]]
    assert listed == [f.name for f in fields(TrainConfig)]
    assert "min_scale              0.08             RandomResizedCrop smallest area" in text
