"""Training settings: each declared once, with its default and unit; recipes override them.

A recipe is a small YAML mapping of these names. Unknown names and wrongly typed values are
errors (nanoGPT-style), so a typo never silently trains with a default.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from prep.errors import SettingError


@dataclass
class TrainConfig:
    arch: str = "resnet50"  # torchvision.models name
    num_classes: int = 1000
    image_size: int = 224  # px, train crop side
    val_resize: int = 256  # px, shorter side before the val center crop
    val_crop: int = 224  # px
    min_scale: float = 0.08  # RandomResizedCrop smallest area fraction
    hflip: bool = True
    rotation: float = 0.0  # degrees: random rotation in [-r, r]; 0 = off
    color_jitter: float = 0.0  # brightness/contrast/saturation factor in [1-j, 1+j]; 0 = off
    progressive_start: int = 0  # px: FFCV progressive resizing from this train size; 0 = off
    progressive_end_epoch: int = 0  # epoch where the train size reaches image_size
    batch_size: int = 256  # images per process
    workers: int = 8  # data-loading processes per rank
    shuffle_buffer: int = 5000  # URL/pipe --data: samples held for shuffling (local: a permutation)
    shard_window: int = 16  # s3:// --data: shards shuffled together; the cache holds ~2 windows
    epochs: int = 90
    lr: float = 0.1  # for a global batch of 256; scaled linearly with the global batch
    lr_schedule: str = "step"  # step | cosine | linear (FFCV: ramp up, then down to 0)
    lr_steps: list = (30, 60, 80)  # epochs where step divides the LR by 1/lr_gamma
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear warmup from 0, in epochs
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    no_wd_norm_bias: bool = False  # no weight decay on norm layers and biases
    label_smoothing: float = 0.0
    amp: str = "none"  # none | bf16 | fp16 (GradScaler)
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
    max_skip_rate: float = 0.001  # abort when more samples than this fraction fail to decode
    seed: int = 0
    log_every: int = 20  # steps between progress updates
    tensorboard: bool = False  # also log to OUTPUT_DIR/tensorboard (needs `tensorboard`)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lr_steps"] = list(d["lr_steps"])
        return d


def settings_help() -> str:
    """`name  default  meaning` for every setting, from its one declaration above (the
    comment beside it is its help): the epilog of `train/main.py --help`."""
    import inspect
    import re as _re

    lines = []
    for line in inspect.getsource(TrainConfig).splitlines():
        m = _re.match(r"\s+(\w+): [\w\[\], ]+ = ([^#]+?)\s*(?:#\s*(.*))?$", line)
        if m:
            lines.append(f"  {m[1]:<22} {m[2]:<16} {m[3] or ''}".rstrip())
    return "settings (--set NAME=VALUE, or a --recipe file; name, default, meaning):\n" + \
        "\n".join(lines)


AT_LEAST = {"num_classes": 1, "image_size": 1, "val_resize": 1, "val_crop": 1, "batch_size": 1,
            "workers": 0, "shuffle_buffer": 1, "epochs": 0, "lr": 0.0, "log_every": 1,
            "min_scale": 0.0, "max_skip_rate": 0.0, "weight_decay": 0.0}
CHOICES = {"lr_schedule": ("step", "cosine", "linear"), "amp": ("none", "bf16", "fp16")}


def _coerce(name: str, value: Any, default: Any, where: str) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value)
        value = list(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise SettingError(f"{where}: {name} must be {type(default).__name__}, got "
                           f"{value!r}")
    if name in AT_LEAST and value < AT_LEAST[name]:
        raise SettingError(f"{where}: {name} must be at least {AT_LEAST[name]}, got {value!r}")
    if name in CHOICES and value not in CHOICES[name]:
        raise SettingError(f"{where}: {name} must be one of {CHOICES[name]}, got {value!r}")
    return value


def apply(cfg: TrainConfig, overrides: dict[str, Any], where: str) -> TrainConfig:
    known = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        import difflib

        close = {u: difflib.get_close_matches(u, known, n=3) for u in unknown}
        hints = "; ".join(f"{u!r}: did you mean {', '.join(c)}?" for u, c in close.items() if c)
        raise SettingError(f"{where}: unknown setting(s) {unknown}"
                           + (f" ({hints})" if hints else f"; known: {sorted(known)}"))
    for name, value in overrides.items():
        setattr(cfg, name, _coerce(name, value, known[name], where))
    return cfg


# (setting, test, what it must be): ranges the type alone does not give
RANGES = [
    ("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("momentum", lambda v: v >= 0, "at least 0"),
    ("min_scale", lambda v: 0 < v <= 1, "in (0, 1] (RandomResizedCrop's scale is min..1)"),
    ("lr_gamma", lambda v: v > 0, "above 0"),
    ("warmup_epochs", lambda v: v >= 0, "at least 0"),
    ("rotation", lambda v: 0 <= v <= 180, "in [0, 180] degrees"),
    ("color_jitter", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("max_skip_rate", lambda v: v < 1, "below 1"),
]


def check_config(cfg: TrainConfig, where: str) -> TrainConfig:
    """Every range and every relation between settings, before any work: one error naming
    the setting, its value and what it must be."""
    for name, ok, must in RANGES:
        if not ok(getattr(cfg, name)):
            raise SettingError(f"{where}: {name} must be {must}, got {getattr(cfg, name)!r}")
    if cfg.val_crop > cfg.val_resize:
        raise SettingError(f"{where}: val_crop {cfg.val_crop} is larger than val_resize "
                           f"{cfg.val_resize} (the crop is cut from the resized image)")
    if cfg.progressive_start and not 32 <= cfg.progressive_start <= cfg.image_size:
        raise SettingError(f"{where}: progressive_start must be 0 (off) or in 32..image_size "
                           f"({cfg.image_size}), got {cfg.progressive_start}")
    if any(b <= a for a, b in zip(cfg.lr_steps, cfg.lr_steps[1:])) or \
            any(s < 0 for s in cfg.lr_steps):
        raise SettingError(f"{where}: lr_steps must be increasing epochs, got "
                           f"{list(cfg.lr_steps)}")
    _check_arch(cfg.arch, where)
    return cfg


def _check_arch(arch: str, where: str) -> None:
    import difflib

    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=4, cutoff=0.5)
        raise SettingError(f"{where}: arch {arch!r} is not a torchvision classification "
                           f"model; {'did you mean ' + ', '.join(close) + '? ' if close else ''}"
                           f"the names: {', '.join(names)}")


def load_config(recipe: str | Path | None, sets: list[str] = ()) -> TrainConfig:
    """Defaults, then the recipe file, then `--set name=value` overrides (YAML values)."""
    cfg = TrainConfig()
    if recipe:
        try:
            doc = yaml.safe_load(Path(recipe).read_text()) or {}
        except FileNotFoundError:
            raise SettingError(f"--recipe {recipe}: no such file (recipes shipped: "
                               f"{', '.join(sorted(p.name for p in RECIPES.glob('*.yaml')))} "
                               f"in {RECIPES})") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise SettingError(f"--recipe {recipe}: not a readable YAML file ({exc})") from None
        if not isinstance(doc, dict):
            raise SettingError(f"{recipe}: expected a mapping of settings")
        apply(cfg, doc, str(recipe))
    for item in sets:
        apply(cfg, parse_set(item), f"--set {item}")
    return check_config(cfg, "settings (--recipe, flags, --set)")


def parse_set(item: str) -> dict[str, Any]:
    """`name=value` (the value read as YAML) -> {name: value}, unchecked."""
    name, eq, value = item.partition("=")
    if not eq:
        raise SettingError(f"--set {item!r}: expected name=value")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise SettingError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
    return {name.strip(): parsed}


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


RECIPES = Path(__file__).with_name("recipes")
