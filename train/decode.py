"""JPEG bytes -> H x W x 3 uint8 crops for training and evaluation, with the least work.

The crop box is chosen from the JPEG header (SOF marker) before anything is decoded; then
only that region is decoded, at the smallest 1/2, 1/4 or 1/8 DCT scale that still covers
the output, and resized once (antialiased bilinear, as torchvision's RandomResizedCrop on
PIL images) by train/jpeg_region.py (libjpeg-turbo). Anything it declines (CMYK, PNG,
damaged data) or a machine where it is not built goes through Pillow: full decode (DCT
scaled by draft when the box is at least 2x the output), crop, resize; Pillow repairs what
it can and raises a clear error otherwise. No float tensors on the CPU.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance

from prep.errors import SampleError
from prep.jpeg import complete_jpeg, jpeg_sof, size_problem, to_rgb
from train import jpeg_region

Box = tuple[float, float, float, float]  # left, top, width, height in source pixels


def derive_seed(base: int, *parts: int) -> int:
    """The seed of one random stream, e.g. derive_seed(seed, epoch, rank): distinct parts give
    unrelated streams (a hash, not arithmetic that could make two parts collide)."""
    digest = hashlib.blake2b(repr((base, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def worker_slot() -> tuple[int, int]:
    """(this DataLoader worker's id, number of workers); (0, 1) outside workers."""
    w = torch.utils.data.get_worker_info()
    return (w.id, w.num_workers) if w else (0, 1)


def rrc_box(w: int, h: int, scale: tuple[float, float], rng: random.Random,
            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (torchvision's algorithm): (left, top, width, height)."""
    area = w * h
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_r))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, w - cw), rng.randint(0, h - ch), cw, ch
    in_ratio = w / h  # fallback: a central crop of clamped aspect
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def center_box(w: int, h: int, resize: int, crop: int) -> Box:
    """The region of a w x h image that "resize the shorter side to `resize`, then center
    crop `crop`" keeps (torchvision's val transform), in source pixels."""
    s = max(resize, crop) / min(w, h)
    rw, rh = round(w * s), round(h * s)
    sx, sy = rw / w, rh / h
    left, top = (rw - crop) // 2, (rh - crop) // 2
    return left / sx, top / sy, crop / sx, crop / sy


def crop_resize(img: Image.Image, box: Box, size: int, draft: bool = True) -> Image.Image:
    """The crop `box` of a not-yet-decoded Pillow image, resized to size x size. A JPEG whose
    crop is at least 2x the output is decoded at reduced DCT scale (PIL draft) first."""
    x, y, w, h = box
    W, H = img.size
    if draft and img.format == "JPEG" and min(w, h) >= 2 * size:
        img.draft("RGB", (math.ceil(W * size / w), math.ceil(H * size / h)))
    sx, sy = img.size[0] / W, img.size[1] / H  # the scale draft chose (1 when none)
    if img.mode != "RGB":  # (an RGB JPEG is not copied by a no-op convert)
        img = to_rgb(img)  # 16-bit pictures scaled, not clipped to white
    return img.resize((size, size), Image.Resampling.BILINEAR,
                      box=(x * sx, y * sy, (x + w) * sx, (y + h) * sy))


def decode_crop(data: bytes, choose_box: Callable[[int, int], Box], size: int,
                region: bool = True) -> Image.Image:
    """The region `choose_box(width, height)` of an encoded image, resized to size x size
    (see the module docstring for which decoder runs)."""
    sof = jpeg_sof(data)
    problem = sof and size_problem(sof[0], sof[1])  # before anything is allocated
    if problem:
        raise ValueError(problem)
    box = None
    # grayscale or colour 8-bit JPEG, complete (ends with EOI: the region decoder never reads
    # past the region, so a truncated file would otherwise pass unnoticed when the crop fits)
    if region and jpeg_region.available() and sof is not None and sof[2] in (1, 3) and \
            complete_jpeg(data):
        box = choose_box(sof[0], sof[1])
        img = jpeg_region.decode_region(data, box, size)
        if img is not None:
            return img
    img = Image.open(io.BytesIO(data))
    problem = size_problem(*img.size)
    if problem:
        raise ValueError(problem)
    return crop_resize(img, box or choose_box(*img.size), size)


def pixels(img: Image.Image) -> np.ndarray:
    """H x W x 3 uint8 (read-only: one copy out of Pillow; collation copies it into the
    batch)."""
    return np.asarray(img)


