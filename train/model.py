"""The model side of training and evaluation: the torchvision model, its optimizer, the
batch transform to the device, and loading weights only into the model they were trained
for (same architecture, same classes in the same order)."""

from __future__ import annotations

import torch
import torchvision

from prep.errors import PrepError
from train import checkpoint as ckpt
from train.config import TrainConfig


def build_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    model = torchvision.models.get_model(cfg.arch, num_classes=cfg.num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig,
                    peak_lr: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():  # norm weights and biases are the 1-d parameters
        (no_decay if cfg.no_wd_norm_bias and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=peak_lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def check_classes(saved: list[str] | None, shards: list[str] | None, checkpoint: str,
                  data: str) -> list[str] | None:
    """The class list predictions are named with: the checkpoint's, which must be the
    shards' (same WNIDs, same order). A checkpoint without one (torchvision weights, an older
    run) is taken to follow the shards' order, with a warning."""
    if saved is None:
        if shards is not None:
            print(f"warning: {checkpoint} has no class list; assuming the model's classes are "
                  f"the shards' ({len(shards)} classes, {data}/_info.json order)", flush=True)
        return shards
    if shards is None or saved == shards:
        return saved
    i = next((i for i, (a, b) in enumerate(zip(saved, shards)) if a != b),
             min(len(saved), len(shards)))
    have = (f"class {i} is {saved[i] if i < len(saved) else 'missing'} in the checkpoint, "
            f"{shards[i] if i < len(shards) else 'missing'} in the shards")
    raise PrepError(f"{checkpoint}: the model was trained on other classes than the shards in "
                    f"{data} have ({len(saved)} vs {len(shards)} classes; {have}). Its "
                    "predictions would be named wrongly: use shards made from the same classes")


def load_weights(model: torch.nn.Module, state: dict, checkpoint: str, arch: str) -> None:
    saved_arch = (state.get("config") or {}).get("arch")
    if saved_arch and saved_arch != arch:
        raise PrepError(f"{checkpoint}: holds a {saved_arch}, the settings say arch={arch}: "
                        f"--set arch={saved_arch} (or use a checkpoint of a {arch})")
    try:
        model.load_state_dict(ckpt.strip_prefixes(state.get("model", state)))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise PrepError(f"{checkpoint}: its weights do not fit a {arch} with these settings "
                        f"({first[1].strip() if len(first) > 1 else first[0][:200]})"
                        ) from None
