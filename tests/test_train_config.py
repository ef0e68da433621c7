from pathlib import Path

import pytest

from train.config import TrainConfig, load_config
from train.main import lr_factor

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
    f = [lr_factor(e * 10, 10, cfg) for e in (0, 29, 30, 60, 85)]
    assert f == pytest.approx([1, 1, 0.1, 0.01, 0.001])
    cos = TrainConfig(epochs=10, lr_schedule="cosine", warmup_epochs=2)
    assert lr_factor(0, 10, cos) == 0 and lr_factor(10, 10, cos) == pytest.approx(0.5)
    assert lr_factor(20, 10, cos) == pytest.approx(1) and lr_factor(100, 10, cos) < 1e-9
    lin = TrainConfig(epochs=10, lr_schedule="linear")
    assert lr_factor(50, 10, lin) == pytest.approx(0.5) and lr_factor(100, 10, lin) == 0
