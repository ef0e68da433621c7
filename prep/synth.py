"""Synthetic, learnable class images for demos and tests.

Each class gets its own hue and stripe orientation/frequency; every image adds a
random phase, a distractor blob, brightness jitter and noise. Colour and
orientation survive RandomResizedCrop and flips, so a small CNN separates the
classes in a few CPU epochs, and a label bug shows up as chance accuracy.
"""

from __future__ import annotations

import colorsys
import io
import math

import numpy as np
from PIL import Image, ImageDraw

GOLDEN = 0.6180339887  # spreads class orientations evenly for any class count


def class_style(position: int, num_classes: int) -> tuple[tuple[float, float, float], float, float]:
    """(RGB in 0..1, stripe angle in radians, stripe period in px per 64 px) for a class."""
    hue = position / max(num_classes, 1)
    rgb = colorsys.hsv_to_rgb(hue, 0.75, 0.9)
    angle = math.pi * ((position * GOLDEN) % 1.0)
    period = (6.0, 10.0, 16.0)[position % 3]
    return rgb, angle, period


def render_class_image(position: int, num_classes: int, rng: np.random.Generator,
                       size: int) -> Image.Image:
    """An RGB image of class `position` (0-based within the sample); longer side `size` px."""
    aspect = rng.uniform(0.75, 1.0)  # ImageNet photos are mostly 4:3 landscape or portrait
    w, h = size, max(8, int(size * aspect))
    if rng.random() < 0.3:
        w, h = h, w
    rgb, angle, period = class_style(position, num_classes)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) * (64.0 / size)
    phase = rng.uniform(0, 2 * math.pi)
    wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period) + phase)
    light = 0.55 + 0.35 * wave[..., None]
    base = np.clip(np.asarray(rgb, dtype=np.float32) + rng.normal(0, 0.04, 3), 0, 1)
    pixels = light * base * rng.uniform(0.8, 1.15)
    pixels += rng.normal(0, 0.04, pixels.shape)
    img = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)  # a distractor blob of random colour and place
    cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.08, 0.2) * size
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    return img


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def bad_file_bytes(kind: str, img: Image.Image) -> bytes:
    """The files that break naive pipelines (docs/design-notes.md); the caller names them
    `.JPEG`."""
    buf = io.BytesIO()
    if kind == "cmyk":
        img.convert("CMYK").save(buf, format="JPEG", quality=90)
    elif kind == "png":
        img.save(buf, format="PNG")
    elif kind == "gray":
        img.convert("L").save(buf, format="JPEG", quality=90)
    elif kind == "truncated":
        data = encode_jpeg(img)
        return data[: len(data) // 2]
    else:
        raise ValueError(f"unknown bad file kind {kind!r}")
    return buf.getvalue()


BAD_KINDS = ("cmyk", "png", "gray", "truncated")
