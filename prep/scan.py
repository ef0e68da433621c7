"""List the images of each split quickly and find what is wrong with them.

Check levels (measured on 1.28 M train files, warm cache, 2 cores):
- fast (default): directory entries only (names, extensions, file types from
  `d_type`: broken symlinks, stray folders), plus sizes of val/test files. About
  the cost of `find -type f`.
- sizes: also `stat` every train file to find zero-byte files. The kernel's stat
  alone costs ~4 s per 1.28 M files here (`find -empty` takes 4.4 s).
- full: also decode every image with Pillow.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from prep.checked import Identity, identity
from prep.classes import is_wnid
from prep.errors import PrepError, read_error
from prep.fastdir import plain_listing
from prep.progress import progress_bar

IMAGE_EXTS = (".JPEG", ".jpeg", ".jpg", ".JPG", ".png", ".PNG")
# What copies made on macOS and Windows carry besides the images: AppleDouble `._*` files
# (named like the image they describe), Finder and Explorer metadata. Ignored and listed.
LITTER_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini", "__MACOSX", ".AppleDouble",
                ".Spotlight-V100", ".Trashes", ".fseventsd", "@eaDir", "Icon\r"}
assert not any(n.endswith(IMAGE_EXTS) for n in LITTER_NAMES)  # plain_images_joined's premise


def is_litter(name: str) -> bool:
    return name.startswith("._") or name in LITTER_NAMES


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def bad_name(name: str) -> bool:
    """Names that would break the line-based index files (meta/*.txt, train.txt-style
    lists): control characters such as newline and tab, and bytes that are not UTF-8
    (Python hands them over as surrogates; the index files are UTF-8)."""
    if _CONTROL.search(name) is not None:
        return True
    if name.isascii():  # nearly every name: no encoding needed (1.28 M names per scan)
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def sample_key(name: str) -> str:
    """A file's sample key in the shards: its stem, dots made underscores (webdataset splits
    a member name at the first dot). `a.b.JPEG` and `a_b.JPEG` share one: checked."""
    return name.rsplit("/", 1)[-1].rsplit(".", 1)[0].replace(".", "_")


def check_unique_keys(folders: Mapping[str, Sequence[str]], where: str) -> None:
    """PrepError naming both files when two files of a split would get one sample key.

    `folders`: {folder: the file names one listing of it gave} ('' for files at the top).
    Keys come from names alone, so files in different folders can collide. The common case
    is proven free of collisions with a few C-level counts per folder instead of a key per
    file (1.28 M keys took ~1 s): see `_keys_clearly_unique`. Anything else computes them."""
    if _keys_clearly_unique(folders):
        return
    seen: dict[str, str] = {}
    for folder in sorted(folders):
        for name in folders[folder]:
            path = f"{folder}/{name}" if folder else name
            key = sample_key(name)
            if key in seen:
                raise PrepError(f"{where}: {seen[key]} and {path} would both be sample "
                                f"{key!r} in the shards (one name, or names that differ only "
                                "in '.' vs '_' or in the extension); rename or remove one of "
                                "them")
            seen[key] = path


def _keys_clearly_unique(folders: Mapping[str, Sequence[str]]) -> bool:
    """True when no two names can share a key, shown without computing one:
    - in each folder every name has exactly one '.', no newline, and the same extension as
      the others: its key is its stem, and names in one folder are distinct, so keys are;
    - with several folders, each name also starts with `folder_` (ILSVRC's train names:
      `n01440764/n01440764_10026.JPEG`), and no folder's `folder_` is a prefix of another's:
      keys of different folders start differently. False means "not shown", not "collision".
    """
    prefixes = []
    for folder, names in folders.items():
        if not names:
            continue
        blob = "\n".join(names) + "\n"
        ext = names[0][names[0].rfind("."):]
        n = len(names)
        if not (ext.startswith(".") and blob.count(".") == n and blob.count("\n") == n
                and blob.count(ext + "\n") == n):
            return False
        if len(folders) > 1:
            prefix = f"{folder}_"
            if "/" in folder or "." in folder or ("\n" + blob).count("\n" + prefix) != n:
                return False
            prefixes.append(prefix)
    prefixes.sort()
    return not any(b.startswith(a) for a, b in zip(prefixes, prefixes[1:]))


def entry_kind(e: os.DirEntry) -> str:
    """dir, file, loop (a symlink loop), broken (a dangling link) or other."""
    try:
        if e.is_dir():
            return "dir"
        if e.is_file():
            return "file"
    except OSError:  # ELOOP: too many levels of symbolic links
        return "loop"
    return "broken" if e.is_symlink() else "other"


@dataclass
class Problems:
    """Files that will not become samples or need attention, as paths relative to SRC."""

    empty: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # not an image by name
    broken_links: list[str] = field(default_factory=list)
    undecodable: list[str] = field(default_factory=list)  # --check full
    missing: list[str] = field(default_factory=list)  # listed or annotated, not on disk
    unlisted: list[str] = field(default_factory=list)  # on disk, not in ImageSets
    notes: dict[str, list[str]] = field(default_factory=dict)  # CMYK, PNG, grayscale ...
    ignored: list[str] = field(default_factory=list)  # macOS / Windows litter
    bad_names: list[str] = field(default_factory=list)  # control characters in the name

    def merge(self, other: Problems) -> None:
        self.ignored += other.ignored
        self.bad_names += other.bad_names
        self.empty += other.empty
        self.extra += other.extra
        self.broken_links += other.broken_links
        self.undecodable += other.undecodable
        self.missing += other.missing
        self.unlisted += other.unlisted
        for k, v in other.notes.items():
            self.notes.setdefault(k, []).extend(v)


def list_images(directory: str, rel: str, sizes: bool = True) -> tuple[list[str], Problems]:
    """Sorted image names in one directory; `rel` prefixes the paths in the problems.
    `sizes` stats each image to find zero-byte files (the only per-file syscall)."""
    joined, probs = list_images_joined(directory, rel, sizes)
    return (joined.split("\n") if joined else []), probs


def list_images_joined(directory: str, rel: str, sizes: bool = True) -> tuple[str, Problems]:
    """list_images with the names joined by newlines (what the workers send: one string
    pickles ~3x faster than a list). A folder of plain images is listed in one C call
    (prep.fastdir) and shown plain by a few scans of the joined names; any other folder, or
    every folder where the library is not built, takes the per-entry path."""
    joined = plain_listing(directory)
    if joined is not None and not plain_images_joined(joined):
        joined = None
    names = None
    probs = Problems()
    if joined is None:
        names, probs = _list_entries(directory, rel)
        joined = "\n".join(names)
    if sizes:
        if names is None:
            names = joined.split("\n") if joined else []
        probs.empty = sorted(f"{rel}/{n}" for n in _empty_files(directory, names))
    return joined, probs


def _list_entries(directory: str, rel: str) -> tuple[list[str], Problems]:
    """Sorted image names, entry by entry (file types from d_type, symlinks followed), and
    what else the folder holds."""
    try:
        with os.scandir(directory) as it:
            entries = list(it)
    except OSError as exc:
        raise read_error(directory, exc) from exc
    # Fast path: is_file() answers from d_type without a syscall for regular files.
    probs = Problems()
    try:
        files = [e for e in entries if e.is_file()]
    except OSError:  # a symlink loop among the entries: the slow path names it
        files = [e for e in entries if entry_kind(e) == "file"]
    if len(files) == len(entries) and all_plain_images([e.name for e in files]):
        images = files
    else:
        images = [e for e in files if e.name.endswith(IMAGE_EXTS) and not is_litter(e.name)
                  and not bad_name(e.name)]
    names = [e.name for e in images]
    if len(names) != len(entries):
        _classify_odd(entries, rel, probs)
    names.sort()
    return names, probs


def _empty_files(directory: str, names: list[str]) -> list[str]:
    """Those of `names` (in `directory`) that are 0 bytes. Each stat is made relative to the
    open directory: the kernel resolves one name, not the whole path (50,000 val files:
    0.16 s instead of 0.23 s through DirEntry.stat here)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        stat = os.stat
        return [n for n in names if stat(n, dir_fd=fd).st_size == 0]
    finally:
        os.close(fd)


def all_plain_images(names: list[str]) -> bool:
    """True when every name is an image by its extension (all the same one), ASCII without
    control characters, and not litter: what the per-name tests would find, in a few passes
    over one string (the per-name tests cost ~1 us a name, 1.28 M names per train scan)."""
    if not names:
        return True
    blob = "/".join(names) + "/"  # '/' is the one character no name holds
    ext = names[0][names[0].rfind("."):]
    return (ext in IMAGE_EXTS and blob.count(ext + "/") == len(names) and blob.isascii()
            and _CONTROL.search(blob) is None and "/._" not in "/" + blob
            and LITTER_NAMES.isdisjoint(names))


def plain_images_joined(joined: str) -> bool:
    """all_plain_images of names joined by newlines that are known printable ASCII (the C
    listing says so): one image extension for all, no litter."""
    if not joined:
        return True
    first = joined[:joined.find("\n")] if "\n" in joined else joined
    ext = first[first.rfind("."):]
    framed = "\n" + joined + "\n"
    # no litter name ends in an image extension: with every name ending in one, only the
    # AppleDouble `._` prefix is left to look for
    return (ext in IMAGE_EXTS and framed.count(ext + "\n") == joined.count("\n") + 1
            and "\n._" not in framed)


def _classify_odd(entries: list[os.DirEntry], rel: str, probs: Problems) -> None:
    for e in entries:
        kind = entry_kind(e)
        if is_litter(e.name):
            probs.ignored.append(f"{rel}/{e.name}")
        elif bad_name(e.name):
            probs.bad_names.append(f"{rel}/{e.name}")
        elif kind == "dir":  # follows links: a linked class dir is fine, a sub-folder is not
            probs.extra.append(f"{rel}/{e.name}/")
        elif kind == "loop":
            probs.broken_links.append(f"{rel}/{e.name} (a symlink loop)")
        elif kind != "file":
            (probs.broken_links if e.is_symlink() else probs.extra).append(f"{rel}/{e.name}")
        elif not e.name.endswith(IMAGE_EXTS):
            probs.extra.append(f"{rel}/{e.name}")


def _list_classes(jobs: list[tuple[str, str, bool]]) -> list[tuple[str, Problems]]:
    """Worker task: names joined by newlines (one string pickles ~3x faster than a list)."""
    return [list_images_joined(*job) for job in jobs]


def class_dirs(split_dir: Path, rel: str) -> tuple[list[str], Problems]:
    """Sorted WNID folder names of a class-folder split; any other folder is an error."""
    wnids, probs = [], Problems()
    try:
        it = os.scandir(split_dir)
    except OSError as exc:
        raise read_error(split_dir, exc) from exc
    with it:
        for e in it:
            kind = entry_kind(e)
            if is_litter(e.name):
                probs.ignored.append(f"{rel}/{e.name}")
            elif kind == "loop":
                probs.broken_links.append(f"{rel}/{e.name} (a symlink loop)")
            elif kind == "dir":
                if not is_wnid(e.name):
                    raise PrepError(
                        f"{e.path}: class folder name is not a WNID (expected nXXXXXXXX, "
                        "e.g. n01440764); move it out of the split or rename it"
                    )
                wnids.append(e.name)
            elif kind == "broken":
                probs.broken_links.append(f"{rel}/{e.name}")
            else:
                probs.extra.append(f"{rel}/{e.name}")
    if not wnids:
        raise PrepError(f"{split_dir}: no class folders (expected one nXXXXXXXX folder per class)")
    return sorted(wnids), probs


def scan_class_split(
    split_dir: Path, rel: str, pool: Executor | None = None, progress: bool = False,
    sizes: bool = True,
) -> tuple[dict[str, list[str]], Problems]:
    """{wnid: sorted image names} for a split stored as class folders (train, or sorted val)."""
    wnids, probs = class_dirs(split_dir, rel)
    jobs = [(os.path.join(split_dir, w), f"{rel}/{w}", sizes) for w in wnids]
    chunks = [jobs[i : i + 25] for i in range(0, len(jobs), 25)]
    bar = progress_bar(total=len(jobs), unit="class", desc=f"scan {rel}", disable=not progress)
    results = []
    for part in run_chunks(pool, _list_classes, chunks):
        results += part
        bar.update(len(part))
    bar.close()
    classes = {}
    for w, (joined, p) in zip(wnids, results):
        classes[w] = joined.split("\n") if joined else []
        probs.merge(p)
    return classes, probs


def run_chunks(pool: Executor | None, fn: Callable, chunks: list) -> Iterator:
    """`fn(chunk)` for each chunk, in order: in `pool` when given, else here."""
    if pool is None:
        yield from map(fn, chunks)
        return
    futures = [pool.submit(fn, c) for c in chunks]
    for f in futures:
        yield f.result()


def compare_with_list(train: dict[str, list[str]], list_file: Path, rel: str) -> Problems:
    """Train files vs `ImageSets/CLS-LOC/train_cls.txt` (`n01440764/n01440764_10026 1`)."""
    listed = set()
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PrepError(f"{list_file}: not a text list of train images ({exc})") from exc
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or "/" not in parts[0]:
            raise PrepError(f"{list_file}:{lineno}: expected 'nXXXXXXXX/name N', "
                            f"got {line.strip()[:80]!r}")
        listed.add(parts[0])
    present = {f"{w}/{n.rsplit('.', 1)[0]}": f"{w}/{n}" for w in train for n in train[w]}
    probs = Problems()
    probs.missing = sorted(f"{rel}/{k}.JPEG" for k in listed - present.keys())
    probs.unlisted = sorted(f"{rel}/{present[k]}" for k in present.keys() - listed)
    return probs


def _check_one(path: str) -> tuple[str, str | None, Identity | None]:
    """('ok'|'cmyk'|'png'|'grayscale'|'undecodable', detail, identity) for one image file.
    Decoded in full with libjpeg's warnings as errors (prep.jpeg.strict_problem): a JPEG cut
    short with an EOI marker appended is undecodable, not a grey-bottomed picture. identity
    (prep.checked): of the bytes that were checked, None when undecodable."""
    import io

    from PIL import Image

    from prep.jpeg import strict_problem

    try:
        with open(path, "rb") as f:
            ident = identity(os.fstat(f.fileno()))
            data = f.read()
    except OSError as exc:
        return "undecodable", f"unreadable ({exc.strerror})", None
    problem = strict_problem(data)
    if problem:
        return "undecodable", problem, None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG":
                return f"{im.format or 'unknown'} named as JPEG".lower(), None, ident
            if im.mode == "CMYK":
                return "cmyk", None, ident
            if im.mode in ("L", "LA", "1"):
                return "grayscale", None, ident
        return "ok", None, ident
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError ...
        return "undecodable", f"{type(exc).__name__}: {exc}", None


def _check_chunk(paths: list[str]) -> list[tuple[str, str | None, Identity | None]]:
    return [_check_one(p) for p in paths]


def check_images(
    root: Path, rel_paths: Iterable[str], pool: Executor | None = None, progress: bool = True
) -> tuple[Problems, dict[str, Identity]]:
    """Decode every image (the full check); list undecodable ones and the ones needing
    repair. Also {rel path: identity} of every image that passed (for prep.checked)."""
    rels = list(rel_paths)
    chunks = [rels[i : i + 256] for i in range(0, len(rels), 256)]
    probs, passed = Problems(), {}
    bar = progress_bar(total=len(rels), unit="img", desc="decode check", disable=not progress)
    full = [[str(root / r) for r in c] for c in chunks]
    for chunk, res in zip(chunks, run_chunks(pool, _check_chunk, full)):
        for rel, (kind, detail, ident) in zip(chunk, res):
            if kind == "undecodable":
                probs.undecodable.append(f"{rel} ({detail})")
            elif kind != "ok":
                probs.notes.setdefault(kind, []).append(rel)
            if ident is not None:
                passed[rel] = ident
        bar.update(len(chunk))
    bar.close()
    return probs, passed
