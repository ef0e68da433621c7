"""`prep shard --src RELEASE`: the shard plans of a release read in place, without
extracting it.

The release is listed (prep.imagenet.scan_archives) and checked by the very checks
`prep imagenet` runs (validate_scan: names, keys, every val label source against the
others and the real labels, classes, counts); the sample lists are the meta/ files that
`prep imagenet` would write for it, parsed as `prep shard --data` parses them. So the
shards hold the same samples in the same shards and order as extracting, linking and
sharding; only each sample's `source` names its archive and member.

Read in place: the original ILSVRC2012 tars (plain tars: one `pread` per image), and the
compressed releases (face-blurred and Hugging Face tar.gz, Parquet), each file read twice
(shards/packed_scan.py, shards/packed_write.py). Unpacked copies are refused with the
two-step path to take.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from prep.errors import PrepError
from prep.gcpause import gc_paused
from prep.imagenet import meta_files, scan_archives, val_view_path, validate_scan
from prep.layout import detect_layout
from prep.packed import packed_files
from shards.packed_scan import (
    PackedRelease,
    file_and_member,
    first_pass,
    packed_scan,
)
from shards.plan import ShardInput, assign, shard_count
from shards.settings import ShardSettings
from shards.source import parse_samples


def release_input(src: Path, s: ShardSettings, progress: bool = True, workers: int = 1
                  ) -> ShardInput:
    """The listed, checked and planned release at `src` (see the module's docstring);
    `workers` processes list the train tar's class tars."""
    with gc_paused():
        return _release_input(src, s, progress, workers)


def _release_input(src: Path, s: ShardSettings, progress: bool, workers: int) -> ShardInput:
    lay = detect_layout(src)
    packed = None
    if lay.hf_files or (lay.name == "blurred" and not (lay.train_dir or lay.val_dir)):
        keep = checked_record_dir(lay.src)
        files = {split: paths for split, paths in packed_files(lay).items()
                 if split in ("train", "val") or split in s.splits}  # test: when asked for
        packed = first_pass(lay.name, files, s, keep, progress, workers)
        scan = packed_scan(lay, packed)
    elif lay.name == "ilsvrc2012-tar":
        scan = scan_archives(lay, progress, workers)
    else:
        unpacked = "a (partly) unpacked" if lay.archives else "an unpacked"
        raise PrepError(f"--src {lay.src}: holds {unpacked} {lay.name} copy, not a release "
                        "in archives that prep shard --src reads in place; link it and shard "
                        f"the view: `prep imagenet --src {lay.src} --link DIR"
                        f"{' --extract-to DIR2' if lay.archives else ''}`, then "
                        "`prep shard --data DIR/imagenet`")
    v = validate_scan(lay, scan)
    wnids = [c.wnid for c in v.classes]
    texts = meta_files(v.classes, scan.train, scan.val_files, v.val_labels, scan.test, {})
    # each view path back to its place in the archives
    where_val = {val_view_path(rel, v.val_labels[stem]): rel
                 for stem, rel in scan.val_files.items()}
    plans = []
    for split in s.splits:
        files = packed.files.get(split) if packed else [lay.archives.get(split)]
        if f"{split}.txt" not in texts or not files or not files[0]:
            continue  # test is optional: only when the release has test images
        samples = parse_samples(texts[f"{split}.txt"].splitlines(True),
                                f"{files[0]} (its {split} list)", split, wnids)
        where, members = scan.where[split], []
        for smp in samples:
            rel = where_val[smp.path] if split == "val" else smp.path
            offset, size = where[rel]
            members.append((offset, size, _source(packed, split, files, rel, offset)))
        n = shard_count(len(samples), s.num_shards, s.samples_per_shard)
        split_plans = assign(split, samples, n, s.seed, "" if packed else str(files[0]),
                             members)
        for p in split_plans if packed else ():
            p.files = [str(f) for f in files]
        plans += split_plans
    extra = {"release": {"layout": lay.name, "counts": v.counts}}
    if packed and packed.reused:
        n = sum(map(len, packed.files.values()))
        v.notes.append(f"first pass: {packed.reused} of {n} files read in an earlier run, "
                       f"kept in {keep}")
    return ShardInput(lay.src, wnids, plans, extra, None if packed else
                      checked_record_dir(lay.src), scan.problems, v.notes, packed)


def _source(packed: PackedRelease | None, split: str, files: list[Path], rel: str,
            offset: int) -> str:
    """How the json and the index name a sample: `ARCHIVE:MEMBER` (a Parquet file's row
    by its `path`)."""
    if packed is None:  # train: `n01440764/x.JPEG` is member x.JPEG of class tar n01440764.tar
        inner = rel.replace("/", ".tar/", 1) if split == "train" else rel
        return f"{files[0].name}:{inner}"
    f, o = file_and_member(offset)
    return f"{files[f].name}:{packed.scans[split][f].names[o]}"


def checked_record_dir(src: Path) -> Path | None:
    """Where the record of a release's members that passed the strict check lives: a
    cache folder of its own ($XDG_CACHE_HOME, else ~/.cache: imagenet-prep/checked/ and a
    hash of the release's real path), never the release (only read) nor OUT. A member
    counts as checked while its archive keeps the identity it had (prep.checked: size,
    mtime, ctime, inode, device). None when no such folder can be made (then every member
    is checked, as without a record)."""
    real = os.path.realpath(src)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = base / "imagenet-prep" / "checked" / hashlib.sha256(real.encode()).hexdigest()[:16]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "release.txt").write_text(real + "\n")  # whose record this is
    except OSError:
        return None
    return folder
