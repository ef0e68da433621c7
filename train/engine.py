"""One training epoch and one exact evaluation, with data-wait vs compute timing."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from prep.progress import progress_bar
from train.data import MEAN, STD


class Normalize:
    """uint8 N x 3 x H x W batch (any layout) on the host -> normalized float on the
    device (non-blocking copy)."""

    def __init__(self, device: torch.device, channels_last: bool):
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
        self.device, self.channels_last = device, channels_last

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        # the loader's batches are N x 3 x H x W views of N x H x W x 3 memory (channels-last)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last
                            else torch.contiguous_format)


def autocast(device: torch.device, amp: str) -> AbstractContextManager:
    if amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class LossNotFinite(RuntimeError):
    pass


def train_one_epoch(model: nn.Module, loader: Iterable, *, steps: int,
                    optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
                    scaler: torch.amp.GradScaler, criterion: Callable, norm: Callable,
                    cfg: Any, epoch: int, show: bool,
                    log_step: Callable[[int, dict], None] | None = None) -> dict:
    """One epoch of `steps` steps. `log_step(global_step, values)`, if given, receives the
    loss, LR and img/s every `cfg.log_every` steps (TensorBoard)."""
    model.train()
    loss_sum = torch.zeros((), device=norm.device)
    seen = 0
    wait = compute = 0.0
    t_epoch = t = time.perf_counter()
    bar = progress_bar(total=steps, desc=f"epoch {epoch}", disable=not show, unit="step")
    for step, (images, labels) in enumerate(loader):
        t_data = time.perf_counter()
        wait += t_data - t
        x, y = norm(images), labels.to(norm.device, non_blocking=True)
        with autocast(norm.device, cfg.amp):
            out = model(x)
            loss = criterion(out, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.detach() * len(y)
        seen += len(y)
        if step % cfg.log_every == 0 or step == steps - 1:
            value = loss.item()  # syncs the device: only every log_every steps
            if not math.isfinite(value):
                raise LossNotFinite(f"loss is {value} at epoch {epoch} step {step}")
            lr, img_s = scheduler.get_last_lr()[0], seen / (time.perf_counter() - t_epoch)
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.4f}", img_s=f"{img_s:.0f}")
            if log_step:
                log_step(scheduler.last_epoch, {"loss": value, "lr": lr, "img_s": img_s})
        t = time.perf_counter()
        compute += t - t_data
        bar.update()
    bar.close()
    if seen != steps * cfg.batch_size:
        raise RuntimeError(f"epoch {epoch}: {seen} samples, expected {steps} steps x "
                           f"{cfg.batch_size}: the loader ended early")
    total = reduce_sum(torch.stack([loss_sum, torch.tensor(float(seen), device=norm.device)]))
    elapsed = time.perf_counter() - t_epoch
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {"train_loss": (total[0] / total[1]).item(), "train_img_s": seen * world / elapsed,
            "data_wait": wait / max(elapsed, 1e-9), "epoch_s": elapsed}


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, norm: Callable, *, num_samples: int,
             amp: str,
             num_classes: int, show: bool = False, tta_flip: bool = False,
             keep: dict | None = None, valid: list[int] | None = None,
             real: Callable[[str], tuple[int, ...] | None] | None = None,
             official: Callable[[str], int | None] | None = None,
             to_global: list[int] | None = None) -> dict:
    """Top-1/top-5/loss over every sample exactly once across ranks; fails loudly when the
    all-reduced count is not the manifest's num_samples. With `keep` (a dict), this rank's
    softmax scores, labels and origins (train.decode.sample_origin) are stored in it by
    sample key (for the predictions pickle).
    Unlabelled samples (test, label -1) count toward n but not toward accuracy.
    `valid`: class indices the logits are restricted to (ImageNet-A/-R's 200 classes).
    `real(key)`: ReaL's answers (global sorted-WNID indices) for a sample, or None to leave
    it out; `to_global` maps the model's class index to that space (real_top1/real_top5).
    `official(key)`: the official val label; one labelled sample that disagrees with it
    (not ImageNet's val images under their names) and no ReaL figures are reported."""
    model.eval()
    # c1, c5, loss, n, labelled, real c1, real c5, real n, labels unlike the official ones
    sums = torch.zeros(9, device=norm.device, dtype=torch.float64)
    mask = None
    if valid is not None:
        mask = torch.full((num_classes,), float("-inf"), device=norm.device)
        mask[torch.tensor(valid, device=norm.device)] = 0.0
    glob = torch.tensor(to_global, device=norm.device) if real is not None else None
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
            top5_all = glob[logits.topk(min(5, num_classes), 1).indices].tolist()
            for key, row, label in zip(keys, top5_all, labels.tolist()):
                if official is not None and label >= 0 and \
                        official(key) not in (None, to_global[label]):
                    sums[8] += 1
                answers = real(key)
                if answers:
                    sums[5] += row[0] in answers
                    sums[6] += any(p in answers for p in row)
                    sums[7] += 1
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
    sums = reduce_sum(sums)
    n, m = int(sums[3].item()), max(int(sums[4].item()), 1)
    if n != num_samples:
        raise RuntimeError(f"evaluated {n} samples across all ranks, the manifest has "
                           f"{num_samples}: samples were dropped or counted twice")
    out = {"top1": (sums[0] / m).item(), "top5": (sums[1] / m).item(),
           "val_loss": (sums[2] / m).item(), "val_samples": n}
    if real is not None and sums[7] > 0 and sums[8] == 0:
        r = sums[7].item()
        out |= {"real_top1": sums[5].item() / r, "real_top5": sums[6].item() / r,
                "real_samples": int(r)}
    return out
