"""WebDataset input pipelines for DDP training and exact evaluation (STREAMING.md).

Train: shards shuffled per epoch identically on every rank (seed + epoch), split by rank
then by worker, a sample shuffle buffer before decode, decode + RandomResizedCrop + flip
to uint8 in the workers, batches built in the workers. The shard stream repeats, and the
loader is cut at the same number of steps on every rank (`with_epoch`), so a rank whose
shards hold fewer samples can never leave the others waiting in an all-reduce.

Eval: every sample exactly once across ranks, no repeat, no padding; shards split by rank
then worker, or, when there are fewer shards than ranks x workers, every worker reads all
shards and keeps every (ranks x workers)-th sample.
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)  # ImageNet statistics, on the 0..255 scale
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass
class SplitInfo:
    urls: list[str]
    num_samples: int
    num_classes: int


def read_split(data: str, split: str) -> SplitInfo:
    """Shard URLs and counts from `_info.json` (a local dir written by `prep shard`)."""
    info_file = Path(data) / "_info.json"
    if not info_file.is_file():
        raise FileNotFoundError(f"{info_file}: missing; --data must be a `prep shard` output")
    info = json.loads(info_file.read_text())
    if split not in info["splits"]:
        raise KeyError(f"{info_file}: no split {split!r} (has {sorted(info['splits'])})")
    s = info["splits"][split]
    return SplitInfo([str(Path(data) / f) for f in s["filenames"]], s["num_samples"],
                     info["num_classes"])


def _worker() -> tuple[int, int]:
    w = torch.utils.data.get_worker_info()
    return (w.id, w.num_workers) if w else (0, 1)


class EpochShards(torch.utils.data.IterableDataset):
    """Yields {"url": ...} for this rank and worker. Train: a fresh permutation per epoch,
    the same on all ranks, repeated forever (the loader decides where an epoch ends)."""

    def __init__(self, urls: list[str], rank: int, world: int, seed: int, epoch: int,
                 repeat: bool):
        self.urls, self.rank, self.world = urls, rank, world
        self.seed, self.epoch, self.repeat = seed, epoch, repeat

    def __iter__(self):
        worker, workers = _worker()
        for ep in count(self.epoch) if self.repeat else [self.epoch]:
            order = list(self.urls)
            if self.repeat:
                random.Random(self.seed * 100_003 + ep).shuffle(order)
            for url in order[self.rank :: self.world][worker::workers]:
                yield {"url": url}


class AllShards(torch.utils.data.IterableDataset):
    """Eval fallback: every worker reads every shard (then `keep_every` picks its samples)."""

    def __init__(self, urls: list[str]):
        self.urls = urls

    def __iter__(self):
        for url in self.urls:
            yield {"url": url}


def keep_every(rank: int, world: int):
    def select(samples):
        worker, workers = _worker()
        slot, slots = rank * workers + worker, world * workers
        for i, s in enumerate(samples):
            if i % slots == slot:
                yield s

    return select


class SkipCounter:
    """Counts decode/read failures; raises once they exceed `max_rate` of samples seen
    (webdataset's warn_and_continue sleeps 0.5 s per error and never stops)."""

    def __init__(self, max_rate: float):
        self.max_rate, self.errors, self.seen = max_rate, 0, 0

    def __call__(self, exc: Exception) -> bool:
        if isinstance(exc, (TypeError, NameError, AttributeError)):
            return False  # a code error: never swallowed
        self.errors += 1
        if self.errors > max(10, self.max_rate * self.seen):  # allow a few at the start
            raise RuntimeError(f"{self.errors} unreadable samples out of ~{self.seen}: above "
                               f"max_skip_rate {self.max_rate}; last: {exc}") from exc
        print(f"warning: skipping a sample: {exc}", flush=True)
        return True

    def count(self, samples):
        """Pipeline stage: counts samples that reached decoding."""
        for s in samples:
            self.seen += 1
            yield s


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


def _to_uint8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def train_size(cfg, epoch: int) -> int:
    """Train crop size of an epoch: FFCV progressive resizing (e.g. 160 -> 192), in steps of
    32 px, linear up to `progressive_end_epoch`; `image_size` when it is off."""
    if not cfg.progressive_start or epoch >= cfg.progressive_end_epoch:
        return cfg.image_size
    frac = epoch / max(cfg.progressive_end_epoch, 1)
    size = cfg.progressive_start + frac * (cfg.image_size - cfg.progressive_start)
    return int(round(size / 32) * 32)


def _jitter(img: Image.Image, strength: float, rng: random.Random) -> Image.Image:
    from PIL import ImageEnhance

    enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    rng.shuffle(enhancers)  # random order, as torchvision's ColorJitter
    for enhancer in enhancers:
        img = enhancer(img).enhance(rng.uniform(1 - strength, 1 + strength))
    return img


def crop_resize(img: Image.Image, box: tuple[int, int, int, int], size: int,
                draft: bool = True) -> Image.Image:
    """The crop `box` (left, top, width, height) of a not-yet-decoded image, resized to
    size x size. The box is chosen before decoding, so a JPEG whose crop is at least 2x the
    output is decoded at 1/2, 1/4 or 1/8 scale by libjpeg (PIL draft) and only then cropped
    and resized: the same picture for a fraction of the decode work."""
    x, y, w, h = box
    W, H = img.size
    if draft and img.format == "JPEG" and min(w, h) >= 2 * size:
        img.draft("RGB", (math.ceil(W * size / w), math.ceil(H * size / h)))
    sx, sy = img.size[0] / W, img.size[1] / H  # the scale draft chose (1 when none)
    return img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR,
                                     box=(x * sx, y * sy, (x + w) * sx, (y + h) * sy))


