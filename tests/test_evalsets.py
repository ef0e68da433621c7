"""Evaluation sets (ImageNetV2, -A, -R, -Sketch) and ImageNet-ReaL: views, shards, scoring."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from prep.cli import main as prep_main
from prep.errors import PrepError
from prep.evalset import prepare_evalset
from prep.sample import SampleSpec, write_sample
from prep.scoring import global_index, real_labels, subset_wnids
from shards.build import ShardSettings, shard_dataset
from tests.conftest import SHARED_META, tree_hash
from train.engine import evaluate

ROOT = Path(__file__).resolve().parents[1]


def _sample(tmp_path, layout, classes=5, per_class=4, name=None, seed=0):
    src = tmp_path / (name or layout)
    plan = write_sample(src, layout, SampleSpec(classes=classes, val_per_class=per_class,
                                                size=40, seed=seed), progress=False)
    return src, plan


def test_imagenet_v2_folder_number_is_the_label_not_its_text_order(tmp_path):
    src, plan = _sample(tmp_path, "imagenet-v2", classes=12,
                        name="imagenetv2-matched-frequency-format-val")
    before = tree_hash(src)
    r = prepare_evalset(src, tmp_path / "data")
    assert (r.kind, r.variant, r.name) == ("imagenet-v2", "matched-frequency",
                                           "imagenet-v2-matched-frequency")
    gi = global_index()
    lines = (tmp_path / "data" / r.name / "meta/val.txt").read_text().splitlines()
    assert len(lines) == 12 * 4
    folders = sorted(p.name for p in src.iterdir() if p.is_dir())
    for line in lines:
        path, label = line.rsplit(" ", 1)
        assert gi[path.split("/")[0]] == int(label)
    # each linked file is the folder's file, labelled by the folder's number
    for f in folders:
        wnid = sorted(gi)[int(f)]
        linked = sorted(p.name for p in (tmp_path / "data" / r.name / "val" / wnid).iterdir())
        assert linked == sorted(p.name for p in (src / f).iterdir())
    text_order = sorted(folders)  # what ImageFolder does: '10' before '2'
    assert text_order != sorted(folders, key=int)
    assert tree_hash(src) == before


@pytest.mark.parametrize("bad", ["1000", "abc", "007"])
def test_imagenet_v2_bad_folder_is_refused(tmp_path, bad):
    src, _ = _sample(tmp_path, "imagenet-v2", classes=3)
    (src / bad).mkdir()
    with pytest.raises(PrepError, match=rf"{bad}"):
        prepare_evalset(src, tmp_path / "data")
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_an_image_outside_the_class_folders_is_refused_not_dropped(tmp_path):
    src, _ = _sample(tmp_path, "imagenet-v2", classes=3)
    some = next(src.glob("*/*.jpeg"), None) or next(p for p in src.rglob("*") if p.is_file())
    (src / "stray.jpeg").write_bytes(some.read_bytes())
    (src / "README.txt").write_text("beside the folders: fine")
    with pytest.raises(PrepError, match=r"1 image\(s\) outside the class folders, e.g. "
                       r"stray.jpeg: their class is unknown"):
        prepare_evalset(src, tmp_path / "data")


@pytest.mark.parametrize("layout", ["imagenet-a", "imagenet-r", "imagenet-sketch"])
def test_wnid_sets_detected_sharded_every_file_kept(tmp_path, layout):
    src, plan = _sample(tmp_path, layout, classes=6, per_class=7)
    r = prepare_evalset(src, tmp_path / "data")
    assert r.kind == layout and r.name == layout and r.images == 42
    if layout != "imagenet-sketch":
        assert set(r.classes_present) <= set(subset_wnids(layout))
        assert r.notes == [f"subset: 6 of {layout}'s 200 classes"]
    out = tmp_path / "s"
    shard_dataset(tmp_path / "data" / layout, out, ShardSettings(), workers=1, progress=False)
    info = json.loads((out / "_info.json").read_text())
    assert list(info["splits"]) == ["validation"] and info["evalset"]["kind"] == layout
    from shards.tarread import samples

    got = {}
    for name in info["splits"]["validation"]["filenames"]:
        for s in samples(str(out / name)):
            got[s["__key__"]] = (int(s["cls"]), bytes(s["jpg"]))
    assert len(got) == 42  # names repeat across classes (R, Sketch): keys carry the class
    gi = global_index()
    for wnid in plan.wnids:
        for f in (src / wnid).iterdir():
            key = f"{wnid}_{f.name.rsplit('.', 1)[0]}".replace(".", "_").replace(" ", "_")
            assert got[key] == (gi[wnid], f.read_bytes())


def test_imagenet_a_names_with_spaces_and_dots_survive(tmp_path):
    src, _ = _sample(tmp_path, "imagenet-a", classes=3)
    names = [p.name for p in src.rglob("*.jpg")]
    assert all(" " in n and n.count(".") == 3 for n in names)
    r = CliRunner().invoke(prep_main, ["evalset", "--src", str(src), "--link",
                                       str(tmp_path / "data")])
    assert r.exit_code == 0 and "imagenet-a" in r.output, r.output
    lines = (tmp_path / "data/imagenet-a/meta/val.txt").read_text().splitlines()
    assert sorted(line.rsplit(" ", 1)[0].split("/")[1] for line in lines) == sorted(names)


def test_a_folder_outside_the_200_is_refused(tmp_path):
    src, _ = _sample(tmp_path, "imagenet-a", classes=3)
    outside = next(w for w in sorted(global_index()) if w not in subset_wnids("imagenet-a"))
    shutil.copytree(next(p for p in src.iterdir() if p.is_dir()), src / outside)
    with pytest.raises(PrepError, match=rf"{outside} is not one of imagenet-a's 200"):
        prepare_evalset(src, tmp_path / "data")


class _Norm:
    device = torch.device("cpu")

    def __call__(self, images):
        return images.float()


class _Table(torch.nn.Module):
    """A 'model' whose logits for image i are row i of a table (i is in its first pixel)."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, x):
        return self.table[x[:, 0, 0, 0].long()]


