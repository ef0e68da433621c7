"""train/main.py as users run it, and misuse of it: the class list a checkpoint carries,
outputs that are inputs, damaged checkpoints, bad settings, hostile images, resumes that do
not match their run (docs/reliability.md, "Misuse, races and hostile files")."""

import hashlib
import io
import json
import mmap
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prep.errors import SampleError
from prep.synth import encode_jpeg, render_class_image
from tests.conftest import set_jpeg_size, sharded_sample

ROOT = Path(__file__).resolve().parents[1]
TINY = ["arch=resnet18", "image_size=32", "val_resize=36", "val_crop=32", "batch_size=8",
        "workers=1", "lr=0.2"]


def _sets(*extra):
    return [a for s in (*TINY, *extra) for a in ("--set", s)]


def _train(data, out, *extra_args, sets=("epochs=2", "num_classes=3")):
    from train.main import main as train_main

    return train_main(["--data", str(data), "--output-dir", str(out), "--device", "cpu",
                       *_sets(*sets), *extra_args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Shards A (3 classes), shards B (3 other classes, another seed), a 2-epoch run on A."""
    tmp = tmp_path_factory.mktemp("misuse")
    a = sharded_sample(tmp / "a", "ilsvrc2017", 2, classes=3, train_per_class=12,
                       val_per_class=4, size=40)
    b = sharded_sample(tmp / "b", "ilsvrc2017", 2, classes=3, train_per_class=12,
                       val_per_class=4, size=40, seed=5)
    _train(a, tmp / "run")
    return tmp, a, b


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.slow
def test_checkpoint_carries_the_ordered_class_list(runs):
    tmp, a, _ = runs
    state = torch.load(tmp / "run/checkpoint.pt", weights_only=True)
    assert state["classes"] == json.loads((a / "_info.json").read_text())["classes"]


@pytest.mark.slow
def test_evaluate_on_shards_of_other_classes_is_refused(runs):
    from train.main import main as train_main

    tmp, a, b = runs
    wa = json.loads((a / "_info.json").read_text())["classes"]
    wb = json.loads((b / "_info.json").read_text())["classes"]
    assert wa != wb
    with pytest.raises(SystemExit, match=rf"other classes.*class 0 is {wa[0]} in the "
                       rf"checkpoint, {wb[0]} in the shards"):
        train_main(["--data", str(b), "--evaluate", "--checkpoint",
                    str(tmp / "run/best.pt"), "--device", "cpu"])


@pytest.mark.slow
def test_resume_on_shards_of_other_classes_is_refused(runs):
    tmp, _, b = runs
    out = tmp / "resume-b"
    shutil.copytree(tmp / "run", out)
    before = _digest(out / "checkpoint.pt")
    with pytest.raises(SystemExit, match="other classes than the shards"):
        _train(b, out, "--resume", "auto", sets=("epochs=3", "num_classes=3"))
    assert _digest(out / "checkpoint.pt") == before


@pytest.mark.slow
def test_predictions_name_wnids_from_the_checkpoint(runs):
    from train.main import main as train_main

    tmp, a, _ = runs
    out = tmp / "preds.pkl"
    train_main(["--data", str(a), "--evaluate", "--checkpoint", str(tmp / "run/best.pt"),
                "--device", "cpu", "--out", str(out)])
    classes = torch.load(tmp / "run/best.pt", weights_only=True)["classes"]
    import pickle

    items = pickle.loads(out.read_bytes())
    assert all(d["wnid"] == classes[int(d["pred_label"])] for d in items)


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
@pytest.mark.slow
def test_out_that_is_the_checkpoint_is_refused(runs, how):
    from train.main import main as train_main

    tmp, a, _ = runs
    ck = tmp / f"ck-{how}.pt"
    shutil.copy(tmp / "run/best.pt", ck)
    out = ck
    if how == "symlink":
        out = tmp / "link.pt"
        out.unlink(missing_ok=True)
        out.symlink_to(ck)
    elif how == "hardlink":
        out = tmp / "hard.pt"
        out.unlink(missing_ok=True)
        os.link(ck, out)
    before = _digest(ck)
    with pytest.raises(SystemExit, match="is the checkpoint"):
        train_main(["--data", str(a), "--evaluate", "--checkpoint", str(ck), "--device", "cpu",
                    "--out", str(out)])
    assert _digest(ck) == before


@pytest.mark.slow
def test_output_dir_inside_the_shards_is_refused(runs):
    tmp, a, _ = runs
    before = sorted(p.name for p in a.iterdir())
    with pytest.raises(SystemExit, match="inside the shard directory"):
        _train(a, a / "runs")
    assert sorted(p.name for p in a.iterdir()) == before


@pytest.mark.slow
def test_batch_larger_than_the_dataset_is_a_clear_error(runs):
    tmp, a, _ = runs
    with pytest.raises(SystemExit, match="fewer than one global batch"):
        _train(a, tmp / "big", sets=("epochs=1", "num_classes=3", "batch_size=512"))


@pytest.mark.slow
def test_truncated_checkpoint_falls_back_to_the_previous_one(runs, capsys):
    tmp, a, _ = runs
    out = tmp / "trunc"
    shutil.copytree(tmp / "run", out)
    assert (out / "checkpoint.prev.pt").is_file()  # kept when epoch 1 replaced epoch 0
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    metrics = _train(a, out, "--resume", "auto", sets=("epochs=3", "num_classes=3"))
    said = capsys.readouterr().out
    assert "checkpoint.pt: not a readable checkpoint" in said
    assert "resuming from the previous one" in said and "(epoch 0)" in said
    assert metrics["epoch"] == 2
    history = torch.load(out / "checkpoint.pt", weights_only=True)["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]  # epoch 1 redone from epoch 0
    # best.pt is never the fallback's source, and still holds the best epoch's weights
    kept = torch.load(out / "best.pt", weights_only=True)
    assert kept["best_top1"] == max(h["top1"] for h in history)
    assert kept["history"][-1]["top1"] == kept["best_top1"]


@pytest.mark.slow
def test_truncated_checkpoint_without_a_previous_one_is_a_clear_error(runs):
    tmp, a, _ = runs
    out = tmp / "trunc2"
    out.mkdir()
    data = (tmp / "run/checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[:1000])
    with pytest.raises(SystemExit, match="not a readable checkpoint.*no previous checkpoint"):
        _train(a, out, "--resume", "auto")


@pytest.mark.slow
def test_resume_with_another_architecture_is_refused(runs):
    tmp, a, _ = runs
    out = tmp / "arch"
    shutil.copytree(tmp / "run", out)
    with pytest.raises(SystemExit, match="holds a resnet18, the settings say arch=resnet34"):
        _train(a, out, "--resume", "auto", sets=("epochs=3", "num_classes=3", "arch=resnet34"))


@pytest.mark.parametrize("args, message", [
    (["--set", "epohcs=3"], "unknown setting(s) ['epohcs'] ('epohcs': did you mean epochs?)"),
    (["--recipe", "nope.yaml"], "--recipe nope.yaml: no such file"),
    (["--set", "batch_size=big"], "batch_size must be int, got 'big'"),
    (["--set", "lr=[1"], "not valid YAML"),
])
@pytest.mark.slow
def test_bad_settings_are_one_line_errors(runs, args, message):
    tmp, a, _ = runs
    r = subprocess.run([sys.executable, str(ROOT / "train/main.py"), "--data", str(a),
                        "--device", "cpu", *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and message in r.stderr, r.stderr


def _patch_sof(tar: Path, member: str, width: int, height: int) -> None:
    """Rewrite the SOF size of one jpg member of a shard in place, and its CRC-32 in the
    index beside it: a shard written that way, not damaged later."""
    import zlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from shards.tarread import members

    with open(tar, "r+b") as f:
        buf = mmap.mmap(f.fileno(), 0)
        start, size = next((s, n) for name, s, n in members(buf, str(tar)) if name == member)
        set_jpeg_size(buf, width, height, start)
        buf.flush()
        crc = zlib.crc32(buf[start : start + size])
        buf.close()
    index = tar.parent / "index.parquet"
    if index.is_file():
        rows = pq.read_table(index).to_pylist()
        for r in rows:
            if r["shard"] == tar.name and f"{r['key']}.jpg" == member:
                r["jpg_crc32"] = crc
        pq.write_table(pa.Table.from_pylist(rows), index)


@pytest.mark.slow
def test_zero_size_val_image_is_a_clear_error_in_evaluate(runs):
    from train.main import main as train_main

    tmp, a, _ = runs
    bad = tmp / "zero"
    shutil.copytree(a, bad)
    from shards.tarread import samples

    first = next(samples(str(bad / "val-000000.tar")))["__key__"]
    _patch_sof(bad / "val-000000.tar", f"{first}.jpg", 0, 0)
    with pytest.raises(SystemExit) as info:
        train_main(["--data", str(bad), "--evaluate", "--checkpoint", str(tmp / "run/best.pt"),
                    "--device", "cpu"])
    text = str(info.value)
    assert f"val-000000.tar: member {first}.jpg" in text and "0x0" in text
    assert "Traceback" not in text and "ZeroDivision" not in text


@pytest.mark.slow
def test_train_skip_messages_name_shard_member_and_reason(tmp_path):
    from train.decode import TrainDecoder, ValDecoder

    good = encode_jpeg(render_class_image(1, 3, np.random.default_rng(0), 48))
    zero = bytearray(good)
    set_jpeg_size(zero, 0, 0)
    for decoder in (TrainDecoder(32, 0.08, True, 0), ValDecoder(36, 32)):
        for data, reason in ((bytes(zero), "0x0"), (b"\xff\xd8garbage", "Error")):
            sample = {"jpg": data, "cls": b"1", "__key__": "k7", "__url__": "/s/train-000003.tar"}
            with pytest.raises(SampleError, match=rf"train-000003\.tar: member k7\.jpg: .*"
                               rf"{reason}"):
                decoder(sample)


def _bomb(progressive: bool = True) -> bytes:
    """A few KB of JPEG whose header claims 45000 x 45000 pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 30)).save(buf, "JPEG", progressive=progressive)
    data = bytearray(buf.getvalue())
    set_jpeg_size(data, 45000, 45000)
    return bytes(data)


