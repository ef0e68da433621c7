"""`prep imagenet`: any ILSVRC copy -> a correct, linked, indexed dataset view.

Steps: detect the layout, (extract archives), list the splits, read every val
label source and cross-check them, validate classes and counts, then plan and
apply the links and meta/ files. Labels are the sorted-WNID index.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prep.archive_listing import Where, list_archives
from prep.checked import CheckedRecord, Identity
from prep.classes import (
    NUM_CLASSES,
    ClassInfo,
    build_class_table,
    classes_csv,
    read_map_clsloc,
    reference_val_labels,
)
from prep.errors import PrepError
from prep.formats import VIEW, stamp
from prep.labels import (
    LabelSource,
    check_official,
    cross_check,
    read_devkit,
    read_loc_val_csv,
    read_xml_archive,
    read_xml_dir,
)
from prep.layout import Layout, detect_layout, require_splits
from prep.link import SRC_VAL, Changes, Outputs, apply_outputs, check_link_dir
from prep.packed import extract_packed, packed_files
from prep.scan import (
    Problems,
    check_images,
    check_unique_keys,
    compare_with_list,
    list_images,
    scan_class_split,
)
from prep.tar_extract import extract_ilsvrc2012
from prep.workers import process_pool

SHIPPED = "real ILSVRC2012 val labels (shipped)"
EXPECTED = {"train": 1_281_167, "val": 50_000, "test": 100_000}  # ILSVRC2012 CLS-LOC


@dataclass(kw_only=True)
class PrepReport:
    layout: str
    src: Path
    link_dir: Path
    classes: list[ClassInfo]
    counts: dict[str, int]
    label_sources: list[str]
    problems: Problems
    changes: Changes
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0))))


def _rel(path: Path, root: Path) -> str:
    """How problems name a file: relative to SRC, or the split name for extracted archives."""
    return os.path.relpath(path, root) if path.is_relative_to(root) else path.name


def _extract(lay: Layout, extract_to: Path | None, progress: bool, workers: int) -> Layout:
    if extract_to is None:
        files = [p.name for p in lay.archives.values()] + \
            [p.name for ps in lay.hf_files.values() for p in ps[:1]]
        raise PrepError(f"--src {lay.src}: holds {lay.name} archives ({', '.join(files)}"
                        "...); pass --extract-to DIR (outside the source, ~150 GB free) to "
                        "unpack them")
    dest = check_link_dir(extract_to, lay.src)  # same rule: never inside the source
    if lay.hf_files or lay.name == "blurred":  # Hugging Face's files (suffixed names back
        # to the original ones), the face-blurred tar.gz files of class folders
        dirs, labels = extract_packed(lay.name, packed_files(lay), dest, workers, progress)
        if lay.hf_files:
            lay.suffix_labels = labels
        lay.train_dir, lay.val_dir, lay.test_dir = (dirs.get(s) for s in
                                                    ("train", "val", "test"))
        require_splits(lay)
        return lay
    dirs = extract_ilsvrc2012(lay.archives, dest, workers, progress)
    lay.train_dir, lay.val_dir, lay.test_dir = (dirs.get(s) for s in ("train", "val", "test"))
    require_splits(lay)
    lay.name = "ilsvrc2012-tar"
    return lay


@dataclass
class SourceScan:
    """Everything read from the source: listings, label sources, problems."""

    train: dict[str, list[str]]  # wnid -> sorted file names
    val_files: dict[str, str]  # val stem -> path relative to the val dir
    test: list[str]
    sources: list[LabelSource]
    ids: dict[str, int] | None  # WNID -> ILSVRC2012_ID from the copy's own devkit
    problems: Problems
    # --check full: {split: {path relative to the split dir: identity}} of images it passed
    checked: dict[str, dict[str, Identity]]
    # read from archives (scan_archives): {split: {path as extracted: (offset, size)}}
    where: dict[str, dict[str, Where]] = field(default_factory=dict)


def read_source(lay: Layout, check: str, workers: int, progress: bool) -> SourceScan:
    """List every split and read every val label source. One process pool serves both the
    train listing and the XML parsing, submitted from two threads so they overlap while
    this process lists val and test."""
    pool = process_pool(workers) if workers > 1 else None
    try:
        with ThreadPoolExecutor(2) as threads:
            train_rel = _rel(lay.train_dir, lay.src)
            train_job = threads.submit(scan_class_split, lay.train_dir, train_rel, pool,
                                       progress, check != "fast")
            xml_job = threads.submit(read_xml_dir, lay.val_xml_dir, pool) \
                if lay.val_xml_dir else None
            val_files, val_folders, probs = _scan_val(lay, pool)
            test = []
            if lay.test_dir:
                test, tprobs = list_images(str(lay.test_dir), _rel(lay.test_dir, lay.src))
                probs.merge(tprobs)
            sources, ids = _other_label_sources(lay, val_folders)
            if xml_job:
                sources.insert(0, xml_job.result())
            train, tprobs = train_job.result()
        probs.merge(tprobs)
        if check != "fast" and lay.train_list:
            probs.merge(compare_with_list(train, lay.train_list, train_rel))
        checked: dict[str, dict[str, Identity]] = {}
        if check == "full":
            rels = [f"{w}/{n}" for w in train for n in train[w]]
            tprobs, checked["train"] = check_images(lay.train_dir, rels, pool, progress)
            probs.merge(_prefixed(tprobs, train_rel))
            vrel = [val_files[s] for s in sorted(val_files)]
            vprobs, checked["val"] = check_images(lay.val_dir, vrel, pool, progress)
            probs.merge(_prefixed(vprobs, _rel(lay.val_dir, lay.src)))
    except BaseException:
        if pool:
            pool.stop()
        raise
    if pool:
        pool.shutdown()
    return SourceScan(train, val_files, test, sources, ids, probs, checked)


def scan_archives(lay: Layout, progress: bool, workers: int = 1) -> SourceScan:
    """What read_source finds in the extracted original ILSVRC2012 tars, read from the tars
    themselves (prep.archive_listing): the same listings, problems and label sources. Sets
    the layout's split folders to the archives, which name them in errors. `.where` of the
    listing: each image's place in its archive."""
    if workers > 1:
        with process_pool(workers) as pool:  # stopped at once on an error (WorkerPool)
            listing = list_archives(lay.archives, progress, pool)
    else:
        listing = list_archives(lay.archives, progress)
    lay.train_dir, lay.val_dir = lay.archives["train"], lay.archives["val"]
    lay.test_dir = lay.archives.get("test")
    return listed_scan(lay, listing.train, listing.val, listing.test, listing.problems,
                       listing.where)