def _loader(labels, keys, batch=4):
    out = []
    for s in range(0, len(labels), batch):
        idx = list(range(s, min(s + batch, len(labels))))
        images = torch.zeros(len(idx), 3, 2, 2, dtype=torch.uint8)
        images[:, 0, 0, 0] = torch.tensor(idx, dtype=torch.uint8)
        out.append((images, torch.tensor([labels[i] for i in idx]), [keys[i] for i in idx],
                    [(keys[i], 0, i) for i in idx]))  # origins: (source, shard, member)
    return out


def test_a_and_r_logits_restricted_to_their_200_classes():
    """A model whose overall top-1 is outside ImageNet-A's 200 classes must still be scored
    by its best class among the 200."""
    gi = global_index()
    a = [gi[w] for w in subset_wnids("imagenet-a")]
    outside = [i for i in range(1000) if i not in set(a)]
    n = 10
    table = torch.zeros(n, 1000)
    labels = []
    for i in range(n):
        truth = a[i * 7]
        table[i, outside[i]] = 10.0  # the overall winner: not an ImageNet-A class
        table[i, truth] = 5.0  # the best among the 200: right
        table[i, a[i * 7 + 1]] = 4.0
        labels.append(truth)
    keys = [f"k{i}" for i in range(n)]
    plain = evaluate(_Table(table), _loader(labels, keys), _Norm(), num_samples=n,
                     amp="none", num_classes=1000)
    scored = evaluate(_Table(table), _loader(labels, keys), _Norm(), num_samples=n,
                      amp="none", num_classes=1000, valid=a)
    assert plain["top1"] == 0.0
    assert scored["top1"] == 1.0 and scored["top5"] == 1.0


@pytest.mark.slow
def test_real_top1_and_top5_on_known_predictions():
    real = real_labels()
    assert len(real) == 50_000 and real[0] == () and real[1] == (970, 795)
    if (SHARED_META / "real.json").is_file():  # the shipped copy is ReaL's own file
        assert [list(x) for x in real] == json.loads((SHARED_META / "real.json").read_text())
    from prep.scoring import real_for

    # val images 1..40: predict ReaL's first answer for even i, a wrong class for odd i,
    # with the right answer at rank 3 for i % 4 == 1
    n = 40
    keys = [f"ILSVRC2012_val_{i + 1:08d}" for i in range(n)]
    table = torch.zeros(n, 1000)
    expect1 = expect5 = counted = 0
    for i in range(n):
        answers = real[i]
        wrong = next(c for c in range(1000) if c not in answers)
        if i % 2 == 0 and answers:
            table[i, answers[0]] = 9.0
        else:
            table[i, wrong] = 9.0
            if i % 4 == 1 and answers:
                table[i, answers[0]] = 5.0
        if answers:
            counted += 1
            expect1 += i % 2 == 0
            expect5 += i % 2 == 0 or i % 4 == 1
    from prep.scoring import official_label

    official = [official_label(k) for k in keys]
    m = evaluate(_Table(table), _loader(official, keys), _Norm(), num_samples=n, amp="none",
                 num_classes=1000, to_global=list(range(1000)))
    assert m["real_samples"] == counted < n  # the excluded images are left out
    assert m["real_top1"] == pytest.approx(expect1 / counted)
    assert m["real_top5"] == pytest.approx(expect5 / counted)
    assert real_for("val/n01751748/ILSVRC2012_val_00000002.jpg") == real[1]  # blurred name
    assert real_for("ILSVRC2012_test_00000002") is None
    # labels that are not the official ones for these names: ReaL is not reported
    relabelled = [(official_label(k) + 1) % 1000 for k in keys]
    m = evaluate(_Table(table), _loader(relabelled, keys), _Norm(), num_samples=n, amp="none",
                 num_classes=1000, to_global=list(range(1000)))
    assert "real_top1" not in m
    unlabelled = [-1] * n  # test-like: nothing to disagree with, ReaL still scores
    m = evaluate(_Table(table), _loader(unlabelled, keys), _Norm(), num_samples=n,
                 amp="none", num_classes=1000, to_global=list(range(1000)))
    assert m["real_top1"] == pytest.approx(expect1 / counted)


