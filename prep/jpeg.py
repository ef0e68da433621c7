"""Facts about image files that every decode path shares: the JPEG header, whether a file
is whole, the pixel limit, and the one conversion to 8-bit RGB.

- `jpeg_sof`: width, height and components from the SOF marker, without decoding.
- `size_problem`: dimensions of 0, or more pixels than Pillow's default limit
  (`MAX_PIXELS`, its `Image.MAX_IMAGE_PIXELS`), are refused by every path (region decoder,
  Pillow, device) *before* anything is allocated: a 3 KB progressive JPEG that claims
  45000 x 45000 would take gigabytes and seconds, then decode as grey.
- `strict_problem`: a full entropy decode through libjpeg-turbo (prep/jpegcheck.c) that
  treats libjpeg's "premature end of data" warning as corrupt: a truncated JPEG with an
  EOI marker appended decodes without error in Pillow, its lower part flat grey.
- `to_rgb`: the one conversion of a decoded picture to 8-bit RGB; 16-bit and float modes
  are scaled, not clipped (a 16-bit PNG clipped to 8 bits is ~99% white).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import TYPE_CHECKING

from prep import cbuild

if TYPE_CHECKING:
    from PIL import Image

MAX_PIXELS = 89_478_485  # Pillow's default Image.MAX_IMAGE_PIXELS (~0.25 GB of 24-bit RGB)

SOURCE = Path(__file__).with_name("jpegcheck.c")
LIBRARY = Path(__file__).with_name("_jpegcheck.so")

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_sof(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from an 8-bit JPEG's SOF marker, or None when the data
    is anything else. Walking the marker segments takes a few µs; PIL's header parser
    takes ~86 µs here, which is most of the per-image cost of pass-through sharding."""
    if not data.startswith(b"\xff\xd8"):
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF:
            if data[i + 4] != 8:  # 12-bit JPEGs: let PIL decide
                return None
            h, w = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
            return w, h, data[i + 9]
        if marker == 0xDA:  # start of scan before any SOF: malformed
            return None
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def complete_jpeg(data: bytes) -> bool:
    """A JPEG ends with the EOI marker; truncated downloads do not. Cheap (no decode)."""
    return data.endswith(b"\xff\xd9") or data.rstrip(b"\0\r\n ")[-2:] == b"\xff\xd9"


def size_problem(width: int, height: int) -> str | None:
    """Why an image of this size is refused (None: it is fine)."""
    if width <= 0 or height <= 0:
        return f"image is {width}x{height} pixels"
    if width * height > MAX_PIXELS:
        return (f"image is {width}x{height} = {width * height:,} pixels, above the limit of "
                f"{MAX_PIXELS:,} (Pillow's MAX_IMAGE_PIXELS): refused before decoding")
    return None


_lib = cbuild.load(LIBRARY, "jc_check", ctypes.c_int,
                   [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulonglong,
                    ctypes.POINTER(ctypes.c_int), ctypes.c_char_p])


def available() -> bool:
    """True when the strict check is built (scripts/setup.sh); without it `strict_problem`
    decodes with Pillow, which cannot see a truncated JPEG that ends in EOI."""
    return _lib is not None


def check_function_address() -> int | None:
    """Address of the C check, for shards/tarpack.c to call on every pass-through JPEG."""
    return ctypes.cast(_lib.jc_check, ctypes.c_void_p).value if _lib else None


def strict_problem(data: bytes) -> str | None:
    """Why this image is not whole (None: it decodes completely). JPEGs go through libjpeg
    with warnings as errors; anything else through Pillow, with the size limit first."""
    if _lib is not None and data.startswith(b"\xff\xd8"):
        dims = (ctypes.c_int * 3)()
        msg = ctypes.create_string_buffer(200)
        code = _lib.jc_check(data, len(data), MAX_PIXELS, dims, msg)
        text = msg.value.decode("ascii", "replace")
        if code == 0:
            return None
        return f"cannot decode (libjpeg: {text})" if code in (1, 2) else text
    return pillow_problem(data)


def pillow_problem(data: bytes) -> str | None:
    """Decode with Pillow after the size check (the path for PNG and other formats)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            problem = size_problem(*im.size)
            if problem:
                return problem
            im.load()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
        return f"cannot decode ({type(exc).__name__}: {exc})"
    return None


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB of a decoded (or lazily opened) Pillow image, keeping the picture: 16-bit
    and 32-bit integer modes are scaled down by their range, float images from 0..1 or
    their range; other modes convert as Pillow does (CMYK, grayscale, palette, alpha)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        import numpy as np
        from PIL import Image as PILImage

        a = np.asarray(im).astype(np.float64)
        top = float(a.max()) if a.size else 0.0
        if im.mode.startswith("I;16") or 255 < top <= 65535:
            a = a / 257.0  # 0..65535 -> 0..255
        elif im.mode == "F" and top <= 1.0:
            a = a * 255.0
        elif top > 255:
            low = float(a.min())
            a = (a - low) * (255.0 / (top - low))
        gray = PILImage.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
        return gray.convert("RGB")
    return im.convert("RGB")


if __name__ == "__main__":
    cbuild.main(SOURCE, LIBRARY, ("-ljpeg",), "truncated JPEGs that end in EOI are not caught")
