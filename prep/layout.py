"""Recognise which ImageNet layout a directory holds and where each piece lives.

Only looks: never creates, changes or deletes anything under the source.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from prep.classes import is_wnid
from prep.errors import PrepError
from prep.hf import find_release
from prep.scan import is_litter

TRAIN_TAR = "ILSVRC2012_img_train.tar"
BLURRED = {"train": "train_blurred", "val": "val_blurred"}  # Yang et al. 2021, face-blurred
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
BBOX_VAL_TGZ = "ILSVRC2012_bbox_val_v3.tgz"


@dataclass
class Layout:
    name: str  # ilsvrc2017 | kaggle | ilsvrc2012 | ilsvrc2012-tar | imagefolder
    src: Path  # absolute source root, as given (not symlink-resolved)
    train_dir: Path | None = None
    val_dir: Path | None = None
    test_dir: Path | None = None
    val_in_folders: bool = False
    # Val label sources; whichever exist are all read and cross-checked.
    val_xml_dir: Path | None = None
    val_xml_archive: Path | None = None
    loc_val_csv: Path | None = None
    devkit: Path | None = None  # ILSVRC2012_devkit_t12 directory or .tar.gz
    map_clsloc: Path | None = None
    train_list: Path | None = None  # ImageSets/CLS-LOC/train_cls.txt
    archives: dict[str, Path] = field(default_factory=dict)  # split -> original tar
    # a release of the real ILSVRC2012 val images (face-blurred, Hugging Face): its val
    # labels are cross-checked against the real ones the package ships
    shipped_val_labels: bool = False
    hf_files: dict[str, list[Path]] = field(default_factory=dict)  # Hugging Face release
    suffix_labels: dict[str, str] | None = None  # val stem -> wnid from HF file names

    def describe(self) -> str:
        val = "val in class folders" if self.val_in_folders else "flat val"
        return f"{self.name} ({val})" if self.val_dir else self.name


def _dir(p: Path) -> Path | None:
    return p if p.is_dir() else None


def _file(p: Path) -> Path | None:
    return p if p.is_file() else None


def check_source(src: str | os.PathLike) -> Path:
    """The absolute source path, or a clear error when it cannot be an ImageNet copy."""
    path = Path(os.path.abspath(src))
    if not path.exists():
        hint = " (a broken symlink)" if path.is_symlink() else ""
        raise PrepError(f"--src {path}: does not exist{hint}; give the root of your ImageNet copy")
    if not path.is_dir():
        raise PrepError(
            f"--src {path}: is a file, expected the directory that holds the ImageNet copy "
            "(for the original archives, give the directory that holds the .tar files)"
        )
    if not os.access(path, os.R_OK | os.X_OK):
        raise PrepError(f"--src {path}: cannot be read (permission denied)")
    return path


def val_has_class_folders(val_dir: Path) -> bool:
    """True when val holds WNID folders (after valprep.sh), False when it is flat."""
    with os.scandir(val_dir) as it:
        entries = list(it)
    try:  # a flat val (50,000 files) shown without a Python step per entry
        if not any(map(os.DirEntry.is_dir, entries)):
            return False
    except OSError:  # a symlink loop: the loop below names it
        pass
    dirs = files = 0
    for entry in entries:
        if is_litter(entry.name):
            continue  # macOS / Windows metadata: listed by the scan, never an image
        try:
            is_dir = entry.is_dir()
        except OSError as exc:  # a symlink loop
            raise PrepError(f"{entry.path}: {exc.strerror}; remove the link") from None
        if is_dir:
            dirs += 1
            if not is_wnid(entry.name):
                raise PrepError(
                    f"{entry.path}: val folder name is not a WNID (expected nXXXXXXXX)"
                )
        elif entry.name.upper().endswith((".JPEG", ".JPG", ".PNG")):
            files += 1
        if dirs and files:
            raise PrepError(
                f"{val_dir}: holds both class folders and loose images; "
                "expected either a flat val or one folder per class"
            )
    return dirs > 0


def detect_layout(src: str | os.PathLike) -> Layout:
    """Find the layout of `src` and the paths of its splits and label sources."""
    src = check_source(src)
    if _dir(src / "Data" / "CLS-LOC"):
        lay = _clsloc(src, src, "ilsvrc2017")
    elif _dir(src / "ILSVRC" / "Data" / "CLS-LOC"):
        lay = _clsloc(src, src / "ILSVRC", "kaggle")
    elif _file(src / TRAIN_TAR) or _file(src / VAL_TAR):
        lay = Layout("ilsvrc2012-tar", src)
        for split, name in (("train", TRAIN_TAR), ("val", VAL_TAR)):
            if _file(src / name):
                lay.archives[split] = src / name
        tests = sorted(src.glob("ILSVRC2012_img_test*.tar"))
        if tests:
            lay.archives["test"] = tests[0]
        for split in ("train", "val"):
            if split not in lay.archives:
                raise PrepError(f"{src}: found the ILSVRC2012 archives but not "
                                f"{TRAIN_TAR if split == 'train' else VAL_TAR}")
    elif release := find_release(src):
        lay = Layout(release[0], src, hf_files=release[1], shipped_val_labels=True)
    elif any(_dir(src / d) or _file(src / f"{d}.tar.gz") for d in BLURRED.values()):
        lay = Layout("blurred", src, _dir(src / BLURRED["train"]), _dir(src / BLURRED["val"]))
        for split, d in BLURRED.items():  # the release ships tar.gz files of class folders
            if getattr(lay, f"{split}_dir") is None and _file(src / f"{d}.tar.gz"):
                lay.archives[split] = src / f"{d}.tar.gz"
        lay.shipped_val_labels = True
    elif _dir(src / "train") or _dir(src / "val"):
        lay = Layout("ilsvrc2012", src, _dir(src / "train"), _dir(src / "val"), _dir(src / "test"))
    else:
        raise PrepError(
            f"--src {src}: no ImageNet layout found. Looked for Data/CLS-LOC/ (ILSVRC2017), "
            f"ILSVRC/Data/CLS-LOC/ (Kaggle), {TRAIN_TAR} + {VAL_TAR} (ILSVRC2012 archives), "
            "train_blurred/ + val_blurred/ (face-blurred, folders or .tar.gz) "
            "and train/ + val/ (extracted ILSVRC2012 or class folders)"
        )
    _find_label_files(lay)
    if not lay.archives and not lay.hf_files:
        require_splits(lay)
    if lay.name in ("ilsvrc2012", "ilsvrc2012-tar") and not (
            lay.devkit or lay.loc_val_csv or lay.val_xml_archive):
        # The two image tars without the devkit (a common download): a flat val named by
        # the official names, labelled by the real labels the toolkit ships (a name that is
        # not official has no label there, and is named)
        lay.shipped_val_labels = True
    return lay


def require_splits(lay: Layout) -> None:
    """Both train and val must exist; then note whether val is already in class folders."""
    for split in ("train", "val"):
        if getattr(lay, f"{split}_dir") is None:
            raise PrepError(
                f"--src {lay.src}: {lay.name} layout without a {split} split; "
                f"expected a {split}/ directory there"
            )
    lay.val_in_folders = val_has_class_folders(lay.val_dir)
    if lay.val_in_folders and lay.name == "ilsvrc2012":
        lay.name = "imagefolder"


def _clsloc(src: Path, base: Path, name: str) -> Layout:
    data = base / "Data" / "CLS-LOC"
    return Layout(
        name, src, _dir(data / "train"), _dir(data / "val"), _dir(data / "test"),
        val_xml_dir=_dir(base / "Annotations" / "CLS-LOC" / "val"),
        train_list=_file(base / "ImageSets" / "CLS-LOC" / "train_cls.txt"),
    )


def _find_label_files(lay: Layout) -> None:
    src = lay.src
    lay.loc_val_csv = _file(src / "LOC_val_solution.csv")
    lay.map_clsloc = _file(src / "devkit" / "data" / "map_clsloc.txt")
    lay.devkit = _dir(src / DEVKIT_DIR) or _file(src / f"{DEVKIT_DIR}.tar.gz")
    lay.val_xml_archive = _file(src / BBOX_VAL_TGZ)