def worker_init(_: int) -> None:
    """DataLoader workers: keep Pillow's image buffers in the heap (see shards.image)."""
    from shards.image import keep_image_buffers_in_heap

    keep_image_buffers_in_heap()


def train_decoder(size: int, min_scale: float, hflip: bool, seed: int,
                  rotation: float = 0.0, color_jitter: float = 0.0):
    state: dict = {}

    def decode(sample: dict) -> tuple[torch.Tensor, int]:
        if "rng" not in state:  # per worker, per epoch (workers are new each epoch)
            worker, _ = _worker()
            state["rng"] = random.Random(seed * 1_000_003 + worker)
        rng = state["rng"]
        try:
            img = Image.open(io.BytesIO(sample["jpg"]))
            box = rrc_box(*img.size, (min_scale, 1.0), rng)
            img = crop_resize(img, box, size)
        except (OSError, SyntaxError, ValueError, KeyError) as exc:  # name shard + member
            where = f"{sample.get('__url__', '?')}: member {sample.get('__key__', '?')}.jpg"
            raise ValueError(f"{where}: {type(exc).__name__}: {exc}") from exc
        if hflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rotation:
            img = img.rotate(rng.uniform(-rotation, rotation), Image.Resampling.BILINEAR)
        if color_jitter:
            img = _jitter(img, color_jitter, rng)
        return _to_uint8(img), int(sample["cls"])

    return decode


def val_decoder(resize: int, crop: int):
    def decode(sample: dict) -> tuple[torch.Tensor, int, str]:
        img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        w, h = img.size
        s = resize / min(w, h)
        img = img.resize((max(crop, round(w * s)), max(crop, round(h * s))),
                         Image.Resampling.BILINEAR)
        left, top = (img.width - crop) // 2, (img.height - crop) // 2
        img = img.crop((left, top, left + crop, top + crop))
        label = int(sample["cls"]) if "cls" in sample else -1
        return _to_uint8(img), label, sample["__key__"]

    return decode


def collate(batch: list[tuple]) -> tuple:
    cols = list(zip(*batch))
    return (torch.stack(cols[0]), torch.tensor(cols[1], dtype=torch.long), *cols[2:])


def train_steps(num_samples: int, world: int, batch_size: int) -> int:
    """Steps per epoch, the same on every rank: full global batches only."""
    return num_samples // (world * batch_size)


def make_train_loader(split: SplitInfo, cfg, rank: int, world: int, epoch: int,
                      skips: SkipCounter, pin: bool = False) -> wds.WebLoader:
    workers = max(cfg.workers, 1)
    if len(split.urls) < world * workers:
        raise ValueError(
            f"{len(split.urls)} train shards for {world} ranks x {workers} workers: every "
            "worker needs at least one shard. Use fewer workers, or reshard with "
            f"`prep shard --num-shards {world * workers}` (or a multiple)")
    steps = train_steps(split.num_samples, world, cfg.batch_size)
    if steps == 0:
        raise ValueError(f"{split.num_samples} train samples are fewer than one global batch "
                         f"({world} x {cfg.batch_size})")
    seed = cfg.seed * 7919 + epoch * 104_729 + rank
    pipeline = wds.DataPipeline(
        EpochShards(split.urls, rank, world, cfg.seed, epoch, repeat=True),
        wds.tarfile_to_samples(handler=skips),
        skips.count,
        wds.shuffle(cfg.shuffle_buffer, initial=min(cfg.shuffle_buffer, 1000),
                    rng=random.Random(seed)),
        wds.map(train_decoder(train_size(cfg, epoch), cfg.min_scale, cfg.hflip, seed,
                              cfg.rotation, cfg.color_jitter), handler=skips),
        wds.batched(cfg.batch_size, collation_fn=collate, partial=False),
    )
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=cfg.workers,
                           pin_memory=pin, persistent_workers=False, worker_init_fn=worker_init)
    return loader.with_epoch(steps)


def make_eval_loader(split: SplitInfo, cfg, rank: int, world: int, batch_size: int,
                     pin: bool = False) -> wds.WebLoader:
    workers = max(cfg.workers, 1)
    if len(split.urls) >= world * workers:
        stages = [EpochShards(split.urls, rank, world, 0, 0, repeat=False),
                  wds.tarfile_to_samples()]
    else:  # too few shards: split at the sample level instead
        stages = [AllShards(split.urls), wds.tarfile_to_samples(), keep_every(rank, world)]
    pipeline = wds.DataPipeline(
        *stages,
        wds.map(val_decoder(cfg.val_resize, cfg.val_crop)),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=cfg.workers, pin_memory=pin,
                         worker_init_fn=worker_init)