@pytest.mark.parametrize("path", ["region", "pil", "device"])
def test_decompression_bomb_is_refused_before_decoding(path):
    from train.decode import TrainDecoder, decode_crop
    from train.device_decode import RawTrainDecoder

    data = _bomb()
    sample = {"jpg": data, "cls": b"0", "__key__": "bomb", "__url__": "/s/train-000001.tar"}
    t0 = time.perf_counter()
    if path == "device":
        with pytest.raises(SampleError, match=r"train-000001\.tar: member bomb\.jpg: .*"
                           r"45000x45000.*above the limit"):
            RawTrainDecoder(0.08, True, 0)(sample)
    else:
        with pytest.raises(SampleError, match=r"member bomb\.jpg: .*above the limit"):
            TrainDecoder(32, 0.08, True, 0, region=path == "region")(sample)
        with pytest.raises(ValueError, match="above the limit"):
            decode_crop(data, lambda w, h: (0, 0, w, h), 32, region=path == "region")
    assert time.perf_counter() - t0 < 1.0  # was 6.8 s and 6.6 GB per decode


def test_region_decoder_checks_its_request_in_c():
    from train import jpeg_region

    if not jpeg_region.available():
        pytest.skip("the region decoder was not built")
    good = encode_jpeg(render_class_image(0, 3, np.random.default_rng(0), 64))
    assert jpeg_region.decode_region(good, (0, 0, 32, 32), 16) is not None
    assert jpeg_region.decode_region(_bomb(False), (0, 0, 100, 100), 16) is None
    assert jpeg_region.decode_region(good, (0, 0, 5000, 5000), 16) is None  # outside