def listed_scan(lay: Layout, train: dict[str, list[str]],
                val: list[str] | dict[str, list[str]], test: list[str], problems: Problems,
                where: dict[str, dict[str, Where]]) -> SourceScan:
    """The SourceScan of a source listed from its archives rather than a folder: `val` the
    sorted image names of a flat val, or {wnid: names} of one in class folders (then a
    label source, as read_source makes it). The layout's split folders name the archives."""
    files, folders = _val_files(val, lay.val_dir)
    sources, ids = _other_label_sources(lay, folders)
    return SourceScan(train, files, test, sources, ids, problems, {}, where)


def _val_files(val: list[str] | dict[str, list[str]], val_dir: Path
               ) -> tuple[dict[str, str], dict[str, list[str]] | None]:
    """({stem: path relative to val}, the class folders or None) of val's listing, each
    image once, one key each."""
    if isinstance(val, dict):
        _check_val_once(val, val_dir)
        check_unique_keys(val, str(val_dir))
        return {n.rsplit(".", 1)[0]: f"{w}/{n}" for w, names in val.items() for n in names}, val
    check_unique_keys({"": val}, str(val_dir))
    return {n.rsplit(".", 1)[0]: n for n in val}, None


def _other_label_sources(lay: Layout, val_folders: dict[str, list[str]] | None
                         ) -> tuple[list[LabelSource], dict[str, int] | None]:
    sources, ids = [], None
    if lay.val_xml_archive:
        sources.append(read_xml_archive(lay.val_xml_archive))
    if lay.loc_val_csv:
        sources.append(read_loc_val_csv(lay.loc_val_csv))
    if lay.devkit:
        gt, ids = read_devkit(lay.devkit)
        if gt:
            sources.append(gt)
    if val_folders is not None:
        labels = {n.rsplit(".", 1)[0]: w for w, names in val_folders.items() for n in names}
        sources.append(LabelSource("val class folders", lay.val_dir, labels))
    if ids is None and lay.map_clsloc:
        ids = read_map_clsloc(lay.map_clsloc)
    if lay.suffix_labels is not None:
        sources.append(LabelSource("file-name suffixes (Hugging Face)", lay.val_dir,
                                   lay.suffix_labels))
    if lay.shipped_val_labels:
        sources.append(LabelSource(SHIPPED, Path("prep/data/LOC_val_solution.csv.gz"),
                                   reference_val_labels()))
    return sources, ids


