"""Silent wrong labels found in the round of 2026-11-30. Each test failed on the code before
its fix (see docs/reliability.md, "Misuse, races and hostile files")."""

import io
import pickle
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from prep.cli import main as prep_main
from prep.errors import PrepError
from prep.export import load_classes, render
from prep.predictions import read_predictions
from prep.synth import encode_jpeg
from prep.synth import render_class_image as render_image
from shards.image import UndecodableImage, encode_image


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


def _scores(n, c=1000, seed=0):
    """Scores whose top-1 is class (7 * i) % c for sample i: the order can be read back."""
    rng = np.random.default_rng(seed)
    s = rng.random((n, c)).astype(np.float32) * 0.1
    for i in range(n):
        s[i, (7 * i) % c] = 1.0
    return s


def _top1_in_lines(lines, classes):
    """Top-1 class of each line of an ILSVRC file (IDs) or a Kaggle one (ImageId,WNIDs)."""
    by_id = {c.ilsvrc2012_id: c.index for c in classes}
    by_wnid = {c.wnid: c.index for c in classes}
    if "," in lines[0]:
        return [by_wnid[line.split(",")[1].split()[0]] for line in lines]
    return [by_id[int(line.split()[0])] for line in lines]


@pytest.mark.parametrize("n", [12, 23])
def test_export_of_mmcls_dict_keeps_dataset_order(tmp_path, n):
    scores = _scores(n)
    path = _pickle(tmp_path / "r.pkl", {"class_scores": scores})
    p = read_predictions(path)
    classes = load_classes(None, 1000)
    kaggle = render(p, "kaggle", 5, classes).decode().splitlines()[1:]
    assert _top1_in_lines(kaggle, classes) == [(7 * i) % 1000 for i in range(n)]
    assert [line.split(",")[0] for line in kaggle] == [str(i) for i in range(n)]
    with pytest.raises(PrepError, match="carry no file names"):  # positional: which images?
        render(p, "ilsvrc", 5, classes)


def test_list_without_img_path_uses_sample_idx_then_list_order(tmp_path):
    n = 15
    scores = _scores(n)
    order = np.random.default_rng(1).permutation(n)  # stored shuffled, with sample_idx
    items = [{"sample_idx": int(i), "pred_score": torch.from_numpy(scores[i])} for i in order]
    p = read_predictions(_pickle(tmp_path / "a.pkl", items))
    classes = load_classes(None, 1000)
    lines = render(p, "kaggle", 5, classes).decode().splitlines()[1:]
    assert _top1_in_lines(lines, classes) == [(7 * i) % 1000 for i in range(n)]
    plain = [{"pred_score": torch.from_numpy(scores[i])} for i in range(n)]  # list order
    p = read_predictions(_pickle(tmp_path / "b.pkl", plain))
    lines = render(p, "kaggle", 5, classes).decode().splitlines()[1:]
    assert _top1_in_lines(lines, classes) == [(7 * i) % 1000 for i in range(n)]


def test_real_names_sort_as_numbers_not_text(tmp_path):
    names = [f"test/{i}.JPEG" for i in (10, 2, 1, 11, 3)]
    scores = _scores(5)
    items = [{"img_path": nm, "pred_score": torch.from_numpy(scores[i])}
             for i, nm in enumerate(names)]
    p = read_predictions(_pickle(tmp_path / "r.pkl", items))
    classes = load_classes(None, 1000)
    lines = render(p, "kaggle", 5, classes).decode().splitlines()[1:]
    by_name = {int(nm.split("/")[1].split(".")[0]): (7 * i) % 1000 for i, nm in enumerate(names)}
    assert _top1_in_lines(lines, classes) == [by_name[k] for k in sorted(by_name)]
    official = [{"img_path": f"val/ILSVRC2012_val_{i:08d}.JPEG",
                 "pred_score": torch.from_numpy(scores[j])}
                for j, i in enumerate((3, 1, 2, 5, 4))]  # ILSVRC: numbered 1..5 in any order
    p = read_predictions(_pickle(tmp_path / "o.pkl", official))
    lines = render(p, "ilsvrc", 5, classes).decode().splitlines()
    assert _top1_in_lines(lines, classes) == [(7 * j) % 1000 for j in (1, 2, 0, 4, 3)]


