"""`prep shard --src` on the compressed releases (face-blurred tar.gz, Hugging Face tar.gz
and Parquet), read twice and never unpacked: the same samples in the same shards and order
as `prep imagenet --extract-to` then `prep shard`."""

import gzip
import io
import os
import re
import subprocess
import sys
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from prep import gzindex
from prep.cli import main
from prep.errors import PrepError
from shards.build import ShardSettings, _shard_input, shard_release
from shards.release import release_input
from tests.conftest import sigkill_with_workers, tree_hash
from tests.test_shard_release import (
    SPEC,
    _direct,
    _member,
    _members,
    _rewrite_tar,
    _sources,
    _two_step,
    same_as_two_step,
)

PACKED = ["blurred-tar", "hf-tar", "hf-parquet"]
FILES = {"blurred-tar": 2, "hf-tar": 4, "hf-parquet": 4}  # files each layout's sample has


def _spec(layout: str) -> dict:
    return {**SPEC, "test_images": 0} if layout == "blurred-tar" else SPEC  # no test there


def _files(out) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}


@pytest.mark.parametrize("bad_files", [False, True])
@pytest.mark.parametrize("layout", PACKED)
def test_same_samples_shards_and_order_as_the_two_step_path(make_sample, tmp_path, layout,
                                                            bad_files, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src, _ = make_sample(layout, bad_files=bad_files, **_spec(layout))
    before = tree_hash(src)
    opts = dict(num_shards=3, on_error="skip" if bad_files else "fail")
    direct = _direct(src, tmp_path / "direct", **opts)
    assert tree_hash(src) == before  # the release is only read, nothing unpacked beside it
    assert not list(tmp_path.glob("direct/*.partial")) and sorted(os.listdir(tmp_path)) == \
        ["cache", "direct", src.name]
    two = _two_step(src, tmp_path, tmp_path / "two", **opts)
    same_as_two_step(direct, two, 6 if layout == "blurred-tar" else 9,  # train, val (test)
                     1 if bad_files else 0)
    if bad_files:
        assert sum(direct.info["prep"]["repairs"].values()) == 3  # cmyk, png, grayscale
    # the source names the release's file and member (a Parquet row by its path)
    first = {"blurred-tar": "train_blurred.tar.gz:train_blurred/n",
             "hf-tar": "train_images_", "hf-parquet": "train-0000"}[layout]
    assert any(s.startswith(first) for s in _sources(tmp_path / "direct"))
    # what the disk held: the shards, the manifest and the first pass kept in the cache
    # (a few hundred bytes a member), nothing of the size of the images
    cache = sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert 0 < cache < sum(_files(tmp_path / "direct").values()) / 4
    r = CliRunner().invoke(main, ["verify", "--deep", str(tmp_path / "direct")])
    assert r.exit_code == 0 and ": OK" in r.output, r.output


def test_resized_samples_equal_the_two_step_path(make_sample, tmp_path):
    """--max-size: every image is encoded again in the second pass, to the same bytes."""
    src, _ = make_sample("hf-tar", bad_files=True, **SPEC)
    opts = dict(num_shards=2, max_size=20, on_error="skip")
    _direct(src, tmp_path / "direct", **opts)
    _two_step(src, tmp_path, tmp_path / "two", **opts)
    for shard in sorted((tmp_path / "two").glob("*.tar")):
        assert _members(tmp_path / "direct" / shard.name) == _members(shard), shard.name


def test_rerun_keeps_shards_reuses_the_first_pass_and_notices_a_changed_file(
        make_sample, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src, _ = make_sample("hf-parquet", **SPEC)
    settings = ShardSettings(num_shards=2)
    first = _direct(src, tmp_path / "out", num_shards=2)
    assert len(first.written) == 6
    assert release_input(src, settings, progress=False).packed.reused == FILES["hf-parquet"]
    again = _direct(src, tmp_path / "out", num_shards=2)
    assert (len(again.written), again.kept) == (0, 6)
    assert any(re.fullmatch(rf"first pass: {FILES['hf-parquet']} of {FILES['hf-parquet']} "
                            rf"files read in an earlier run, kept in {tmp_path}/cache/\S+",
                            n) for n in again.notes), again.notes
    val = src / "data" / "validation-00000-of-00001.parquet"
    st = val.stat()
    os.utime(val, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # re-downloaded
    assert release_input(src, settings, progress=False).packed.reused == \
        FILES["hf-parquet"] - 1  # that file is read twice again, the others once
    third = _direct(src, tmp_path / "out", num_shards=2)
    assert sorted(r.name for r in third.written) == ["val-000000.tar", "val-000001.tar"]
    assert third.kept == 4
    # another OUT, another shard count: the same samples, each file read once
    other = _direct(src, tmp_path / "other", num_shards=3)
    keys = pq.read_table(tmp_path / "out" / "index.parquet", columns=["key", "jpg_crc32"])
    keys2 = pq.read_table(tmp_path / "other" / "index.parquet", columns=["key", "jpg_crc32"])
    assert sorted(keys.to_pylist(), key=str) == sorted(keys2.to_pylist(), key=str)
    assert len(other.written) == 9


@pytest.mark.parametrize("layout, case, expected", [
    ("blurred-tar", "symlink", r"val_blurred.tar.gz: member 'val_blurred/n\d+/evil.jpg' is "
                               r"a symlink"),
    ("blurred-tar", "dotdot", r"val_blurred.tar.gz: member 'val_blurred/../../evil.jpg' is not "
                              r"<class folder>/<file>"),
    ("blurred-tar", "twice", r"both be extracted as n\d+/ILSVRC2012_val_\d+\.jpg"),
    ("hf-tar", "symlink", r"val_images.tar.gz: member 'evil.JPEG' is not a plain file"),
    ("hf-tar", "no suffix", r"'ILSVRC2012_val_00000001.JPEG' does not end in _<wnid>.JPEG"),
    ("hf-tar", "two archives", r"train_images_0.tar.gz: member .* and .*train_images_1.tar.gz: "
                               r"member .* would both be extracted as n\d+/n\d+_\d+\.JPEG"),
    ("hf-parquet", "label", r"validation-00000-of-00001.parquet row 0: .* the label column "
                            r"says"),
    ("hf-parquet", "two files", r"train-00000-of-00002.parquet row 0 \('n\d+_\d+_n\d+.JPEG'\) "
                                r"and .*train-00001-of-00002.parquet row 12 .* would both be "
                                r"extracted as n\d+/n\d+_\d+\.JPEG"),
])
def test_hostile_or_contradictory_members_are_refused(make_sample, tmp_path, layout, case,
                                                      expected):
    src, _ = make_sample(layout, **_spec(layout))
    if layout == "blurred-tar":
        def edit(members):
            name, data = members[-1][0].name, members[-1][1]
            folder = name.rsplit("/", 1)[0]
            extra = {"symlink": _member(f"{folder}/evil.jpg", kind=tarfile.SYMTYPE),
                     "dotdot": _member("val_blurred/../../evil.jpg", data),
                     "twice": _member(name, data)}[case]
            return [*members, extra]
        _rewrite_tar(src / "val_blurred.tar.gz", edit)
    elif case == "two archives":  # a member of the first train archive again in the second
        with tarfile.open(src / "train_images_0.tar.gz", "r:gz") as t:
            m = t.next()
            dup = _member(m.name, t.extractfile(m).read())
        _rewrite_tar(src / "train_images_1.tar.gz", lambda ms: [*ms, dup])
    elif layout == "hf-tar":
        extra = {"symlink": _member("evil.JPEG", kind=tarfile.SYMTYPE),
                 "no suffix": _member("ILSVRC2012_val_00000001.JPEG")}[case]
        _rewrite_tar(src / "val_images.tar.gz", lambda ms: [*ms, extra])
    elif case == "two files":  # the first row of one train file again in the other
        one, two = (src / "data" / f"train-0000{i}-of-00002.parquet" for i in (0, 1))
        pq.write_table(pa.concat_tables([pq.read_table(two), pq.read_table(one).slice(0, 1)]),
                       two)
    else:
        path = src / "data" / "validation-00000-of-00001.parquet"
        table = pq.read_table(path)
        labels = table.column("label").to_pylist()
        labels[0] = (labels[0] + 1) % 1000
        pq.write_table(table.set_column(1, "label", pa.array(labels, pa.int64())), path)
    before = tree_hash(src)
    r = CliRunner().invoke(main, ["shard", "--src", str(src), "--out", str(tmp_path / "out"),
                                  "-q"])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert re.search(expected, r.output), r.output
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert tree_hash(src) == before


@pytest.mark.parametrize("layout", ["blurred-tar", "hf-tar"])
def test_truncated_archive_is_named(make_sample, tmp_path, layout):
    src, _ = make_sample(layout, **_spec(layout))
    archive = src / ("train_blurred.tar.gz" if layout == "blurred-tar" else
                     "train_images_0.tar.gz")
    with open(archive, "r+b") as f:
        f.truncate(archive.stat().st_size // 2)
    with pytest.raises(PrepError, match=rf"{archive.name}: truncated or corrupt"):
        _direct(src, tmp_path / "out")


def test_a_file_that_changes_between_the_passes_is_named(make_sample, tmp_path):
    """The second pass checks each member against the first (size and CRC-32): a release
    rewritten in between stops the run naming the member, and leaves no partial."""
    src, _ = make_sample("hf-tar", **SPEC)
    settings = ShardSettings(num_shards=2)
    inp = release_input(src, settings, progress=False)
    raw = gzip.decompress((src / "val_images.tar.gz").read_bytes())

    def edit(members):
        info, data = members[0]
        return [(info, data[:-2] + bytes([data[-2] ^ 1]) + data[-1:]), *members[1:]]

    _rewrite_tar(src / "val_images.tar.gz", edit)
    assert gzip.decompress((src / "val_images.tar.gz").read_bytes()) != raw
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PrepError, match=r"val_images.tar.gz: member 'ILSVRC2012_val_\d+_n\d+"
                                        r"\.JPEG' changed since this run first read it"):
        _shard_input(inp, out, settings, workers=2, shard_range=(0, 1), force=False,
                     finalize_only=False, progress=False, t0=0.0)
    assert not list(out.glob("*.partial")) and not list(out.glob("*.tar"))


def test_sigkill_in_the_second_pass_then_rerun_is_byte_identical(make_sample, tmp_path):
    """`prep shard --src` killed (kill -9) while the second pass writes: no finished shard
    is left half-written, the workers die with it, and the rerun ends with the bytes of an
    uninterrupted run."""
    src, _ = make_sample("hf-tar", classes=8, train_per_class=60, val_per_class=4, size=96)
    ref = tmp_path / "ref"
    opts = ["--num-shards", "8", "--max-size", "64", "--workers", "1"]  # resized: slow
    cmd = [sys.executable, "-m", "prep.cli", "shard", "-q", "--src", str(src), *opts]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    assert subprocess.run([*cmd, "--out", str(ref)], capture_output=True, env=env
                          ).returncode == 0
    for attempt in range(3):  # a stalled test process can miss the window: try again
        out = tmp_path / f"killed{attempt}"
        proc = subprocess.Popen([*cmd, "--out", str(out)], start_new_session=True, env=env)
        deadline = time.time() + 60
        while time.time() < deadline and not list(out.glob("*.partial")):
            time.sleep(0.005)
        assert not sigkill_with_workers(proc)
        if list(out.glob("*.partial")) and not (out / "_info.json").exists():
            break
    assert list(out.glob("*.partial")) and not (out / "_info.json").exists()
    rerun = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert (out / "SHA256SUMS").read_bytes() == (ref / "SHA256SUMS").read_bytes()
    assert not list(out.glob("*.partial"))


def test_cli_on_a_parquet_release(make_sample, tmp_path):
    src, _ = make_sample("hf-parquet", **SPEC)
    r = CliRunner().invoke(main, ["shard", "--src", str(src), "--out", str(tmp_path / "o"),
                                  "-q", "--num-shards", "2"])
    assert r.exit_code == 0, r.output
    assert "wrote 6 shards" in r.output and "subset: 4 of 1000 classes" in r.output


@pytest.mark.parametrize("layout", ["blurred-tar", "hf-tar"])
def test_without_isal_zlib_reads_the_same_shards(make_sample, tmp_path, monkeypatch, layout):
    """ISA-L inflates the gzip releases where it is installed; without it (the GPU machine
    has no package index) tarfile's zlib gives the very same shards."""
    src, _ = make_sample(layout, bad_files=True, **_spec(layout))
    _direct(src, tmp_path / "isal", num_shards=2, on_error="skip")
    monkeypatch.setitem(sys.modules, "isal", None)  # `import isal` raises ImportError
    monkeypatch.setitem(sys.modules, "isal.igzip", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fresh-cache"))  # read again
    from prep.extract import open_tar_stream

    with open(next(src.glob("*.tar.gz")), "rb") as raw:
        assert type(open_tar_stream(raw).fileobj.fileobj).__module__ != "isal.igzip"
    _direct(src, tmp_path / "zlib", num_shards=2, on_error="skip")
    assert (tmp_path / "zlib" / "SHA256SUMS").read_bytes() == \
        (tmp_path / "isal" / "SHA256SUMS").read_bytes()


def _damage(archive, how: str) -> None:
    """Damage a release file as a bad download or disk does: one tar header in the middle
    no longer sums to its checksum (tarfile takes it for the end of the archive), or the
    gzip trailer's CRC no longer matches (tarfile never reads that far), one header is wiped
    to zeros, or an empty member added last has a damaged header (only zeros follow it)."""
    raw = archive.read_bytes()
    gz = raw[:2] == b"\x1f\x8b"
    data = bytearray(gzip.decompress(raw) if gz else raw)
    if how == "header":
        with tarfile.open(fileobj=io.BytesIO(bytes(data))) as t:
            offset = t.getmembers()[5].offset
        data[offset + 10] ^= 0x20  # a letter of the name: the checksum no longer holds
        raw = gzip.compress(bytes(data), mtime=0) if gz else bytes(data)
    elif how == "zeros":  # a header wiped: tarfile takes its block for the end
        with tarfile.open(fileobj=io.BytesIO(bytes(data))) as t:
            offset = t.getmembers()[5].offset
        data[offset:offset + 512] = bytes(512)
        raw = gzip.compress(bytes(data), mtime=0) if gz else bytes(data)
    elif how == "last-empty":
        with tarfile.open(fileobj=io.BytesIO(bytes(data))) as t:
            last = t.getmembers()[-1]
            end = t.offset  # the end-of-archive zeros start here
        info = tarfile.TarInfo(last.name.replace(".JPEG", "9.JPEG"))
        header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
        header[10] ^= 0x20
        data[end:end + len(header)] = header
        data += bytes(1024)  # end-of-archive zeros after it
        raw = gzip.compress(bytes(data), mtime=0) if gz else bytes(data)
    else:
        raw = raw[:-8] + bytes([raw[-8] ^ 1]) + raw[-7:]  # CRC-32, then the size
    archive.write_bytes(raw)


@pytest.mark.parametrize("layout, name, how", [
    ("hf-tar", "val_images.tar.gz", "header"), ("hf-tar", "val_images.tar.gz", "crc"),
    ("blurred-tar", "val_blurred.tar.gz", "header"),
    ("blurred-tar", "val_blurred.tar.gz", "crc"),
    ("hf-tar", "val_images.tar.gz", "last-empty"), ("hf-tar", "val_images.tar.gz", "zeros"),
    ("blurred-tar", "val_blurred.tar.gz", "last-empty"),
    ("ilsvrc2012-tar", "ILSVRC2012_img_val.tar", "header"),  # a plain tar has no CRC
    ("ilsvrc2012-tar", "ILSVRC2012_img_val.tar", "zeros"),  # --src: prep.tarheaders
    ("ilsvrc2012-tar", "ILSVRC2012_img_val.tar", "last-empty"),
])
def test_a_damaged_archive_is_named_never_read_in_part(make_sample, tmp_path, layout, name,
                                                       how):
    """A damaged header past the first member, or a gzip CRC that does not match: the
    archive is named on both paths, never listed up to the damage and taken as whole (it
    was: 5 of 12 val images extracted and linked, exit 0)."""
    src, _ = make_sample(layout, **_spec(layout))
    _damage(src / name, how)
    before = tree_hash(src)
    expected = rf"{name}: (truncated or corrupt|damaged tar header)"
    with pytest.raises(PrepError, match=expected):
        _direct(src, tmp_path / "direct")
    with pytest.raises(PrepError, match=expected):
        _two_step(src, tmp_path, tmp_path / "two")
    assert not (tmp_path / "view").exists() and tree_hash(src) == before


BIG = dict(classes=4, train_per_class=40, val_per_class=3, size=256)  # 3.4 MB of train


def _split_tasks(src, settings, workers):
    """The second pass's tasks for a release, as write_packed would make them."""
    from shards.packed_write import _layout, _stats, _tasks

    inp = release_input(src, settings, progress=False, workers=workers)
    packed, jobs = inp.packed, {}
    stats = {split: _stats(paths) for split, paths in packed.files.items()}
    for n, plan in enumerate(inp.plans):
        _layout(n, plan, packed, stats[plan.split], settings, jobs)
    return packed, jobs, _tasks(jobs, packed, workers)


@pytest.mark.skipif(not gzindex.available(), reason="rapidgzip is not installed")
@pytest.mark.parametrize("layout, workers, split_files", [
    ("blurred-tar", 2, ["train_blurred.tar.gz"]),
    ("hf-tar", 4, ["train_images_0.tar.gz", "train_images_1.tar.gz"])])
def test_a_large_archive_is_read_on_several_cores(make_sample, tmp_path, monkeypatch,
                                                   layout, workers, split_files):
    """With rapidgzip, the first pass over a tar.gz with more than one worker's share of the
    bytes (the one train archive of the face-blurred release) inflates it on its share of
    the cores and keeps a seek index beside the first pass; the second pass splits its
    members into as many ranges, one worker each, each read from its first member's offset:
    every member once, in file order, the ranges' bytes about equal. The shards are those
    of the two-step path (ISA-L, one reader per file)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src, _ = make_sample(layout, bad_files=True, **BIG)
    settings = ShardSettings(num_shards=3, on_error="skip")
    packed, jobs, tasks = _split_tasks(src, settings, workers)
    indexed = [p.name for split, paths in packed.files.items()
               for p, ix in zip(paths, packed.indexes[split]) if ix is not None]
    assert indexed == split_files
    for name in split_files:
        (split, f), = [(s, i) for s, ps in packed.files.items() for i, p in enumerate(ps)
                       if p.name == name]
        ranges = [t for t in tasks if t[0].__name__ == "write_range" and t[1].name == name]
        assert len(ranges) == 2
        ordinals = [e[0] for t in ranges for e in t[3]]
        assert ordinals == sorted(e[0] for e in jobs[split, f])  # each once, in file order
        scan = packed.scans[split][f]
        halves = [sum(scan.sizes[e[0]] for e in t[3]) for t in ranges]
        assert abs(halves[0] - halves[1]) < 0.15 * sum(halves), halves
    assert len(tasks) == len(jobs) + len(split_files)  # the other files: whole, one task
    from shards.packed_write import _tasks

    with monkeypatch.context() as m:  # a kept index, and rapidgzip gone since: whole files
        m.setattr(gzindex, "available", lambda: False)
        assert [t[0].__name__ for t in _tasks(jobs, packed, workers)] == \
            ["write_file"] * len(jobs)
    direct = shard_release(src, tmp_path / "direct", settings, workers=workers, progress=False)
    two = _two_step(src, tmp_path, tmp_path / "two", num_shards=3, on_error="skip")
    same_as_two_step(direct, two, 6 if layout == "blurred-tar" else 8, 1)  # 2 test shards


@pytest.mark.skipif(not gzindex.available(), reason="rapidgzip is not installed")
def test_the_seek_index_reads_each_member_at_its_offset(make_sample, tmp_path):
    """The first pass's offsets and the exported index: each member read alone, from the
    last one back to the first (each a seek through the index), has the bytes the first
    pass measured (no bad files: stored = the member's bytes)."""
    from prep.crc import crc32
    from shards.packed_scan import scan_file

    src, _ = make_sample("blurred-tar", **BIG)
    archive, index = src / "train_blurred.tar.gz", tmp_path / "train.gzindex"
    scan = scan_file("blurred", archive, "train", ShardSettings(), threads=2,
                     index_to=str(index))
    assert index.is_file() and len(scan.offsets) == len(scan.names) == 160
    assert scan.offsets == sorted(scan.offsets) and scan.offsets[0] == 512  # after its header
    with gzindex.reading_at(archive, index) as f:
        for o in reversed(range(len(scan.names))):
            f.seek(scan.offsets[o])
            assert crc32(f.read(scan.sizes[o])) == scan.crcs[o], scan.names[o]


@pytest.mark.parametrize("layout, how", [
    *[("blurred-tar", how) for how in ("half", "block", "trailer", "junk", "gzip-junk", "crc")],
    ("hf-tar", "half"), ("hf-tar", "junk")])
def test_a_damaged_train_archive_gets_the_verdict_of_one_reader(make_sample, tmp_path, layout,
                                                                 how, capfd):
    """rapidgzip reads some damage without an error (a file cut short at the end of a
    deflate block, bytes after the gzip data): every damaged file gets the verdict and the
    message that ISA-L's one reader gives (workers=1), and no line of rapidgzip's own."""
    src, _ = make_sample(layout, **BIG)
    name, many = {"blurred-tar": ("train_blurred.tar.gz", 2),
                  "hf-tar": ("train_images_0.tar.gz", 4)}[layout]  # a share > 1 worker
    archive = src / name
    raw = archive.read_bytes()
    damaged = {"half": raw[: len(raw) // 2], "block": raw[:5000], "trailer": raw[:-4],
               "junk": raw + b"junkjunk", "gzip-junk": raw + b"\x1f\x8b\x08\x00junk",
               "crc": raw[:-8] + bytes([raw[-8] ^ 1]) + raw[-7:]}[how]
    archive.write_bytes(damaged)
    errors = []
    for workers in (1, many):
        with pytest.raises(PrepError) as got:
            shard_release_at(src, tmp_path / f"out{workers}", workers, tmp_path / f"c{workers}")
        errors.append(str(got.value))
    assert errors[0] == errors[1] and f"{name}: truncated or corrupt" in errors[0]
    from shards.packed_scan import scan_file  # the first pass itself, not a later one

    with pytest.raises(PrepError) as first:
        scan_file({"blurred-tar": "blurred"}.get(layout, layout), archive, "train",
                  ShardSettings(), threads=2,
                  index_to=str(tmp_path / "index"))
    assert str(first.value) == errors[0] and not (tmp_path / "index").exists()
    err = capfd.readouterr().err
    assert "rapidgzip" not in err.lower() and "Unexpected end" not in err, err
    assert not list((tmp_path / f"c{many}").rglob(f"*{name}*.gzindex"))  # none of it


def shard_release_at(src, out, workers, cache):
    os.environ["XDG_CACHE_HOME"] = str(cache)
    try:
        return shard_release(src, out, ShardSettings(num_shards=2), workers=workers,
                             progress=False)
    finally:
        del os.environ["XDG_CACHE_HOME"]


def test_a_cut_train_archive_is_one_line_from_the_cli(make_sample, tmp_path):
    """rapidgzip prints a line of its own when the gzip trailer is cut off ('Unexpected end
    of file when getting block ...'); the user sees only prep's one line, exit 1."""
    src, _ = make_sample("blurred-tar", **BIG)
    archive = src / "train_blurred.tar.gz"
    archive.write_bytes(archive.read_bytes()[:-4])
    r = subprocess.run([sys.executable, "-m", "prep.cli", "shard", "-q", "--src", str(src),
                        "--out", str(tmp_path / "out"), "--workers", "2"],
                       capture_output=True, text=True,
                       env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: {archive}: truncated or corrupt"), r.stderr


@pytest.mark.skipif(not gzindex.available(), reason="rapidgzip is not installed")
def test_a_damaged_seek_index_still_gives_the_same_shards(make_sample, tmp_path, monkeypatch):
    """The kept seek index cut short or overwritten (a cache on a bad disk): the second pass
    reads its ranges without it (slower), and writes the same bytes."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src, _ = make_sample("blurred-tar", **BIG)
    settings = ShardSettings(num_shards=3)
    shard_release(src, tmp_path / "ref", settings, workers=2, progress=False)
    (index,) = (tmp_path / "cache").rglob("*.gzindex")
    for damage in (index.read_bytes()[: index.stat().st_size // 2], b"garbage"):
        index.write_bytes(damage)
        out = tmp_path / f"out{len(damage)}"
        shard_release(src, out, settings, workers=2, progress=False)
        assert (out / "SHA256SUMS").read_bytes() == (tmp_path / "ref" / "SHA256SUMS").read_bytes()


@pytest.mark.skipif(not gzindex.available(), reason="rapidgzip is not installed")
def test_an_index_that_cannot_be_written_keeps_the_read(make_sample, tmp_path, monkeypatch):
    """The cache folder cannot take the seek index (here: gone): the first pass keeps what
    it read (no second read through ISA-L), and no index, whole or part, is left."""
    from shards import packed_scan

    src, _ = make_sample("blurred-tar", **BIG)
    reads = []
    scan = packed_scan._scan
    monkeypatch.setattr(packed_scan, "_scan", lambda *a: reads.append(a[-1]) or scan(*a))
    index = tmp_path / "gone" / "train.gzindex"
    out = packed_scan.scan_file("blurred", src / "train_blurred.tar.gz", "train",
                                ShardSettings(), threads=2, index_to=str(index))
    assert len(out.names) == 160 and len(reads) == 1 and reads[0] is not None  # rapidgzip's
    assert not (tmp_path / "gone").exists()


@pytest.mark.skipif(not gzindex.available(), reason="rapidgzip is not installed")
@pytest.mark.parametrize("how", ["garbage", "half"])
def test_an_archive_that_changes_before_its_ranges_are_read_is_named(make_sample, tmp_path,
                                                                     monkeypatch, how):
    """The train archive replaced after the first pass (other bytes; cut in half): the
    second pass's ranges, read through the old index, stop the run naming the archive and
    a member, one PrepError (no worker's traceback), and leave no partial."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src, _ = make_sample("blurred-tar", **BIG)
    settings = ShardSettings(num_shards=3)
    inp = release_input(src, settings, progress=False, workers=2)
    assert inp.packed.indexes["train"][0] is not None
    archive = src / "train_blurred.tar.gz"
    raw = archive.read_bytes()
    archive.write_bytes(os.urandom(len(raw)) if how == "garbage" else raw[: len(raw) // 2])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PrepError, match=r"train_blurred.tar.gz: (cannot be read at )?member "
                                        r"'train_blurred/n\d+/n\d+_\d+\.jpg' .*changed since "
                                        r"this run first read it") as got:
        _shard_input(inp, out, settings, workers=2, shard_range=(0, 1), force=False,
                     finalize_only=False, progress=False, t0=0.0)
    assert "[Thread" not in str(got.value) and len(str(got.value)) < 400, got.value
    assert not list(out.glob("*.partial")) and not list(out.glob("*.tar"))
