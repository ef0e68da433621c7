"""`--decode gpu`: whole batches of JPEGs decoded on the device (nvJPEG through
`torchvision.io.decode_jpeg(list, device="cuda")`), crop + resize + flip there too.

The CPU workers only read the tar bytes and draw the augmentation (crop box from the JPEG
header, flip): the same random stream as the CPU path. On the device each image is cropped
and resized (antialiased bilinear, as the CPU path) and written into a uint8 N x 3 x S x S
batch, so the trainer's normalization is unchanged. An image nvJPEG refuses (CMYK, PNG, a
damaged file) is decoded by Pillow on the CPU and copied over: one image, not the batch;
one neither can decode stops the run with its shard and member named (the CPU path skips
such samples up to max_skip_rate).

The same code runs with device="cpu" (torchvision decodes on the CPU then): that is how
the tests check it on machines without a GPU.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from prep.jpeg import jpeg_sof, size_problem, to_rgb
from train.decode import (
    CODE_ERRORS,
    center_box,
    derive_seed,
    rrc_box,
    sample_error,
    sample_label,
    sample_origin,
    worker_slot,
)


def _size(data: bytes) -> tuple[int, int]:
    """The image size from its header; ValueError for 0 or too many pixels (checked here, in
    the worker, before nvJPEG or Pillow allocates anything)."""
    sof = jpeg_sof(data)
    w, h = (sof[0], sof[1]) if sof else Image.open(io.BytesIO(data)).size
    problem = size_problem(w, h)
    if problem:
        raise ValueError(problem)
    return w, h


def _name(sample: dict) -> str:
    return f"{sample.get('__url__', '?')}: member {sample.get('__key__', '?')}.jpg"


def _raw(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class RawTrainDecoder:
    """Worker side of the train path: sample -> (bytes tensor, box, flip, name, label)."""

    def __init__(self, min_scale: float, hflip: bool, seed: int,
                 num_classes: int | None = None):
        self.min_scale, self.hflip, self.seed = min_scale, hflip, seed
        self.num_classes = num_classes
        self.rng: random.Random | None = None  # per worker, per epoch

    def __call__(self, sample: dict) -> tuple:
        if self.rng is None:
            self.rng = random.Random(derive_seed(self.seed, worker_slot()[0]))
        try:
            data = sample["jpg"]
            box = rrc_box(*_size(data), (self.min_scale, 1.0), self.rng)
            flip = self.hflip and self.rng.random() < 0.5
            return (_raw(data), box, flip, _name(sample),
                    sample_label(sample, self.num_classes))
        except CODE_ERRORS:
            raise
        except Exception as exc:
            raise sample_error(sample, exc) from exc


class RawValDecoder:
    """Worker side of the eval path: sample -> (bytes, box, False, name, label, key,
    origin)."""

    def __init__(self, resize: int, crop: int, num_classes: int | None = None,
                 labelled: bool = True):
        self.resize, self.crop = resize, crop
        self.num_classes, self.labelled = num_classes, labelled

    def __call__(self, sample: dict) -> tuple:
        try:
            data = sample["jpg"]
            label = sample_label(sample, self.num_classes, self.labelled)
            return (_raw(data), center_box(*_size(data), self.resize, self.crop), False,
                    _name(sample), label, sample["__key__"], sample_origin(sample))
        except CODE_ERRORS:
            raise
        except Exception as exc:
            raise sample_error(sample, exc) from exc


def collate_raw(batch: list[tuple]) -> tuple:
    """((byte tensors, boxes N x 4, flips N, names), labels, extra columns...)."""
    cols = list(zip(*batch))
    boxes = torch.tensor(cols[1], dtype=torch.float64)
    flips = torch.tensor(cols[2], dtype=torch.bool)
    return ((list(cols[0]), boxes, flips, list(cols[3])), torch.tensor(cols[4], dtype=torch.long),
            *cols[5:])


class DeviceDecoder:
    """Raw batch -> uint8 N x 3 x size x size on `device`; counts the CPU fallbacks."""

    def __init__(self, device: torch.device, size: int):
        self.device, self.size, self.fallbacks = device, size, 0

    def _one(self, data: torch.Tensor, name: str) -> torch.Tensor:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            self.fallbacks += 1
        try:
            img = to_rgb(Image.open(io.BytesIO(data.numpy().tobytes())))
        except (OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"{name}: undecodable (nvJPEG and Pillow): {exc}. `prep verify "
                             "--deep` lists such files; --decode cpu skips them") from exc
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).to(self.device)

    def __call__(self, raw: tuple, size: int | None = None) -> torch.Tensor:
        datas, boxes, flips, names = raw
        size = size or self.size
        try:
            images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # one bad image fails the batch call: decode one by one
            images = [self._one(d, n) for d, n in zip(datas, names)]
        out = torch.empty((len(datas), 3, size, size), dtype=torch.uint8, device=self.device)
        for i, (img, (x, y, w, h), flip) in enumerate(zip(images, boxes.tolist(),
                                                         flips.tolist())):
            x0, y0 = int(x), int(y)
            x1, y1 = min(math.ceil(x + w), img.shape[2]), min(math.ceil(y + h), img.shape[1])
            crop = img[:, y0:y1, x0:x1].unsqueeze(0).float()
            r = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)
            r = r.round_().clamp_(0, 255).to(torch.uint8)[0]
            out[i] = r.flip(2) if flip else r
        return out


def nvjpeg_works(device: torch.device) -> bool:
    """True when torchvision can decode a JPEG on `device` (a CUDA build with nvJPEG)."""
    if device.type != "cuda":
        return False
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, "JPEG")
    try:
        decode_jpeg(_raw(buf.getvalue()), device=device)
        return True
    except RuntimeError:
        return False


def resolve_decode(choice: str, device: torch.device) -> str:
    """--decode auto|cpu|gpu|pil -> the path used; gpu needs CUDA with nvJPEG."""
    if choice == "auto":
        return "gpu" if nvjpeg_works(device) else "cpu"
    if choice == "gpu" and not nvjpeg_works(device):
        raise SystemExit(f"--decode gpu: no nvJPEG decode on {device} (needs a CUDA device "
                         "and torchvision built with CUDA); use --decode cpu")
    return choice
