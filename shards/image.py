"""What goes into a shard's `jpg`: the original bytes when they are a good RGB JPEG that
needs no resize, otherwise an RGB JPEG re-encoded once.

Repairs (docs/design-notes.md): CMYK JPEG, PNG named .JPEG, grayscale -> RGB JPEG. Pre-resizing
(FFCV-style, `max_size`): shrink so the longer side is at most max_size, keep aspect,
never upscale; JPEGs are decoded at a reduced DCT scale (PIL draft) when shrinking by 2x
or more, which skips most of the decode work.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from prep.jpeg import complete_jpeg, jpeg_sof, size_problem, strict_problem, to_rgb

REPAIR_QUALITY = 95  # re-encoding a repaired image: keep it close to the original


class UndecodableImage(Exception):
    """The file is not an image Pillow can decode (truncated, corrupt, empty)."""


@dataclass
class ImageInfo:
    format: str  # original format: JPEG, PNG, ...
    mode: str  # original mode: RGB, CMYK, L, ...
    width: int  # stored image size
    height: int
    orig_width: int
    orig_height: int
    repaired: str | None  # why it was converted: "cmyk", "png", "grayscale", ...
    resized: bool


def _repair_reason(fmt: str, mode: str) -> str | None:
    if fmt != "JPEG":
        return (fmt or "unknown").lower()
    if mode == "CMYK":
        return "cmyk"
    if mode in ("L", "1", "LA"):
        return "grayscale"
    if mode != "RGB":
        return mode.lower()
    return None


def target_size(w: int, h: int, max_size: int) -> tuple[int, int]:
    scale = max_size / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def encode_image(data: bytes, max_size: int | None = None, quality: int = 90,
                 strict: bool = True) -> tuple[bytes, ImageInfo]:
    """(bytes to store, what was done). Raises UndecodableImage for broken files: not an
    image, size 0 or above prep.jpeg.MAX_PIXELS, damaged data; with `strict`, also a JPEG
    whose entropy data ends early (prep.jpeg.strict_problem)."""
    if not data:  # (Pillow would try every format's plugin, and name a memory address)
        raise UndecodableImage("empty file (0 bytes)")
    sof = jpeg_sof(data)
    if sof:
        problem = size_problem(sof[0], sof[1]) or (strict and strict_problem(data))
        if problem:
            raise UndecodableImage(problem)
        if sof[2] == 3 and complete_jpeg(data) and (not max_size or max(sof[:2]) <= max_size):
            w, h, _ = sof  # the common case: no PIL at all
            return data, ImageInfo("JPEG", "RGB", w, h, w, h, None, False)
    from PIL import Image  # here: pass-through never needs it (~40 ms of start-up)

    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
        fmt, mode, (w, h) = im.format or "", im.mode, im.size
    except Exception as exc:
        raise UndecodableImage(f"not an image ({type(exc).__name__}: {exc})") from exc
    problem = size_problem(w, h) or (strict and not sof and fmt == "JPEG"
                                     and strict_problem(data))
    if problem:
        raise UndecodableImage(problem)
    repair = _repair_reason(fmt, mode)
    shrink = bool(max_size) and max(w, h) > max_size
    if not repair and not shrink and complete_jpeg(data):
        return data, ImageInfo(fmt, mode, w, h, w, h, None, False)
    try:
        if shrink and fmt == "JPEG" and max(w, h) >= 2 * max_size:
            # DCT scaling 1/2, 1/4, 1/8. Only when it applies: a draft() that cannot scale
            # still changes the decode path and measured ~1.5x slower for a 1.3x shrink.
            im.draft("RGB", target_size(w, h, max_size))
        im.load()  # decodes; raises on truncated data
        im = to_rgb(im)  # 16-bit and float pictures are scaled, not clipped
    except Exception as exc:
        raise UndecodableImage(f"cannot decode ({type(exc).__name__}: {exc})") from exc
    if shrink:
        # BICUBIC, as Image.thumbnail: 1.2x faster than LANCZOS here with Pillow-SIMD
        im = im.resize(target_size(w, h, max_size), Image.Resampling.BICUBIC)
    elif not repair:  # a good JPEG that only lacked its end marker: keep it as it was
        return data, ImageInfo(fmt, mode, w, h, w, h, None, False)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality if shrink else REPAIR_QUALITY)
    return buf.getvalue(), ImageInfo(fmt, mode, im.width, im.height, w, h, repair, shrink)