def _scan_val(lay: Layout, pool: Executor | None) -> tuple[dict[str, str], dict | None, Problems]:
    """{stem: path relative to val dir} plus the class folders when val has them."""
    rel = _rel(lay.val_dir, lay.src)
    if lay.val_in_folders:
        listing, probs = scan_class_split(lay.val_dir, rel, pool)
    else:
        listing, probs = list_images(str(lay.val_dir), rel)
    return *_val_files(listing, lay.val_dir), probs


def _check_val_once(folders: dict[str, list[str]], val_dir: Path) -> None:
    """A val image in two class folders has two labels, and the folders are what labels
    val here: stop, naming both folders (never let the later folder win)."""
    where: dict[str, str] = {}
    for wnid, names in folders.items():
        for name in names:
            stem = name.rsplit(".", 1)[0]
            if stem in where:
                raise PrepError(f"{val_dir}: val image {stem} is in two class folders, "
                                f"{where[stem]}/ and {wnid}/: its label is ambiguous. Keep it "
                                "in the right folder only (the real val labels say which)")
            where[stem] = wnid


def _check_counts(counts: dict[str, int], n_classes: int, notes: list[str]) -> None:
    if n_classes != NUM_CLASSES:
        notes.append(f"subset: {n_classes} of {NUM_CLASSES} classes")
    for split, n in counts.items():
        if n and n != EXPECTED[split] and n_classes == NUM_CLASSES:
            what = "subset" if n < EXPECTED[split] else "MORE than ImageNet has"
            notes.append(f"{split}: {n:,} images, ImageNet has {EXPECTED[split]:,} ({what})")


def source_link_name(src: Path) -> str:
    """DIR/<basename of SRC> -> SRC, unless that name is the view's own (`imagenet`, as in
    `--src /datasets/imagenet`) or hidden: then `<basename>-source`."""
    name = src.name
    return f"{name}-source" if name in ("imagenet", "") or name.startswith(".") else name


def val_view_path(rel: str, wnid: str) -> str:
    """Where the view puts a val image (`rel`: its path in the source's val folder)."""
    return f"{wnid}/{rel.rpartition('/')[2]}"


def prep_json(provenance: dict) -> str:
    """meta/prep.json: where the view came from (and the marker of a folder prep made)."""
    return json.dumps(provenance, indent=2) + "\n"


def meta_files(classes: list[ClassInfo], train: dict[str, list[str]],
               val_files: dict[str, str], val_labels: dict[str, str], test: list[str],
               provenance: dict) -> dict[str, str]:
    """The view's meta/ files: the sample lists (train.txt, val.txt, test.txt) in the
    order `prep shard` reads them, the class tables and prep.json."""
    index = {c.wnid: c.index for c in classes}
    val_lines = []
    for stem in sorted(val_files):
        wnid = val_labels[stem]
        val_lines.append(f"{val_view_path(val_files[stem], wnid)} {index[wnid]}\n")
    # One str.join per class: 1.28 M lines in ~0.1 s instead of ~0.6 s with f-strings.
    train_lines = [f"{w}/" + f" {index[w]}\n{w}/".join(train[w]) + f" {index[w]}\n"
                   for w in sorted(train) if train[w]]
    meta = {
        "prep.json": prep_json(provenance),
        "train.txt": "".join(train_lines),
        "val.txt": "".join(val_lines),
        "synsets.txt": "".join(f"{c.wnid}\n" for c in classes),
        "synset_words.txt": "".join(f"{c.wnid} {c.words}\n" for c in classes),
        "classes.csv": classes_csv(classes),
    }
    if test:
        meta["test.txt"] = "".join(f"{n}\n" for n in test)
    return meta


