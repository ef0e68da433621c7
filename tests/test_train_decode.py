"""Fast decode paths give the same crops as the plain Pillow path (same box -> same pixels)."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from prep.synth import render_class_image
from tests.conftest import png16
from train.data import collate
from train.decode import TrainDecoder, ValDecoder, center_box, crop_resize, decode_crop, pixels


def _jpeg(w=500, h=375, mode="RGB", fmt="JPEG") -> bytes:
    img = render_class_image(3, 10, np.random.default_rng(2), max(w, h))
    img = img.resize((w, h)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, quality=90)
    return buf.getvalue()


def _plain(data: bytes, box, size) -> np.ndarray:
    """The straightforward path: full Pillow decode, crop, resize."""
    x, y, w, h = box
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR,
                                 box=(x, y, x + w, y + h)), dtype=np.float32)


@pytest.mark.parametrize("box", [(0, 0, 500, 375), (10, 10, 460, 350), (40, 30, 200, 150),
                                 (100, 50, 330, 300), (333, 1, 167, 374), (0, 200, 80, 175)])
def test_region_decode_matches_plain_pillow(box, monkeypatch):
    from train import jpeg_region

    if not jpeg_region.available():  # no compiler or jpeglib.h: the set-up said so
        pytest.skip("the region decoder is not built (scripts/setup.sh)")
    calls = []
    real = jpeg_region.decode_region
    monkeypatch.setattr(jpeg_region, "decode_region",
                        lambda *a: calls.append(1) or real(*a))
    data = _jpeg()
    fast = np.asarray(decode_crop(data, lambda w, h: box, 160), dtype=np.float32)[:, :, :3]
    assert calls == [1] and real(data, box, 160) is not None  # the fast path ran
    plain = _plain(data, box, 160)
    assert fast.shape == plain.shape == (160, 160, 3)
    scaled = jpeg_region.scale_denominator(box[2], box[3], 160) > 1
    assert np.abs(fast - plain).mean() < (2.0 if scaled else 0.1)  # DCT scaling: near


def test_pillow_fallback_without_the_region_decoder(monkeypatch):
    from train import jpeg_region

    monkeypatch.setattr(jpeg_region, "available", lambda: False)
    box = (40, 30, 200, 150)
    data = _jpeg()
    out = np.asarray(decode_crop(data, lambda w, h: box, 96), dtype=np.float32)
    assert out.shape == (96, 96, 3) and np.abs(out - _plain(data, box, 96)).mean() < 0.1


@pytest.mark.parametrize("mode,fmt", [("CMYK", "JPEG"), ("L", "JPEG"), ("RGB", "PNG")])
def test_cmyk_png_and_gray_decode_too(mode, fmt):
    """CMYK and PNG through Pillow, grayscale through the region decoder: all RGB."""
    data = _jpeg(120, 90, mode, fmt)
    box = (10, 5, 80, 60)
    out = pixels(decode_crop(data, lambda w, h: box, 32))
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(np.float32) - _plain(data, box, 32)).mean() < 1.0


@pytest.mark.parametrize("cut", [3000, 700])
def test_damaged_jpeg_gives_a_clear_error_naming_the_member(cut):
    data = _jpeg()[:cut]  # libjpeg only warns on truncation: Pillow must report it
    dec = TrainDecoder(64, 0.5, False, 0)
    with pytest.raises(ValueError, match=r"s\.tar: member k1\.jpg: OSError"):
        dec({"jpg": data, "cls": b"1", "__key__": "k1", "__url__": "s.tar"})


@pytest.mark.parametrize("resize,crop,tol", [(256, 224, 0.5), (73, 64, 2.0)])  # 2nd: draft
def test_val_region_resize_equals_resize_then_center_crop(resize, crop, tol):
    data = _jpeg(500, 375)
    img = Image.open(io.BytesIO(data)).convert("RGB")
    s = resize / 375
    big = img.resize((round(500 * s), resize), Image.Resampling.BILINEAR)
    left, top = (big.width - crop) // 2, (big.height - crop) // 2
    ref = np.asarray(big.crop((left, top, left + crop, top + crop)), dtype=np.float32)
    out, label, key, origin = ValDecoder(resize, crop)({"jpg": data, "cls": b"2",
                                                        "__key__": "v"})
    assert origin == ("v", -1, -1)  # no json: the key names it
    assert (label, key) == (2, "v") and out.shape == (crop, crop, 3)
    assert np.abs(out.astype(np.float32) - ref).mean() < tol
    x, y, w, h = center_box(500, 375, resize, crop)
    assert abs(w / (crop / s) - 1) < 0.01 and abs(h / (crop / s) - 1) < 0.01  # rounding
    assert abs(x + w / 2 - 250) < 3 and abs(y + h / 2 - 187.5) < 3


def test_train_decoder_same_geometry_as_plain_path_and_flip_in_collate():
    """Same seed -> same boxes and flips as the plain path; the batch holds flipped pixels."""
    from train.decode import derive_seed, rrc_box

    data = _jpeg()
    dec = TrainDecoder(96, 0.08, True, seed=5)
    outs = [dec({"jpg": data, "cls": b"1"}) for _ in range(6)]
    rng = random.Random(derive_seed(5, 0))  # the worker's stream (worker 0)
    batch, labels = collate(outs)
    assert batch.shape == (6, 3, 96, 96) and batch.dtype == torch.uint8
    assert labels.tolist() == [1] * 6
    flips = 0
    for i in range(6):
        box = rrc_box(500, 375, (0.08, 1.0), rng)
        ref = _plain(data, box, 96)
        if rng.random() < 0.5:
            ref, flips = ref[:, ::-1], flips + 1
        got = batch[i].permute(1, 2, 0).numpy().astype(np.float32)
        assert np.abs(got - ref).mean() < 4.0  # boxes >= 2x the output take the draft path
        assert np.abs(got - ref[:, ::-1]).mean() > 10  # a wrong flip would show
    assert 0 < flips < 6  # both cases exercised with this seed


def test_crop_resize_keeps_working_on_non_rgb_modes():
    img = Image.open(io.BytesIO(_jpeg(100, 80, "L")))
    assert crop_resize(img, (0, 0, 100, 80), 20).mode == "RGB"


def test_16bit_png_in_the_loader_keeps_the_picture():
    from train.decode import decode_crop

    buf = io.BytesIO()
    ramp = png16(buf)
    img = decode_crop(buf.getvalue(), lambda w, h: (0, 0, w, h), 32)
    out = np.asarray(img.convert("L"), dtype=np.float64)
    assert abs(out.mean() - ramp.mean() / 257) < 4 and out[:, -4:].mean() > out[:, :4].mean()