@pytest.mark.slow
def test_evaluate_with_set_changes_only_the_named_setting(runs):
    """`--evaluate --checkpoint C --set batch_size=4` (or `-b 4`) keeps the checkpoint's
    architecture: only the named settings change (a resnet50 was built before)."""
    from train.main import main as train_main

    tmp, a, _ = runs
    for flags in (["--set", "batch_size=4"], ["-b", "4"]):
        metrics = train_main(["--data", str(a), "--evaluate", "--checkpoint",
                              str(tmp / "run/best.pt"), "--device", "cpu", *flags])
        assert metrics["val_samples"] == 12


@pytest.mark.slow
def test_plain_progress_lines_when_stderr_is_a_file(runs):
    tmp, a, _ = runs
    log = tmp / "train.log"
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, str(ROOT / "train/main.py"), "--data", str(a),
                            "--output-dir", str(tmp / "logged"), "--device", "cpu",
                            *_sets("epochs=1", "num_classes=3")], stdout=f,
                           stderr=subprocess.STDOUT, cwd=ROOT, timeout=300,
                           env={**os.environ, "PREP_PROGRESS_SECONDS": "0"})
    text = log.read_text()
    assert r.returncode == 0, text[-2000:]
    assert "\r" not in text
    lines = [line for line in text.splitlines() if line.startswith("epoch 0: ") and
             "coverage" not in line]
    assert len(lines) >= 2, text
    assert "step (" in lines[-1] and "step/s" in lines[-1] and "loss " in lines[-1]
    assert "lr " in lines[-1] and "img_s " in lines[-1] and ("eta" in lines[0] or
                                                             "took" in lines[0])