def test_sample_idx_that_is_not_a_permutation_is_refused(tmp_path):
    items = [{"sample_idx": 0, "pred_score": torch.ones(3)},
             {"sample_idx": 0, "pred_score": torch.ones(3)}]
    with pytest.raises(PrepError, match="not a permutation"):
        read_predictions(_pickle(tmp_path / "r.pkl", items))


@pytest.mark.parametrize("bad", ["nan_row", "inf", "one_nan"])
def test_nan_scores_are_refused_not_exported(tmp_path, bad):
    scores = _scores(6, 10)
    if bad == "nan_row":
        scores[3] = np.nan
    elif bad == "inf":
        scores[4, 2] = np.inf
    else:
        scores[2, 5] = np.nan
    items = [{"img_path": f"val/{i}.JPEG", "pred_score": torch.from_numpy(s)}
             for i, s in enumerate(scores)]
    path = _pickle(tmp_path / "r.pkl", items)
    r = CliRunner().invoke(prep_main, ["export-preds", str(path), str(tmp_path / "o.csv"),
                                       "--format", "csv"])
    assert r.exit_code == 1 and "NaN or infinite" in r.output and "sample" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "o.csv").exists()


@pytest.mark.parametrize("label", [10, 1000, -2])
def test_gt_label_out_of_range_is_refused(tmp_path, label):
    items = [{"img_path": f"val/{i}.JPEG", "pred_score": torch.rand(10),
              "gt_label": torch.tensor([label if i == 2 else 1])} for i in range(4)]
    path = _pickle(tmp_path / "r.pkl", items)
    r = CliRunner().invoke(prep_main, ["export-preds", str(path), "--summary"])
    assert r.exit_code == 1 and "gt_label outside 0..9" in r.output, r.output
    assert "sample 2" in r.output


def test_class_table_that_contradicts_the_pickle_is_refused(tmp_path):
    """The evaluator names each prediction's WNID from the checkpoint's classes; a class table
    with another order must not silently rename them."""
    classes = load_classes(None, 1000)
    items = [{"img_path": "val/0.JPEG", "pred_score": torch.from_numpy(_scores(1)[0]),
              "wnid": classes[1].wnid}]  # says class 0 is classes[1]'s WNID
    with pytest.raises(PrepError, match="does not belong to this model"):
        render(read_predictions(_pickle(tmp_path / "r.pkl", items)), "kaggle", 5, classes)


def test_val_image_in_two_class_folders_is_refused(make_sample, tmp_path):
    from tests.conftest import assert_refused

    src, plan = make_sample("imagefolder")
    stem, wnid = sorted(plan.val.items())[0]
    other = next(w for w in plan.wnids if w != wnid)
    shutil.copy(src / "val" / wnid / f"{stem}.JPEG", tmp_path / "copy.JPEG")
    shutil.move(tmp_path / "copy.JPEG", src / "val" / other / f"{stem}.JPEG")
    out = assert_refused(src, tmp_path / "data", stem, "two class folders")
    assert wnid in out and other in out


def test_same_val_image_with_other_extension_in_two_folders_is_refused(make_sample, tmp_path):
    from tests.conftest import assert_refused

    src, plan = make_sample("imagefolder")
    stem, wnid = sorted(plan.val.items())[1]
    other = next(w for w in plan.wnids if w != wnid)
    shutil.copy(src / "val" / wnid / f"{stem}.JPEG", src / "val" / other / f"{stem}.jpg")
    assert_refused(src, tmp_path / "data", stem, "two class folders")


