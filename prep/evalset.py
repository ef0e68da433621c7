"""`prep evalset`: an evaluation set (ImageNetV2, -A, -R, -Sketch) -> a linked, indexed view.

    prep evalset --src /datasets/imagenet-a --link data/           -> data/imagenet-a/

Detects the kind from the folder names and WNIDs (any subset of a set's classes is accepted
and noted), then writes `DIR/NAME/val/<wnid>/<file>` links (through `DIR/NAME/.src-val`,
never into the source) and `DIR/NAME/meta/`: `val.txt` with labels in the global
1000-class sorted-WNID space whatever classes are present, the 1000-class table, and
`evalset.json` (kind, variant, classes present). `prep shard --data DIR/NAME` then writes
its one split (`val`), and the evaluator scores it as the kind demands (prep/scoring.py).

ImageNetV2's folders are `0` .. `999`: the folder number *is* the sorted-WNID index.
torchvision's ImageFolder sorts them as text (`0, 1, 10, 100, ...`) and labels them wrongly
(ImageNetV2 issue #4); here the number is read as a number. Its older release used WNID
folders: accepted too. File names repeat across classes (ImageNet-R `art_0.jpg`, Sketch
`1.JPEG`) and hold spaces and dots (ImageNet-A): sample keys carry the class
(`<wnid>_<stem>`, dots and spaces made `_`) and are checked to be unique.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from prep.classes import NUM_CLASSES, build_class_table, classes_csv, is_wnid, reference_words
from prep.errors import PrepError
from prep.formats import VIEW, stamp
from prep.layout import check_source
from prep.link import SRC_VAL, Changes, Outputs, apply_outputs, check_link_dir
from prep.scan import IMAGE_EXTS, Problems, entry_kind, is_litter, list_images
from prep.scoring import subset_wnids

KINDS = ("imagenet-v2", "imagenet-a", "imagenet-r", "imagenet-sketch")
V2_VARIANTS = ("matched-frequency", "threshold0.7", "top-images")


@dataclass
class EvalsetReport:
    kind: str
    variant: str | None
    name: str
    src: Path
    view: Path
    classes_present: list[str]
    images: int
    problems: Problems
    changes: Changes
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _hint(src: Path) -> str | None:
    """The kind a folder name announces (`imagenet-a`, `imagenet_r`, `imagenet-rendition`,
    `ImageNet-Sketch`, `imagenetv2-...`), or None."""
    n = src.name.lower().replace("_", "-")
    if "sketch" in n:
        return "imagenet-sketch"
    if "imagenetv2" in n or "imagenet-v2" in n:
        return "imagenet-v2"
    if re.search(r"imagenet-?a($|[^a-z])", n):
        return "imagenet-a"
    if re.search(r"imagenet-?r($|[^a-z]|endition)", n):
        return "imagenet-r"
    return None


def v2_variant(src: Path) -> str | None:
    return next((v for v in V2_VARIANTS if v in src.name.lower()), None)


def class_folders(src: Path) -> dict[str, str]:
    """{folder name: WNID}: number folders (ImageNetV2) read as sorted-WNID indices, WNID
    folders as they are; anything else is an error naming the folder."""
    wnids = sorted(reference_words())
    folders: dict[str, str] = {}
    loose: list[str] = []
    with os.scandir(src) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if is_litter(e.name):
            continue
        kind = entry_kind(e)
        if kind == "loop":
            raise PrepError(f"{e.path}: a symlink loop; remove it")
        if kind != "dir":
            if e.name.endswith(IMAGE_EXTS):  # an image has a class only through its folder
                loose.append(e.name)
            continue  # README, LICENSE files beside the class folders
        if e.name.isascii() and e.name.isdigit():
            n = int(e.name)
            if not 0 <= n < NUM_CLASSES or e.name != str(n):
                raise PrepError(f"{e.path}: ImageNetV2 folder {e.name!r} is not a class index "
                                f"0..{NUM_CLASSES - 1}; the copy is damaged or not ImageNetV2")
            folders[e.name] = wnids[n]
        elif is_wnid(e.name):
            if e.name not in reference_words():
                raise PrepError(f"{e.path}: {e.name} is not one of the 1000 ImageNet classes")
            folders[e.name] = e.name
        else:
            raise PrepError(f"{e.path}: folder {e.name!r} is neither a WNID (nXXXXXXXX) nor an "
                            "ImageNetV2 class number (0..999)")
    if loose:
        raise PrepError(f"--src {src}: {len(loose)} image(s) outside the class folders, e.g. "
                        f"{', '.join(loose[:3])}: their class is unknown. Move each into its "
                        "class folder, or out of --src")
    if not folders:
        raise PrepError(f"--src {src}: no class folders (ImageNetV2 `0`..`999`, or WNID folders "
                        "for ImageNet-A/-R/-Sketch)")
    numbers = [f for f in folders if f.isdigit()]
    if numbers and len(numbers) != len(folders):
        raise PrepError(f"--src {src}: mixes number folders ({numbers[0]}) and WNID folders; "
                        "expected one or the other")
    return folders


def detect_kind(src: Path, folders: dict[str, str], kind: str | None) -> str:
    """The set's kind: given, hinted by the folder name, or read from the classes."""
    present = set(folders.values())
    if all(f.isdigit() for f in folders):
        found = "imagenet-v2"
    else:
        a, r = set(subset_wnids("imagenet-a")), set(subset_wnids("imagenet-r"))
        hint = kind or _hint(src)
        if hint in ("imagenet-a", "imagenet-r", "imagenet-sketch", "imagenet-v2"):
            found = hint
        elif len(present) > 200 or not (present <= a or present <= r):
            found = "imagenet-sketch"
        elif present <= a and not present <= r:
            found = "imagenet-a"
        elif present <= r and not present <= a:
            found = "imagenet-r"
        else:
            raise PrepError(f"--src {src}: its {len(present)} classes are in both ImageNet-A's "
                            "and ImageNet-R's 200; say which with --kind")
    if kind and kind != found:
        raise PrepError(f"--src {src}: --kind {kind}, but its folders are {found}'s")
    allowed = subset_wnids(found)
    if allowed is not None:
        outside = sorted(present - set(allowed))
        if outside:
            folder = next(f for f, w in folders.items() if w == outside[0])
            raise PrepError(f"{src / folder}: {outside[0]} is not one of {found}'s 200 classes "
                            f"({len(outside)} such folder(s)); the copy is not {found}")
    return found