@pytest.mark.slow
def test_resume_with_another_seed_is_refused_naming_it(runs):
    """The saved position is a place in the seed's order: under another seed it would
    train on other samples, silently."""
    tmp, a, _ = runs
    out = tmp / "seed"
    shutil.copytree(tmp / "run", out)
    with pytest.raises(SystemExit, match=r"other data .* seed \(seed: 0 vs 7\)"):
        _train(a, out, "--resume", "auto", sets=("epochs=3", "num_classes=3", "seed=7"))


@pytest.mark.slow
def test_resume_on_another_shard_set_is_refused_naming_it(runs, tmp_path):
    tmp, a, _ = runs
    fewer = sharded_sample(tmp_path, "ilsvrc2017", 2, classes=3, train_per_class=11,
                           val_per_class=4, size=40)
    out = tmp / "shardset"
    shutil.copytree(tmp / "run", out)
    with pytest.raises(SystemExit, match=r"train samples \(num_samples: 36 vs 33\)"):
        _train(fewer, out, "--resume", "auto", sets=("epochs=3", "num_classes=3"))


@pytest.mark.slow
def test_damaged_step_checkpoint_falls_back_to_the_previous_one(runs, capsys):
    """Step checkpoints every 2 steps (36 samples, 4 steps): checkpoint.pt is the epoch's
    end, checkpoint.prev.pt step 4. Damaged, the latest is passed over, said so, and the
    run continues from step 4 with an exact receipt."""
    tmp, a, _ = runs
    out = tmp / "stepdamage"
    _train(a, out, "--save-every", "2", sets=("epochs=1", "num_classes=3"))
    assert ckpt_position(out / "checkpoint.prev.pt") == (0, 32)
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    capsys.readouterr()
    metrics = _train(a, out, "--resume", "auto", sets=("epochs=1", "num_classes=3"))
    said = capsys.readouterr().out
    assert "resuming from the previous one" in said
    assert "epoch 0, step 4, sample 32 of the epoch" in said
    assert metrics["coverage_check"] == "exact" and metrics["samples"] == 32


def ckpt_position(path):
    position = torch.load(path, weights_only=True)["position"]
    return position["epoch"], position["consumed"]


@pytest.mark.slow
def test_sigterm_in_one_process_checkpoints_and_exits_75(runs):
    """No torchrun: SIGTERM (a spot VM's notice) mid-epoch -> step checkpoint, status 75,
    preempted.json; the resumed run logs each step once and its receipts are exact."""
    import signal
    import threading

    tmp, a, _ = runs
    out = tmp / "sigterm1"
    steps = out / "steps.jsonl"

    def notice():
        deadline = time.time() + 120
        while time.time() < deadline and (not steps.is_file() or
                                          len(steps.read_text().splitlines()) < 2):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=notice, daemon=True).start()
    try:
        with pytest.raises(SystemExit) as stop:
            _train(a, out, sets=("epochs=2", "num_classes=3", "log_every=1"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.code == 75
    said = json.loads((out / "preempted.json").read_text())
    assert said["signal"] == "SIGTERM" and said["position"][1] > 0
    metrics = _train(a, out, "--resume", "auto",
                     sets=("epochs=2", "num_classes=3", "log_every=1"))
    assert metrics["coverage_check"] == "exact"
    logged = [json.loads(x)["step"] for x in steps.read_text().splitlines()]
    assert logged == list(range(1, 9))  # 2 epochs x 4 steps, each once