@pytest.mark.slow
def test_evaluate_a_1000_class_checkpoint_on_imagenet_a_shards(tmp_path):
    from train.main import main as train_main

    src, plan = _sample(tmp_path, "imagenet-a", classes=4, per_class=3)
    prepare_evalset(src, tmp_path / "data")
    out = tmp_path / "s"
    shard_dataset(tmp_path / "data/imagenet-a", out, ShardSettings(), workers=1,
                  progress=False)
    import torchvision

    model = torchvision.models.get_model("resnet18", num_classes=1000)
    ck = tmp_path / "rn18.pt"
    torch.save({"model": model.state_dict(), "classes": sorted(global_index()),
                "config": {"arch": "resnet18", "num_classes": 1000, "val_resize": 36,
                           "val_crop": 32, "batch_size": 4, "workers": 1}}, ck)
    metrics = train_main(["--data", str(out), "--evaluate", "--checkpoint", str(ck),
                          "--device", "cpu", "--out", str(tmp_path / "r.pkl")])
    assert metrics["val_samples"] == 12 and "real_top1" not in metrics
    items = pickle.loads((tmp_path / "r.pkl").read_bytes())
    a = set(subset_wnids("imagenet-a"))
    assert all(d["wnid"] in a for d in items)  # predictions restricted to the 200
    gi = global_index()
    assert sorted(int(d["gt_label"]) for d in items) == sorted(
        gi[w] for w in plan.wnids for _ in range(3))
    assert os.path.exists(tmp_path / "r.metrics.json")


def test_export_preds_summary_prints_real_only_for_the_real_val_labels(tmp_path):
    from prep.scoring import official_label

    real = real_labels()
    items = []
    for i in range(1, 21):  # val images 2..21: ReaL's first answer as the top-1
        score = torch.zeros(1000)
        answers = real[i]
        score[answers[0] if answers else 0] = 1.0
        name = f"val/x/ILSVRC2012_val_{i + 1:08d}.JPEG"
        items.append({"img_path": name, "pred_score": score,
                      "gt_label": torch.tensor([official_label(name)])})
    path = tmp_path / "r.pkl"
    path.write_bytes(pickle.dumps(items))
    r = CliRunner().invoke(prep_main, ["export-preds", str(path), "--summary"])
    kept = sum(1 for i in range(1, 21) if real[i])
    assert r.exit_code == 0, r.output
    assert f"ReaL top-1 100.00%   ReaL top-5 100.00%   on {kept:,} val images" in r.output
    # the same names with other labels (a synthetic or relabelled set): no ReaL figures
    items[3]["gt_label"] = torch.tensor([(official_label(items[3]["img_path"]) + 1) % 1000])
    path.write_bytes(pickle.dumps(items))
    r = CliRunner().invoke(prep_main, ["export-preds", str(path), "--summary"])
    assert r.exit_code == 0 and "ReaL" not in r.output


def test_export_of_an_evalset_pickle_with_spaces_in_names(tmp_path):
    """ImageNet-A names hold spaces: the text formats keep one line per image."""
    src, _ = _sample(tmp_path, "imagenet-a", classes=2, per_class=2)
    prepare_evalset(src, tmp_path / "data")
    items = []
    for i, line in enumerate((tmp_path / "data/imagenet-a/meta/val.txt").read_text()
                             .splitlines()):
        path, label = line.rsplit(" ", 1)
        score = torch.zeros(1000)
        score[int(label)] = 1.0
        items.append({"sample_idx": i, "img_path": f"val/{path}", "pred_score": score,
                      "gt_label": torch.tensor([int(label)])})
    path = tmp_path / "r.pkl"
    path.write_bytes(pickle.dumps(items))
    for fmt in ("csv", "txt", "mmcls"):
        out = tmp_path / f"r.{fmt}"
        r = CliRunner().invoke(prep_main, ["export-preds", str(path), str(out), "--format",
                                           fmt, "--summary"])
        assert r.exit_code == 0 and "top-1 100.00%" in r.output, r.output
        text = out.read_text()
        assert len(text.splitlines()) == 4 + (fmt == "csv")