def evalset_key(wnid: str, name: str) -> str:
    """Sample key of an evaluation-set image: names repeat across classes, so the class is
    part of it; dots and spaces (ImageNet-A) become `_`."""
    stem = name.rsplit(".", 1)[0]
    return f"{wnid}_{stem}".replace(".", "_").replace(" ", "_")


def prepare_evalset(src: str | os.PathLike, link_dir: str | os.PathLike, *,
                    name: str | None = None, kind: str | None = None, force: bool = False
                    ) -> EvalsetReport:
    t0 = time.perf_counter()
    src = check_source(src)
    link = check_link_dir(Path(link_dir), src)
    folders = class_folders(src)
    kind = detect_kind(src, folders, kind)
    variant = v2_variant(src) if kind == "imagenet-v2" else None
    name = name or (f"imagenet-v2-{variant}" if variant else kind)
    if not name or "/" in name or name.startswith(".") or name == "imagenet":
        raise PrepError(f"--name {name!r}: a plain folder name other than 'imagenet'")
    probs, files = Problems(), {}
    for folder in sorted(folders, key=lambda f: folders[f]):
        names, p = list_images(str(src / folder), folder)
        probs.merge(p)
        files[folder] = names
    if probs.broken_links:
        raise PrepError(f"{len(probs.broken_links)} broken symlink(s) in {src}: "
                        + ", ".join(probs.broken_links[:5]) + "; restore or remove them")
    if probs.bad_names:
        raise PrepError(f"{len(probs.bad_names)} file name(s) in {src} hold a control "
                        "character, which would break the index files: "
                        + ", ".join(map(repr, probs.bad_names[:5])))
    seen: dict[str, str] = {}
    for f in files:
        for n in files[f]:
            key = evalset_key(folders[f], n)
            if key in seen:
                raise PrepError(f"{src}: {seen[key]} and {f}/{n} would both be sample {key!r} "
                                "(names that differ only in '.', ' ' and '_'); rename one")
            seen[key] = f"{f}/{n}"
    gindex = {c.wnid: c.index for c in build_class_table(reference_words())}
    out = Outputs()
    out.links[f"{name}/{SRC_VAL}"] = str(src)
    lines = []
    for folder in sorted(files, key=lambda f: folders[f]):
        wnid = folders[folder]
        for n in files[folder]:
            out.val_links[f"{wnid}/{n}"] = f"../../{SRC_VAL}/{folder}/{n}"
            lines.append(f"{wnid}/{n} {gindex[wnid]}\n")
    present = sorted({folders[f] for f in files if files[f]})
    images = len(lines)
    if not images:
        raise PrepError(f"--src {src}: no images in its class folders")
    full = subset_wnids(kind) or sorted(reference_words())
    notes = []
    if len(present) < len(full):
        notes.append(f"subset: {len(present)} of {kind}'s {len(full)} classes")
    info = {"kind": kind, "variant": variant, "name": name, "classes_present": present,
            "classes_scored": list(subset_wnids(kind) or []), "images": images,
            "label_space": "1000-class sorted-WNID index", "keys": "class-prefixed"}
    provenance = {**stamp(VIEW), "layout": kind, "src": str(src),
                  "counts": {"val": images}, "label_space": "sorted-WNID index"}
    table = build_class_table(reference_words())
    out.meta = {k: v.encode() for k, v in {
        "prep.json": json.dumps(provenance, indent=2) + "\n",
        "evalset.json": json.dumps(info, indent=1) + "\n",
        "val.txt": "".join(lines),
        "synsets.txt": "".join(f"{c.wnid}\n" for c in table),
        "classes.csv": classes_csv(table),
    }.items()}
    changes = apply_outputs(link, out, force, view=name)
    return EvalsetReport(kind, variant, name, src, link / name, present, images, probs,
                         changes, notes, time.perf_counter() - t0)


def read_evalset(data: Path) -> dict | None:
    """`meta/evalset.json` of a view `prep evalset` made (None for an ImageNet view)."""
    path = data / "meta" / "evalset.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except ValueError as exc:
        raise PrepError(f"{path}: not valid JSON ({exc}); rerun `prep evalset`") from None
    if not isinstance(info, dict) or info.get("kind") not in KINDS:
        raise PrepError(f"{path}: not an evalset description; rerun `prep evalset`")
    return info
