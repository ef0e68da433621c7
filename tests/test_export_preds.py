"""Evaluator pickle -> prep export-preds, checked against the evaluator's own numbers."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from prep.cli import main as prep_main
from prep.errors import PrepError
from prep.export import load_classes, render
from prep.predictions import read_predictions
from tests.conftest import (
    sharded_sample,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["arch=resnet18", "num_classes=5", "image_size=32", "val_resize=36", "val_crop=32",
        "batch_size=8", "workers=1", "epochs=1", "lr=0.2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2012-layout sample (devkit ground truth in ILSVRC2012_IDs), shards, a 1-epoch model,
    and predictions pickles from 1 and from 2 processes."""
    from train.main import main as train_main

    tmp = tmp_path_factory.mktemp("preds")
    sharded_sample(tmp, "ilsvrc2012", 4, classes=5, train_per_class=16, val_per_class=6,
                   test_images=7, size=40)
    sets = [a for s in TINY for a in ("--set", s)]
    train_main(["--data", str(tmp / "shards"), "--output-dir", str(tmp / "run"),
                "--device", "cpu", *sets])
    ck = str(tmp / "run/checkpoint.pt")
    metrics = train_main(["--data", str(tmp / "shards"), "--evaluate", "--checkpoint", ck,
                          "--device", "cpu", "--out", str(tmp / "one.pkl")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train/main.py"), "--data", str(tmp / "shards"), "--evaluate",
           "--checkpoint", ck, "--device", "cpu", "--out", str(tmp / "two.pkl")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, metrics


def _load(path):
    with open(path, "rb") as f:
        return pickle.load(f)


@pytest.mark.slow  # the module's trained run
def test_pickle_layout_and_world_size_independence(run):
    tmp, metrics = run
    one, two = _load(tmp / "one.pkl"), _load(tmp / "two.pkl")
    assert len(one) == len(two) == 30 == metrics["val_samples"]
    assert [d["sample_idx"] for d in one] == list(range(30))
    assert [d["key"] for d in one] == [d["key"] for d in two]
    assert [d["key"] for d in one] == sorted(d["key"] for d in one)  # val: file order
    for a, b in zip(one, two):
        assert a["img_path"].startswith("val/") and a["num_classes"] == 5
        assert a["gt_label"].dtype == torch.long and a["gt_label"].shape == (1,)
        assert a["pred_score"].shape == (5,) and abs(float(a["pred_score"].sum()) - 1) < 1e-4
        assert torch.allclose(a["pred_score"], b["pred_score"], atol=1e-4)
        assert int(a["pred_label"]) == int(a["pred_score"].argmax())
    saved = json.loads((tmp / "one.metrics.json").read_text())
    assert saved["top1"] == pytest.approx(metrics["top1"])
    per_class = saved["per_class_top1"]  # 6 val images per class
    assert len(per_class) == 5 and np.mean(per_class) == pytest.approx(metrics["top1"])


@pytest.mark.slow  # the module's trained run
def test_unlabelled_test_split(run):
    from train.main import main as train_main

    tmp, _ = run
    out = tmp / "test.pkl"
    train_main(["--data", str(tmp / "shards"), "--evaluate", "--split", "test", "--device",
                "cpu", "--checkpoint", str(tmp / "run/checkpoint.pt"), "--out", str(out)])
    items = _load(out)
    assert [d["key"] for d in items] == [f"ILSVRC2012_test_{i:08d}" for i in range(1, 8)]
    assert all("gt_label" not in d and d["pred_score"].shape == (5,) for d in items)
    r = CliRunner().invoke(prep_main, ["export-preds", str(out), "--summary"])
    assert r.exit_code == 0 and "no ground-truth labels" in r.output


@pytest.mark.slow  # the module's trained run
def test_plain_torchvision_state_dict_with_module_prefix(run, tmp_path):
    from train.main import main as train_main

    tmp, metrics = run
    state = torch.load(tmp / "run/checkpoint.pt", weights_only=True)["model"]
    plain = tmp_path / "plain.pth"  # as a DDP user saves it: module.-prefixed, no config
    torch.save({f"module.{k}": v for k, v in state.items()}, plain)
    again = train_main(["--data", str(tmp / "shards"), "--evaluate", "--device", "cpu",
                        "--checkpoint", str(plain), *[a for s in TINY for a in ("--set", s)]])
    assert again["top1"] == pytest.approx(metrics["top1"])


@pytest.mark.slow  # the module's trained run
def test_plot(run, tmp_path):
    tmp, _ = run
    r = CliRunner().invoke(prep_main, ["export-preds", str(tmp / "one.pkl"), "--plot",
                                       str(tmp_path / "p.png"), "--classes",
                                       str(tmp / "data/imagenet/meta/classes.csv")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _export(tmp, fmt, *extra):
    out = tmp / f"out.{fmt}"
    r = CliRunner().invoke(prep_main, ["export-preds", str(tmp / "one.pkl"), str(out),
                                       "--format", fmt, *extra])
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.slow  # the module's trained run
def test_mmcls_export_reproduces_top1(run):
    tmp, metrics = run
    out = _export(tmp, "mmcls")
    pred = [int(line.split()[1]) for line in out.read_text().splitlines()]
    gt = [int(d["gt_label"]) for d in _load(tmp / "one.pkl")]
    assert np.mean(np.array(pred) == np.array(gt)) == pytest.approx(metrics["top1"])


def _preds_pickle(path, names, scores, labels=None, **extra):
    items = [{"sample_idx": i, "img_path": n, "pred_score": torch.tensor(s),
              **({"gt_label": torch.tensor([labels[i]])} if labels is not None else {}),
              **{k: v[i] for k, v in extra.items()}}
             for i, (n, s) in enumerate(zip(names, scores))]
    path.write_bytes(pickle.dumps(items, protocol=4))
    return path


def test_ilsvrc_file_scored_the_devkit_way_gives_top5(tmp_path):
    """Images 1..30 of the real val set, the true class put at a known rank in each: the
    devkit's rule (line n vs ground-truth line n, in ILSVRC2012_IDs) gives the top-5 back."""
    from prep.classes import reference_ids, reference_val_labels

    real, gi = reference_val_labels(), {w: i for i, w in enumerate(sorted(reference_ids()))}
    rng = np.random.default_rng(0)
    names = [f"val/ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, 31)]
    scores = rng.random((30, 1000)).astype(np.float32) * 0.5
    ranks = rng.integers(0, 8, 30)  # the true class's rank: top-5 when < 5
    for i, n in enumerate(range(1, 31)):
        order = np.argsort(-scores[i])
        scores[i, gi[real[f"ILSVRC2012_val_{n:08d}"]]] = scores[i, order[ranks[i]]] + 1e-3 \
            if ranks[i] == 0 else (scores[i, order[ranks[i] - 1]] + scores[i, order[ranks[i]]]) / 2
    pkl = _preds_pickle(tmp_path / "r.pkl", names[::-1], scores[::-1])  # any dataset order
    out = tmp_path / "sub.txt"
    r = CliRunner().invoke(prep_main, ["export-preds", str(pkl), str(out), "--format", "ilsvrc"])
    assert r.exit_code == 0, r.output
    guesses = [list(map(int, line.split())) for line in out.read_text().splitlines()]
    ids = reference_ids()
    truth = [ids[real[f"ILSVRC2012_val_{n:08d}"]] for n in range(1, 31)]  # line n: image n
    assert all(len(g) == 5 and all(1 <= x <= 1000 for x in g) for g in guesses)
    assert [t in g for g, t in zip(guesses, truth)] == [bool(x < 5) for x in ranks]


def test_ilsvrc_submission_with_a_gap_is_refused(tmp_path):
    """Images 1 and 3: image 3's prediction would sit on image 2's line."""
    scores = np.eye(1000, dtype=np.float32)[:2]
    pkl = _preds_pickle(tmp_path / "r.pkl", ["ILSVRC2012_val_00000001.JPEG",
                                             "ILSVRC2012_val_00000003.JPEG"], scores)
    r = CliRunner().invoke(prep_main, ["export-preds", str(pkl), str(tmp_path / "s.txt"),
                                       "--format", "ilsvrc"])
    assert r.exit_code == 1 and not (tmp_path / "s.txt").exists()
    assert "ILSVRC2012_val_00000002 has no prediction, so line 2 would hold " \
        "ILSVRC2012_val_00000003's" in r.output


@pytest.mark.parametrize("case,message", [
    ("duplicate path", "samples 0 and 2 are both 'ILSVRC2012_val_00000001.JPEG'"),
    ("fractional sample_idx", "sample_idx must be a whole number"),
    ("no classes", "holds no class scores (0 classes)"),
])
def test_odd_pickles_are_refused(tmp_path, case, message):
    names = [f"ILSVRC2012_val_{n:08d}.JPEG" for n in (1, 2, 1 if case == "duplicate path"
                                                      else 3)]
    scores = np.zeros((3, 0 if case == "no classes" else 1000), np.float32)
    extra = {}
    pkl = _preds_pickle(tmp_path / "r.pkl", names, scores)
    if case == "fractional sample_idx":
        items = pickle.loads(pkl.read_bytes())
        items[1]["sample_idx"], items[2]["sample_idx"] = 1.5, 0.5
        pkl.write_bytes(pickle.dumps(items))
    del extra
    r = CliRunner().invoke(prep_main, ["export-preds", str(pkl), "--summary"])
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output


def _classes_csv(path, rows):
    path.write_text("index,wnid,ilsvrc2012_id,words\n" + "".join(
        f"{i},{w},{d},{words}\n" for i, w, d, words in rows))
    return path


def test_class_table_is_read_by_its_index_column(tmp_path):
    from prep.classes import build_class_table, reference_words

    table = build_class_table(sorted(reference_words())[:10])
    rows = [(c.index, c.wnid, c.ilsvrc2012_id, f'"{c.words}"') for c in table]
    scores = np.eye(10, dtype=np.float32)  # sample i predicts class i
    pkl = _preds_pickle(tmp_path / "r.pkl", [f"v{i}.JPEG" for i in range(10)], scores)
    outs = []
    for name, order in (("sorted", rows), ("by-wnid-desc", sorted(rows, key=lambda r: r[1],
                                                                  reverse=True))):
        csv_path = _classes_csv(tmp_path / f"{name}.csv", order)
        out = tmp_path / f"{name}.kaggle"
        r = CliRunner().invoke(prep_main, ["export-preds", str(pkl), str(out), "--format",
                                           "kaggle", "--classes", str(csv_path)])
        assert r.exit_code == 0, r.output
        outs.append(out.read_text())
    assert outs[0] == outs[1]
    top1 = [line.split(",")[1].split()[0] for line in outs[1].splitlines()[1:]]
    assert top1 == [c.wnid for c in table]
    dup = _classes_csv(tmp_path / "dup.csv", [*rows[:9], (9, rows[0][1], 5, "x")])
    r = CliRunner().invoke(prep_main, ["export-preds", str(pkl), str(tmp_path / "d.k"),
                                       "--format", "kaggle", "--classes", str(dup)])
    assert r.exit_code == 1 and f"wnid '{rows[0][1]}' appears more than once" in r.output


@pytest.mark.slow  # the module's trained run
def test_kaggle_csv_and_parquet(run):
    import pyarrow.parquet as pq

    tmp, _ = run
    classes = str(tmp / "data/imagenet/meta/classes.csv")
    rows = _export(tmp, "kaggle", "--classes", classes).read_text().splitlines()
    assert rows[0] == "ImageId,PredictionString" and len(rows) == 31
    first = min(d["key"] for d in _load(tmp / "one.pkl"))  # real val names: sparse numbers
    assert rows[1].startswith(f"{first},n") and len(rows[1].split()) == 5
    table = pq.read_table(_export(tmp, "parquet", "--classes", classes, "--topk", "3"))
    assert table.num_rows == 30 and "top3_wnid" in table.column_names
    csv_rows = _export(tmp, "csv").read_text().splitlines()
    assert csv_rows[0].startswith("sample_idx,path,key,gt_label,top1_label")


@pytest.mark.slow  # the module's trained run
def test_summary(run):
    tmp, metrics = run
    r = CliRunner().invoke(prep_main, ["export-preds", str(tmp / "one.pkl"), "--summary"])
    assert r.exit_code == 0 and f"top-1 {100 * metrics['top1']:.2f}%" in r.output


def test_mmcls_0x_and_mmpretrain_pickles(tmp_path):
    scores = np.random.default_rng(0).random((4, 1000)).astype(np.float32)
    old = tmp_path / "old.pkl"
    with open(old, "wb") as f:
        pickle.dump({"class_scores": scores, "pred_score": scores.max(1),
                     "pred_label": scores.argmax(1), "pred_class": ["x"] * 4}, f)
    r = CliRunner().invoke(prep_main, ["export-preds", str(old), str(tmp_path / "a.txt"),
                                       "--format", "kaggle"])  # 1000 classes: shipped IDs
    assert r.exit_code == 0, r.output
    assert len((tmp_path / "a.txt").read_text().splitlines()) == 5
    r = CliRunner().invoke(prep_main, ["export-preds", str(old), str(tmp_path / "b.txt"),
                                       "--format", "ilsvrc"])  # positional: which images?
    assert r.exit_code == 1 and "carry no file names to tell which images" in r.output
    new = tmp_path / "new.pkl"
    with open(new, "wb") as f:  # what mmengine.dump writes: tensors inside plain pickle
        pickle.dump([{"pred_score": torch.tensor(s), "gt_label": torch.tensor([1]),
                      "img_path": f"v/{i}.JPEG", "sample_idx": i} for i, s in
                     enumerate(scores)], f)
    r = CliRunner().invoke(prep_main, ["export-preds", str(new), "--summary"])
    assert r.exit_code == 0 and "4 samples, 1000 classes" in r.output


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {EVIL_MARK}",))


EVIL_MARK = Path("/tmp/prep-export-preds-pwned")


def test_pickle_that_runs_code_is_refused(tmp_path):
    EVIL_MARK.unlink(missing_ok=True)
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps([{"pred_score": [0.5, 0.5], "x": Evil()}]))
    r = CliRunner().invoke(prep_main, ["export-preds", str(bad), str(tmp_path / "o.txt"),
                                       "--format", "mmcls"])
    assert r.exit_code != 0 and "refused to load posix.system" in r.output
    assert not EVIL_MARK.exists() and not (tmp_path / "o.txt").exists()


@pytest.mark.slow  # the module's trained run
@pytest.mark.parametrize("case,message", [
    ("truncated", "truncated or not a predictions pickle"),
    ("wrong_type", "expected a list of per-sample dicts"),
    ("no_mapping", "needs the class table"),
    ("mismatch", "5 classes, the predictions have 3"),
    ("missing_dir", "does not exist; create it first"),
])
def test_bad_inputs(run, tmp_path, case, message):
    tmp, _ = run
    src, out, extra = tmp / "one.pkl", tmp_path / "o.txt", ["--format", "ilsvrc"]
    if case == "truncated":
        src = tmp_path / "t.pkl"
        src.write_bytes((tmp / "one.pkl").read_bytes()[:500])
    elif case == "wrong_type":
        src = tmp_path / "w.pkl"
        src.write_bytes(pickle.dumps("hello"))
    elif case == "mismatch":
        src = tmp_path / "m.pkl"
        src.write_bytes(pickle.dumps([{"pred_score": [0.2, 0.3, 0.5]}]))
        extra += ["--classes", str(tmp / "data/imagenet/meta/classes.csv")]
    elif case == "missing_dir":
        out = tmp_path / "nope" / "o.txt"
        extra = ["--format", "mmcls"]
    r = CliRunner().invoke(prep_main, ["export-preds", str(src), str(out), *extra])
    assert r.exit_code != 0 and message in r.output, r.output
    assert "Traceback" not in r.output and not out.exists()


@pytest.mark.slow  # the module's trained run
def test_evaluator_names_samples_from_the_samples_not_the_index(run, tmp_path):
    """With two val rows' source swapped in index.parquet, the pickle still gives each key
    its own image path: nothing the evaluator writes comes from index.parquet."""

    import pyarrow as pa
    import pyarrow.parquet as pq

    from train.main import main as train_main

    tmp, _ = run
    shards = tmp_path / "shards"
    shutil.copytree(tmp / "shards", shards)
    rows = pq.read_table(shards / "index.parquet").to_pylist()
    i, j = [k for k, r in enumerate(rows) if r["split"] == "val"][:2]
    rows[i]["source"], rows[j]["source"] = rows[j]["source"], rows[i]["source"]
    pq.write_table(pa.Table.from_pylist(rows), shards / "index.parquet")
    train_main(["--data", str(shards), "--evaluate", "--checkpoint",
                str(tmp / "run/checkpoint.pt"), "--device", "cpu", "--out",
                str(tmp_path / "r.pkl")])
    items = _load(tmp_path / "r.pkl")
    assert all(d["img_path"].endswith(f"/{d['key']}.JPEG") for d in items)
    assert [d["key"] for d in items] == [d["key"] for d in _load(tmp / "one.pkl")]


def test_export_over_its_own_pickle_is_refused(tmp_path):
    path = tmp_path / "r.pkl"
    path.write_bytes(pickle.dumps([{"img_path": "val/a.JPEG", "pred_score": torch.rand(4)}]))
    link = tmp_path / "link.txt"
    link.symlink_to(path)
    before = path.read_bytes()
    for out in (path, link):
        r = CliRunner().invoke(prep_main, ["export-preds", str(path), str(out), "--format",
                                           "mmcls"])
        assert r.exit_code == 1 and "is the predictions pickle" in r.output, r.output
    assert path.read_bytes() == before


@pytest.mark.parametrize("items, message", [
    ([{"pred_score": torch.rand(4), "gt_label": torch.tensor([], dtype=torch.long)}],
     "gt_label must hold one whole number"),
    ([{"pred_score": "0.1 0.9"}], "pred_score is not numeric"),
    ([{"pred_score": {"a": 1}}], "pred_score is not numeric"),
    ([{"pred_score": [0.1, "x"]}], "pred_score is not numeric"),
    ([{"pred_score": torch.rand(4), "gt_label": "cat"}], "gt_label is not numeric"),
    ([{"pred_score": torch.rand(4), "img_path": 5}], "img_path/key must be a string"),
    ({"class_scores": "abc"}, "class_scores is not numeric"),
    ([{"pred_score": [[0.1, 0.9], [0.3]]}], "pred_score is not numeric"),
])
def test_malformed_pickles_are_one_line_errors(tmp_path, items, message):
    path = tmp_path / "r.pkl"
    path.write_bytes(pickle.dumps(items))
    r = CliRunner().invoke(prep_main, ["export-preds", str(path), "--summary"])
    assert r.exit_code == 1 and message in r.output, r.output
    assert "Traceback" not in r.output and r.output.startswith("error: ")


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