def _png16(path_or_buf):
    """A 16-bit grayscale PNG: a left-to-right ramp over the full 16-bit range."""
    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (48, 1))
    img = Image.fromarray(ramp)  # uint16: mode I;16
    img.save(path_or_buf, format="PNG")
    return ramp


def test_16bit_png_repair_keeps_the_picture():
    buf = io.BytesIO()
    ramp = _png16(buf)
    jpg, info = encode_image(buf.getvalue())
    assert info.repaired == "png"
    out = np.asarray(Image.open(io.BytesIO(jpg)).convert("L"), dtype=np.float64)
    expected = ramp / 257.0
    assert abs(out.mean() - expected.mean()) < 3  # was ~254: 99% white
    assert out.std() > 0.9 * expected.std()
    assert np.corrcoef(out.ravel(), expected.ravel())[0, 1] > 0.99


def test_16bit_png_in_the_loader_keeps_the_picture():
    from train.decode import decode_crop

    buf = io.BytesIO()
    ramp = _png16(buf)
    img = decode_crop(buf.getvalue(), lambda w, h: (0, 0, w, h), 32)
    out = np.asarray(img.convert("L"), dtype=np.float64)
    assert abs(out.mean() - ramp.mean() / 257) < 4 and out[:, -4:].mean() > out[:, :4].mean()


def _truncated_with_eoi(progressive=False):
    img = render_image(0, 3, np.random.default_rng(0), 160)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, progressive=progressive)
    data = buf.getvalue()
    return data[: len(data) // 3] + b"\xff\xd9"


@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpeg_with_eoi_is_undecodable(progressive):
    from prep import jpeg

    if not jpeg.available():
        pytest.skip("the strict JPEG check (prep/jpegcheck.c) was not built")
    data = _truncated_with_eoi(progressive)
    Image.open(io.BytesIO(data)).load()  # what made it pass: Pillow decodes it without error
    assert "premature end of data" in jpeg.strict_problem(data)
    with pytest.raises(UndecodableImage, match="premature end"):
        encode_image(data)
    assert jpeg.strict_problem(encode_jpeg(render_image(1, 3, np.random.default_rng(1), 96))) \
        is None


def _plant(prepared_data, data: bytes):
    """Overwrite the first train image of a prepared view's source with `data`."""
    first = (prepared_data / "meta/train.txt").read_text().split()[0]
    target = prepared_data / "train" / first
    target.write_bytes(data)
    return first


def test_truncated_jpeg_with_eoi_in_check_full_shard_and_verify(prepared, tmp_path):
    from prep import jpeg
    from prep.imagenet import prepare_imagenet
    from shards.build import ShardSettings, shard_dataset
    from shards.verify import verify_shards

    if not jpeg.available():
        pytest.skip("the strict JPEG check (prep/jpegcheck.c) was not built")
    data, plan = prepared("ilsvrc2017")
    name = _plant(data, _truncated_with_eoi())
    report = prepare_imagenet(tmp_path / "src-ilsvrc2017", tmp_path / "data", check="full",
                              progress=False, workers=1)
    assert any(name.split("/")[1] in u and "premature" in u
               for u in report.problems.undecodable)
    with pytest.raises(PrepError, match="premature end of data.*--on-error skip"):
        shard_dataset(data, tmp_path / "s1", ShardSettings(num_shards=2), progress=False)
    r = shard_dataset(data, tmp_path / "s2", ShardSettings(num_shards=2, on_error="skip"),
                      progress=False)
    assert any(name in s for s in r.info["prep"]["skipped"])
    # let it in on purpose (--check header), then the deep verify must find it
    shard_dataset(data, tmp_path / "s3", ShardSettings(num_shards=2, check="header"),
                  progress=False)
    assert verify_shards(tmp_path / "s3", deep=False, progress=False).ok
    deep = verify_shards(tmp_path / "s3", deep=True, progress=False)
    assert not deep.ok and any("premature end of data" in p for p in deep.problems)