def plan_outputs(lay: Layout, link_dir: Path, classes: list[ClassInfo],
                 train: dict[str, list[str]], val_files: dict[str, str],
                 val_labels: dict[str, str], test: list[str], provenance: dict) -> Outputs:
    out = Outputs()
    own = link_dir / source_link_name(lay.src)
    if os.path.realpath(own) != os.path.realpath(lay.src):  # src may itself live in DIR
        out.links[own.name] = str(lay.src)
    out.links["imagenet/train"] = str(lay.train_dir)
    if test:
        out.links["imagenet/test"] = str(lay.test_dir)
    # Val links are relative and short (`../../.src-val/FILE`, < 60 bytes) through one link
    # to the source's val dir: ext4 keeps such targets inside the inode; a longer absolute
    # target costs a 4 KB block and ~0.4 ms per link here (50,000 links: 200 MB, 20 s).
    out.links[f"imagenet/{SRC_VAL}"] = str(lay.val_dir)
    source = f"../../{SRC_VAL}/"
    for stem in sorted(val_files):
        rel = val_files[stem]
        out.val_links[val_view_path(rel, val_labels[stem])] = source + rel
    out.meta = {"prep.json": prep_json(provenance).encode()}  # the marker: written first

    def rest() -> dict[str, bytes]:
        meta = meta_files(classes, train, val_files, val_labels, test, provenance)
        return {k: v.encode() for k, v in meta.items() if k != "prep.json"}

    out.meta_later = rest
    return out


def prepare_imagenet(src: str | os.PathLike, link_dir: str | os.PathLike, *,
                     extract_to: str | os.PathLike | None = None, check: str = "fast",
                     force: bool = False, workers: int | None = None,
                     progress: bool = True) -> PrepReport:
    """Detect, validate and link an ImageNet copy; see the module docstring."""
    t0 = time.perf_counter()
    lay = detect_layout(src)
    link = check_link_dir(Path(link_dir), lay.src)
    if lay.archives or lay.hf_files:
        lay = _extract(lay, Path(extract_to) if extract_to else None, progress,
                       workers or default_workers())
    scan = read_source(lay, check, workers or default_workers(), progress)
    v = validate_scan(lay, scan)
    provenance = {
        **stamp(VIEW), "layout": lay.name, "src": str(lay.src),
        "train_dir": str(lay.train_dir), "val_dir": str(lay.val_dir),
        "label_sources": [f"{s.name}: {s.path}" for s in scan.sources],
        "classes": len(v.classes), "counts": v.counts, "label_space": "sorted-WNID index",
    }
    outputs = plan_outputs(lay, link, v.classes, scan.train, scan.val_files, v.val_labels,
                           scan.test, provenance)
    changes = apply_outputs(link, outputs, force,
                            report={"problems.txt": _problems_text(scan.problems)})
    _keep_checked(link / "imagenet", scan, v.val_labels)
    return PrepReport(layout=lay.describe(), src=lay.src, link_dir=link, classes=v.classes,
                      counts=v.counts, label_sources=[s.name for s in scan.sources],
                      problems=scan.problems, changes=changes, notes=v.notes,
                      seconds=time.perf_counter() - t0)


@dataclass
class ValidSource:
    """What the checks of a source's listing and labels settled."""

    classes: list[ClassInfo]
    val_labels: dict[str, str]  # val stem -> wnid, agreed by every label source
    counts: dict[str, int]
    notes: list[str]


