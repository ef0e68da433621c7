"""The trainer's batch transform on the device: uint8 batches from the loader become
normalized float tensors (ImageNet's mean and std), decoded there first with --decode gpu.
The one place the normalisation lives; the loaders hand over uint8 pixels only."""

from __future__ import annotations

from collections.abc import Callable

import torch

from train.config import TrainConfig
from train.device_decode import DeviceDecoder

MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)  # ImageNet statistics, on the 0..255 scale
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def batch_transform(cfg: TrainConfig, device: torch.device, decode: str, size: int) -> Callable:
    """uint8 batch -> normalized float on the device; with --decode gpu, decode first."""
    norm = Normalize(device, cfg.channels_last)
    return DecodeNormalize(DeviceDecoder(device, size), norm) if decode == "gpu" else norm


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


class DecodeNormalize:
    """The trainer's `norm` for --decode gpu: raw batch -> decoded -> normalized."""

    def __init__(self, decoder: DeviceDecoder, norm: Callable) -> None:
        self.decoder, self.norm, self.device = decoder, norm, norm.device

    def __call__(self, raw: tuple) -> torch.Tensor:
        return self.norm(self.decoder(raw))
