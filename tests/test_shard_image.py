import io

import numpy as np
import pytest
from PIL import Image

from prep.synth import bad_file_bytes, encode_jpeg, render_class_image
from shards.image import UndecodableImage, encode_image
from tests.conftest import png16, truncated_with_eoi


def _photo(w=500, h=375):
    rng = np.random.default_rng(0)
    return render_class_image(3, 10, rng, max(w, h)).resize((w, h))


def test_good_jpeg_is_stored_byte_for_byte():
    data = encode_jpeg(_photo())
    out, info = encode_image(data)
    assert out is data and info.repaired is None and not info.resized
    out, info = encode_image(data, max_size=512)  # already small enough: no re-encode
    assert out is data


@pytest.mark.parametrize("kind,reason", [("cmyk", "cmyk"), ("png", "png"),
                                         ("gray", "grayscale")])
def test_repairs_become_rgb_jpeg(kind, reason):
    out, info = encode_image(bad_file_bytes(kind, _photo()))
    im = Image.open(io.BytesIO(out))
    assert im.format == "JPEG" and im.mode == "RGB" and im.size == (500, 375)
    assert info.repaired == reason


def test_truncated_and_garbage_are_undecodable():
    with pytest.raises(UndecodableImage, match="cannot decode"):
        encode_image(bad_file_bytes("truncated", _photo()))
    with pytest.raises(UndecodableImage, match="not an image"):
        encode_image(b"<html>404</html>")


@pytest.mark.parametrize("w,h,max_size,expected", [
    (500, 375, 384, (384, 288)), (375, 500, 384, (288, 384)),
    (1600, 1200, 384, (384, 288)),  # >= 2x: decoded at reduced DCT scale first
    (300, 200, 384, (300, 200)),  # never upscaled
])
def test_max_size_keeps_aspect_and_never_upscales(w, h, max_size, expected):
    src = _photo(w, h)
    out, info = encode_image(encode_jpeg(src), max_size=max_size, quality=90)
    im = Image.open(io.BytesIO(out))
    assert im.size == expected and (info.width, info.height) == expected
    assert info.resized == (expected != (w, h))
    if info.resized:  # same picture: small mean error against a plain resize
        ref = np.asarray(src.resize(expected, Image.Resampling.BICUBIC), dtype=np.float32)
        assert np.abs(np.asarray(im, dtype=np.float32) - ref).mean() < 8


@pytest.mark.parametrize("kind,comps", [(None, 3), ("cmyk", 4), ("gray", 1)])
def test_jpeg_sof_scan_agrees_with_pil(kind, comps):
    from prep.jpeg import jpeg_sof

    img = _photo(320, 200)
    data = bad_file_bytes(kind, img) if kind else encode_jpeg(img)
    assert jpeg_sof(data) == (320, 200, comps)
    progressive = io.BytesIO()
    img.save(progressive, "JPEG", progressive=True, quality=80)
    assert jpeg_sof(progressive.getvalue()) == (320, 200, 3)
    assert jpeg_sof(bad_file_bytes("png", img)) is None and jpeg_sof(b"") is None


def test_allocator_tuning_applies_on_glibc():
    import platform

    from prep.workers import keep_image_buffers_in_heap

    ok = keep_image_buffers_in_heap()
    assert ok == (platform.libc_ver()[0] == "glibc")


def test_region_and_strict_check_agree_on_np_data():
    """Sanity: a normal image passes every check (the checks are not just refusing)."""
    from prep import jpeg
    from prep.synth import encode_jpeg, render_class_image

    data = encode_jpeg(render_class_image(0, 3, np.random.default_rng(3), 80))
    assert jpeg.size_problem(*jpeg.jpeg_sof(data)[:2]) is None
    assert jpeg.strict_problem(data) is None


def test_16bit_png_repair_keeps_the_picture():
    buf = io.BytesIO()
    ramp = png16(buf)
    jpg, info = encode_image(buf.getvalue())
    assert info.repaired == "png"
    out = np.asarray(Image.open(io.BytesIO(jpg)).convert("L"), dtype=np.float64)
    expected = ramp / 257.0
    assert abs(out.mean() - expected.mean()) < 3  # was ~254: 99% white
    assert out.std() > 0.9 * expected.std()
    assert np.corrcoef(out.ravel(), expected.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpeg_with_eoi_is_undecodable(progressive):
    from prep import jpeg

    if not jpeg.available():
        pytest.skip("the strict JPEG check (prep/jpegcheck.c) was not built")
    data = truncated_with_eoi(progressive)
    Image.open(io.BytesIO(data)).load()  # what made it pass: Pillow decodes it without error
    assert "premature end of data" in jpeg.strict_problem(data)
    with pytest.raises(UndecodableImage, match="premature end"):
        encode_image(data)
    good = encode_jpeg(render_class_image(1, 3, np.random.default_rng(1), 96))
    assert jpeg.strict_problem(good) is None


def test_an_empty_file_is_named_so():
    """0 bytes: one message on every path (not Pillow's, which names a memory address)."""
    with pytest.raises(UndecodableImage, match=r"^empty file \(0 bytes\)$"):
        encode_image(b"")