def validate_scan(lay: Layout, scan: SourceScan) -> ValidSource:
    """Every check of a listed source, before anything is written: names, sample keys,
    the val label sources against each other and the real labels, classes and counts
    (missing val images are added to scan.problems). `prep imagenet` and `prep shard --src`
    (which lists the archives instead of a folder) run the same checks."""
    if scan.problems.broken_links:
        links = scan.problems.broken_links
        raise PrepError(f"{len(links)} broken symlink(s) in {lay.src}: "
                        + ", ".join(links[:5]) + "; the copy is incomplete: restore the "
                        "targets or remove the links, then rerun")
    if scan.problems.bad_names:
        bad = scan.problems.bad_names
        raise PrepError(f"{len(bad)} file name(s) in {lay.src} hold a newline, tab or other "
                        f"control character, or bytes that are not UTF-8, which would break "
                        f"the index files: "
                        + ", ".join(map(repr, bad[:5])) + "; rename them, then rerun")
    check_unique_keys(scan.train, str(lay.train_dir))
    if scan.test:
        check_unique_keys({"": scan.test}, str(lay.test_dir))
    val_labels = cross_check(scan.sources, scan.val_files)
    scan.problems.missing += _missing_val(scan.sources, scan.val_files, lay)
    _check_val_classes(val_labels, scan.train, lay)
    check_official(val_labels, lay.val_dir)
    classes = build_class_table(scan.train, scan.ids)
    _check_known(classes, lay)
    counts = {"train": sum(map(len, scan.train.values())), "val": len(scan.val_files),
              "test": len(scan.test)}
    notes: list[str] = []
    _check_counts(counts, len(classes), notes)
    return ValidSource(classes, val_labels, counts, notes)


def _keep_checked(view: Path, scan: SourceScan, val_labels: dict[str, str]) -> None:
    """What --check full passed, under the view's paths (`train/WNID/NAME`, `val/WNID/NAME`:
    what prep shard reads), so that `prep shard` does not check it again (prep.checked)."""
    if not scan.checked:
        return
    rows = [(f"train/{rel}", *ident) for rel, ident in scan.checked["train"].items()]
    stems = {rel: stem for stem, rel in scan.val_files.items()}
    rows += [(f"val/{val_labels[stems[rel]]}/{os.path.basename(rel)}", *ident)
             for rel, ident in scan.checked["val"].items() if stems[rel] in val_labels]
    record = CheckedRecord(view, strict=True)
    record.add(rows)
    record.close()


def _check_val_classes(val_labels: dict[str, str], train: dict[str, list[str]],
                       lay: Layout) -> None:
    unknown = sorted({w for w in val_labels.values() if w not in train})
    if unknown:
        stem = next(s for s, w in val_labels.items() if w == unknown[0])
        raise PrepError(f"val image {stem} is labelled {unknown[0]}, which has no train folder "
                        f"in {lay.train_dir} ({len(unknown)} such class(es)); the annotations "
                        "and the train split do not belong together")


def _missing_val(sources: list[LabelSource], val_files: dict[str, str], lay: Layout) -> list:
    """Val images some source annotates but the val dir lacks. The devkit ground truth and
    the shipped real labels always have 50,000 lines, so they only count when they are the
    sole source."""
    per_file = [s for s in sources if not s.name.startswith("devkit") and s.name != SHIPPED]
    per_file = per_file or sources
    annotated = set().union(*(s.labels.keys() for s in per_file))
    rel = _rel(lay.val_dir, lay.src)
    return sorted(f"{rel}/{stem}.JPEG" for stem in annotated - val_files.keys())


def _check_known(classes: list[ClassInfo], lay: Layout) -> None:
    unknown = [c.wnid for c in classes if c.ilsvrc2012_id is None]
    if unknown:
        raise PrepError(f"{lay.train_dir / unknown[0]}: {unknown[0]} is not one of the 1000 "
                        f"ILSVRC CLS-LOC classes ({len(unknown)} such folder(s))")


def _prefixed(p: Problems, prefix: str) -> Problems:
    p.undecodable = [f"{prefix}/{x}" for x in p.undecodable]
    p.notes = {k: [f"{prefix}/{x}" for x in v] for k, v in p.notes.items()}
    return p


def _problems_text(p: Problems) -> str:
    lines = []
    for kind, items in (("empty", p.empty), ("not-an-image", p.extra),
                        ("missing", p.missing), ("unlisted", p.unlisted),
                        ("broken-link", p.broken_links), ("undecodable", p.undecodable),
                        ("ignored", p.ignored)):
        lines += [f"{kind}\t{x}\n" for x in items]
    return "".join(lines)
