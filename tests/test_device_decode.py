"""`--decode gpu` logic, run on the CPU (torchvision decodes there when device="cpu"): the
same crops as the CPU path, per-image fallback for what nvJPEG refuses, and clear errors."""

import io

import numpy as np
import pytest
import torch

from prep.synth import render_class_image
from train.data import collate
from train.decode import TrainDecoder, ValDecoder
from train.device_decode import (
    DeviceDecoder,
    RawTrainDecoder,
    RawValDecoder,
    collate_raw,
    nvjpeg_works,
)


def _img(w, h, mode="RGB", fmt="JPEG", seed=0) -> bytes:
    img = render_class_image(seed % 10, 10, np.random.default_rng(seed), max(w, h)).resize((w, h))
    buf = io.BytesIO()
    img.convert(mode).save(buf, fmt, quality=90)
    return buf.getvalue()


def _samples():
    return [{"jpg": _img(300 + 20 * i, 220, seed=i), "cls": str(i).encode(), "__key__": f"k{i}"}
            for i in range(6)]


def test_device_train_path_matches_cpu_path():
    """Same seed -> same boxes and flips; pixels within a little of the CPU path."""
    samples = _samples()
    cpu_dec, raw_dec = TrainDecoder(64, 0.2, True, 7), RawTrainDecoder(0.2, True, 7)
    cpu_batch, cpu_labels = collate([cpu_dec(s) for s in samples])
    raw, labels = collate_raw([raw_dec(s) for s in samples])
    dev = DeviceDecoder(torch.device("cpu"), 64)(raw)
    assert dev.shape == cpu_batch.shape == (6, 3, 64, 64) and dev.dtype == torch.uint8
    assert torch.equal(labels, cpu_labels) and 0 < int(raw[2].sum()) < 6  # some flips
    diff = (dev.float() - cpu_batch.float()).abs().mean(dim=(1, 2, 3))
    assert diff.max() < 3.0, diff  # decoders and resize kernels differ by rounding only
    wrong = (dev.float() - cpu_batch.flip(3).float()).abs().mean(dim=(1, 2, 3))
    assert (wrong > 3 * diff).all()  # a flip mix-up would show


def test_device_val_path_matches_cpu_path():
    samples = _samples()
    cpu = collate([ValDecoder(72, 64)(s) for s in samples])
    raw, labels, keys, _ = collate_raw([RawValDecoder(72, 64)(s) for s in samples])
    dev = DeviceDecoder(torch.device("cpu"), 64)(raw)
    assert list(keys) == list(cpu[2]) and torch.equal(labels, cpu[1])
    assert (dev.float() - cpu[0].float()).abs().mean() < 3.0


def test_refused_images_fall_back_one_by_one():
    samples = _samples()[:3]
    samples[1] = {"jpg": _img(200, 150, "CMYK", seed=1), "cls": b"1", "__key__": "cmyk"}
    samples.append({"jpg": _img(200, 150, fmt="PNG", seed=2), "cls": b"2", "__key__": "png"})
    prepare = RawTrainDecoder(0.5, False, 0)
    raw, _ = collate_raw([prepare(s) for s in samples])
    decoder = DeviceDecoder(torch.device("cpu"), 32)
    out = decoder(raw)
    assert out.shape == (4, 3, 32, 32) and decoder.fallbacks >= 1
    assert out.float().std() > 5  # real pixels, not an empty buffer


def test_undecodable_image_raises_a_clear_error():
    raw, _ = collate_raw([RawTrainDecoder(0.5, False, 0)(
        {"jpg": _img(100, 80), "cls": b"0", "__key__": "a", "__url__": "s.tar"})])
    broken = ([raw[0][0][:200]], *raw[1:])  # a JPEG cut short
    with pytest.raises(ValueError, match=r"s\.tar: member a\.jpg: undecodable"):
        DeviceDecoder(torch.device("cpu"), 32)(broken)


def test_nvjpeg_detection_is_false_without_cuda():
    assert nvjpeg_works(torch.device("cpu")) is False
