"""One training epoch and one exact evaluation, with data-wait vs compute timing."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from prep.errors import PrepError
from prep.progress import progress_bar
from prep.scoring import RESTRICTED, RealTally, global_index, subset_wnids
from train.collectives import all_reduce
from train.data import SplitInfo


def autocast(device: torch.device, amp: str) -> AbstractContextManager:
    if amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class LossNotFinite(RuntimeError):
    pass


@dataclass
class EpochTally:
    """An epoch's running sums on this rank: the loss summed over samples (float64, on the
    device: no sync per step) and the samples trained on. A step checkpoint saves their sum
    over ranks, and a resumed epoch starts rank 0's tally from it, so the epoch's train_loss
    is the whole epoch's."""

    loss_sum: torch.Tensor
    seen: int = 0

    @classmethod
    def start(cls, device: torch.device, loss_sum: float = 0.0, seen: int = 0) -> EpochTally:
        return cls(torch.tensor(loss_sum, dtype=torch.float64, device=device), seen)


def train_one_epoch(model: nn.Module, loader: Iterable, *, steps: int,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    criterion: Callable, norm: Callable, cfg: Any, epoch: int, show: bool,
                    lr_at: Callable[[int], float], tally: EpochTally,
                    first_step: int = 0,
                    log_step: Callable[[int, dict], None] | None = None,
                    after_step: Callable[[int], None] | None = None) -> dict:
    """The rest of an epoch: `steps` steps (batches of (images, labels, extra columns...)).
    Step k runs at LR `lr_at(k)`; `first_step` is the run's global step count before it.
    `log_step(global_step, values)`, if given, receives the loss, LR and img/s every
    `cfg.log_every` steps; `after_step(k)` runs after every step (checkpoints, signals)."""
    model.train()
    run_seen = 0
    wait = compute = 0.0
    t_epoch = t = time.perf_counter()
    bar = progress_bar(total=steps, desc=f"epoch {epoch}", disable=not show, unit="step")
    step = -1
    for step, (images, labels, *_) in enumerate(loader):
        t_data = time.perf_counter()
        wait += t_data - t
        x, y = norm(images), labels.to(norm.device, non_blocking=True)
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(norm.device, cfg.amp):
            out = model(x)
            loss = criterion(out, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        tally.loss_sum += loss.detach().double() * len(y)
        tally.seen += len(y)
        run_seen += len(y)
        global_step = first_step + step + 1
        if step % cfg.log_every == 0 or step == steps - 1:
            value = loss.item()  # syncs the device: only every log_every steps
            if not math.isfinite(value):
                raise LossNotFinite(f"loss is {value} at epoch {epoch} step {step}")
            img_s = run_seen / (time.perf_counter() - t_epoch)
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.4f}", img_s=f"{img_s:.0f}")
            if log_step:
                log_step(global_step, {"loss": value, "lr": lr, "img_s": img_s})
        if after_step:
            after_step(step)
        t = time.perf_counter()
        compute += t - t_data
        bar.update()
    bar.close()
    if step + 1 != steps:
        raise RuntimeError(f"epoch {epoch}: {step + 1} steps, expected {steps}: the loader "
                           "ended early")
    total = reduce_sum(torch.stack([tally.loss_sum,
                                    torch.tensor(float(tally.seen), dtype=torch.float64,
                                                 device=norm.device)]))
    elapsed = time.perf_counter() - t_epoch
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {"train_loss": (total[0] / total[1].clamp(min=1)).item(),
            "train_img_s": run_seen * world / elapsed,
            "data_wait": wait / max(elapsed, 1e-9), "epoch_s": elapsed}


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        all_reduce(t)
    return t


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, norm: Callable, *, num_samples: int,
             amp: str,
             num_classes: int, show: bool = False, tta_flip: bool = False,
             keep: dict | None = None, valid: list[int] | None = None,
             to_global: list[int] | None = None) -> dict:
    """Top-1/top-5/loss over every sample exactly once across ranks; fails loudly when the
    all-reduced count is not the manifest's num_samples. With `keep` (a dict), this rank's
    softmax scores, labels and origins (train.decode.sample_origin) are stored in it by
    sample key (for the predictions pickle).
    Unlabelled samples (test, label -1) count toward n but not toward accuracy.
    `valid`: class indices the logits are restricted to (ImageNet-A/-R's 200 classes).
    `to_global`: the model's class index -> sorted-WNID index, for ReaL's top-1/top-5 over
    the samples ReaL scores (prep.scoring.RealTally: none when a label is not the official
    one for its name)."""
    model.eval()
    # c1, c5, loss, n, labelled, real c1, real c5, real n, labels unlike the official ones
    sums = torch.zeros(9, device=norm.device, dtype=torch.float64)
    mask = None
    if valid is not None:
        mask = torch.full((num_classes,), float("-inf"), device=norm.device)
        mask[torch.tensor(valid, device=norm.device)] = 0.0
    real = RealTally(to_global) if to_global is not None else None
    for images, labels, keys, origins in progress_bar(loader, desc="eval", disable=not show,
                                                      unit="batch"):
        x, y = norm(images), labels.to(norm.device)
        with autocast(norm.device, amp):
            logits = model(x)
            if tta_flip:
                logits = (logits + model(x.flip(3))) / 2
        logits = logits.float()
        if mask is not None:
            logits = logits + mask
        if keep is not None:
            for k, score, label, origin in zip(keys, logits.softmax(1).cpu(),
                                               labels.tolist(), origins):
                keep[k] = (score, label, origin)
        if real is not None:
            top5_all = logits.topk(min(5, num_classes), 1).indices.tolist()
            for key, row, label in zip(keys, top5_all, labels.tolist()):
                real.add(key, label, row)
        sums[3] += len(y)
        labelled = y >= 0
        if not labelled.all():
            logits, y = logits[labelled], y[labelled]
        top5 = logits.topk(min(5, num_classes), 1).indices
        sums[0] += (top5[:, 0] == y).sum()
        sums[1] += (top5 == y[:, None]).any(1).sum()
        if len(y):
            sums[2] += nn.functional.cross_entropy(logits, y, reduction="sum")
        sums[4] += len(y)
    if real is not None:
        sums[5:9] += torch.tensor(real.counts(), dtype=sums.dtype, device=sums.device)
    sums = reduce_sum(sums)
    n, m = int(sums[3].item()), max(int(sums[4].item()), 1)
    if n != num_samples:
        raise RuntimeError(f"evaluated {n} samples across all ranks, the manifest has "
                           f"{num_samples}: samples were dropped or counted twice")
    out = {"top1": (sums[0] / m).item(), "top5": (sums[1] / m).item(),
           "val_loss": (sums[2] / m).item(), "val_samples": n}
    if real is not None:
        out |= RealTally(to_global, *(int(v) for v in sums[5:9].tolist())).result() or {}
    return out


def scoring(split: SplitInfo, classes: list[str] | None, split_name: str) -> dict:
    """How `evaluate` scores this split: ImageNet-A/-R restrict the logits to their 200
    classes; ImageNet val (any copy, any subset) adds ReaL's top-1/top-5."""
    kind = (split.evalset or {}).get("kind")
    if kind in RESTRICTED:
        if classes is None:
            raise PrepError(f"{kind}: the model's class list is unknown, so its logits cannot "
                            "be restricted to the 200 classes; evaluate a checkpoint of this "
                            "trainer or shards whose _info.json lists the classes")
        index = {w: i for i, w in enumerate(classes)}
        return {"valid": [index[w] for w in subset_wnids(kind) if w in index]}
    if split.evalset is None and split_name in ("val", "validation") and classes and \
            all(w in global_index() for w in classes):
        return {"to_global": [global_index()[w] for w in classes]}
    return {}
