"""`--data` as a URL: shards over HTTP and through a `pipe:` command train exactly as the
local directory does (same samples, same order, same metrics)."""

import functools
import http.server
import threading

import pytest

from tests.conftest import sharded_sample
from train.data import read_split, shard_url
from train.main import main

SETTINGS = ["arch=resnet18", "num_classes=4", "image_size=32", "val_resize=36", "val_crop=32",
            "batch_size=8", "workers=1", "shuffle_buffer=20", "lr=0.1", "epochs=1",
            "log_every=50"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return sharded_sample(tmp_path_factory.mktemp("remote"), "ilsvrc2017", 2, classes=4,
                          train_per_class=8, val_per_class=3, size=40)


@pytest.fixture(scope="module")
def http_url(shards):
    handler = functools.partial(_QuietHandler, directory=str(shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _train(data, out):
    return main(["--data", data, "--output-dir", str(out), "--device", "cpu",
                 *[a for s in SETTINGS for a in ("--set", s)]])


def test_shard_url_forms(tmp_path):
    assert shard_url(str(tmp_path), "a.tar") == str(tmp_path / "a.tar")
    assert shard_url("http://h/s/", "a.tar") == "http://h/s/a.tar"
    assert shard_url("pipe:aws s3 cp s3://b/s/{} -", "a.tar") == "pipe:aws s3 cp s3://b/s/a.tar -"


@pytest.mark.slow
def test_http_and_pipe_train_alike_and_evaluate_like_the_local_directory(shards, http_url,
                                                                         tmp_path):
    """Remote shards stream (train.data); local ones are read through the index
    (train.resumable), a different order: the two remote forms agree with each other, and
    every form evaluates every val sample once."""
    local = _train(str(shards), tmp_path / "local")
    via_http = _train(http_url, tmp_path / "http")
    via_pipe = _train(f"pipe:cat {shards}/{{}}", tmp_path / "pipe")
    assert via_http["train_loss"] == pytest.approx(via_pipe["train_loss"], rel=1e-5)
    assert via_http["top1"] == via_pipe["top1"]
    for m in (via_http, via_pipe):
        assert m["val_samples"] == local["val_samples"] == 12  # every val sample once
        assert "coverage" not in m  # a receipt needs the index's random access
    assert local["coverage_check"] == "exact"


def test_remote_manifest_errors_name_the_url(shards, http_url, tmp_path):
    with pytest.raises(Exception, match=r"nothere/_info.json"):
        read_split(http_url + "nothere", "train")
    with pytest.raises(SystemExit, match=r"pipe:cat /nonexistent/_info.json"):
        _train("pipe:cat /nonexistent/{}", tmp_path / "x")


@pytest.mark.slow
def test_evaluate_out_with_remote_data_writes_the_same_pickle(shards, http_url, tmp_path):
    """It ended in a pyarrow traceback after the whole evaluation (the order was read from a
    local index.parquet); the evaluator now names and orders samples from the samples."""
    import pickle

    _train(str(shards), tmp_path / "run")
    pickles = {}
    for name, data in (("local", str(shards)), ("http", http_url),
                       ("pipe", f"pipe:cat {shards}/{{}}")):
        out = tmp_path / f"{name}.pkl"
        main(["--data", data, "--evaluate", "--checkpoint", str(tmp_path / "run/checkpoint.pt"),
              "--device", "cpu", "--out", str(out)])
        pickles[name] = pickle.loads(out.read_bytes())
    ref = [(d["key"], d["img_path"], int(d["pred_label"])) for d in pickles["local"]]
    assert len(ref) == 12 and all(p.startswith("val/") for _, p, _ in ref)
    for name in ("http", "pipe"):
        assert [(d["key"], d["img_path"], int(d["pred_label"])) for d in pickles[name]] == ref