def _jitter(img: Image.Image, strength: float, rng: random.Random) -> Image.Image:
    enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    rng.shuffle(enhancers)  # random order, as torchvision's ColorJitter
    for enhancer in enhancers:
        img = enhancer(img).enhance(rng.uniform(1 - strength, 1 + strength))
    return img


CODE_ERRORS = (TypeError, NameError, AttributeError)  # bugs: never turned into skips


def sample_error(sample: dict, exc: Exception) -> SampleError:
    """The error for a sample that cannot be used: shard, member and reason."""
    where = f"{sample.get('__url__', '?')}: member {sample.get('__key__', '?')}.jpg"
    return SampleError(f"{where}: {type(exc).__name__}: {exc}")


class TrainDecoder:
    """sample -> (H x W x 3 uint8, label): RandomResizedCrop, flip (as a view), optional
    rotation and colour jitter; a per-worker random stream seeded from `seed`. A class, not
    a closure: DataLoader workers start from a forkserver and receive it pickled."""

    def __init__(self, size: int, min_scale: float, hflip: bool, seed: int,
                 rotation: float = 0.0, color_jitter: float = 0.0, region: bool = True,
                 num_classes: int | None = None):
        self.size, self.min_scale, self.hflip, self.seed = size, min_scale, hflip, seed
        self.rotation, self.color_jitter, self.region = rotation, color_jitter, region
        self.num_classes = num_classes
        self.rng: random.Random | None = None  # per worker, per epoch (workers are new)

    def __call__(self, sample: dict) -> tuple[np.ndarray, int]:
        if self.rng is None:
            self.rng = random.Random(derive_seed(self.seed, worker_slot()[0]))
        rng = self.rng
        try:
            label = sample_label(sample, self.num_classes)
            img = decode_crop(sample["jpg"],
                              lambda w, h: rrc_box(w, h, (self.min_scale, 1.0), rng),
                              self.size, self.region)
        except CODE_ERRORS:
            raise
        except Exception as exc:  # name shard + member (Pillow raises many kinds)
            raise sample_error(sample, exc) from exc
        flip = self.hflip and rng.random() < 0.5
        if self.rotation:
            img = img.rotate(rng.uniform(-self.rotation, self.rotation),
                             Image.Resampling.BILINEAR)
        if self.color_jitter:
            img = _jitter(img, self.color_jitter, rng)
        out = pixels(img)
        return (out[:, ::-1] if flip else out), label


def sample_label(sample: dict, num_classes: int | None, labelled: bool = True) -> int:
    """The sample's `cls`, checked: a class of the model (0..num_classes-1), or -1 / no
    `cls` only in a split without labels (test). Anything else would be an IndexError in
    the loss, or a sample silently counted as unlabelled."""
    if "cls" not in sample:
        if labelled:
            raise ValueError("no cls member (this split is labelled)")
        return -1
    label = int(sample["cls"])
    if label == -1 and not labelled:
        return -1
    if label < 0:
        raise ValueError(f"label {label}: an unlabelled sample in a labelled split")
    if num_classes is not None and label >= num_classes:
        raise ValueError(f"cls {label} is outside 0..{num_classes - 1} (the model's "
                         f"{num_classes} classes)")
    return label


def sample_origin(sample: dict) -> tuple[str, int, int]:
    """(source path, shard number, member number) of an evaluated sample, from the sample
    itself: its `json` (`source`, as `prep shard` writes it; `filename` in timm's shards;
    else the key) and its place in the shards (read_shards' `__pos__`)."""
    source = sample["__key__"]
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
            found = meta.get("source") or meta.get("filename") if isinstance(meta, dict) \
                else None
            source = found if isinstance(found, str) and found else source
        except ValueError:
            pass  # not JSON: the key names the sample
    shard, pos = sample.get("__pos__", (-1, -1))
    return source, shard, pos


class ValDecoder:
    """sample -> (crop x crop x 3 uint8, label or -1, key, origin): the standard resize +
    center crop, computed as one resize of the kept region; origin: sample_origin."""

    def __init__(self, resize: int, crop: int, region: bool = True,
                 num_classes: int | None = None, labelled: bool = True):
        self.resize, self.crop, self.region = resize, crop, region
        self.num_classes, self.labelled = num_classes, labelled

    def __call__(self, sample: dict) -> tuple[np.ndarray, int, str]:
        try:
            label = sample_label(sample, self.num_classes, self.labelled)
            img = decode_crop(sample["jpg"],
                              lambda w, h: center_box(w, h, self.resize, self.crop),
                              self.crop, self.region)
        except CODE_ERRORS:
            raise
        except Exception as exc:
            raise sample_error(sample, exc) from exc
        return pixels(img), label, sample["__key__"], sample_origin(sample)
