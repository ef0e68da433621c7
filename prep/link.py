"""Write the dataset view under `--link DIR`: links to the source and the meta/ files.

The whole output is planned first (`Outputs`), then compared with what is on
disk, then applied. That gives idempotence (a second run finds nothing to do),
refusal of conflicts without `--force`, and a guarantee that only paths prep
made are ever replaced: `--force` swaps links and prep's own meta files, and
never deletes a file it did not make. Nothing is written through a link into
the source.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prep.atomic import write_atomic
from prep.errors import PrepError
from prep.fastdir import make_symlinks
from prep.workers import thread_map

LINK_THREADS = 4
MARKER = "meta/prep.json"  # written first: marks DIR/imagenet as made by prep
SRC_VAL = ".src-val"  # DIR/imagenet/.src-val -> the source's val dir (short relative links)


@dataclass
class Outputs:
    links: dict[str, str] = field(default_factory=dict)  # path under DIR -> absolute target
    val_links: dict[str, str] = field(default_factory=dict)  # "wnid/file" -> absolute target
    meta: dict[str, bytes] = field(default_factory=dict)  # file name in imagenet/meta -> content
    # more meta files, built on a side thread while the links are made when nothing is in
    # meta/ yet (a first run: nothing to compare them with); before anything else otherwise
    meta_later: Callable[[], dict[str, bytes]] | None = None


@dataclass
class Changes:
    created: int = 0
    replaced: int = 0
    removed: int = 0
    unchanged: int = 0

    @property
    def nothing_to_do(self) -> bool:
        return not (self.created or self.replaced or self.removed)


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def check_link_dir(link_dir: Path, src: Path) -> Path:
    """Absolute `--link` dir; refuses one inside SRC (prep never writes into the source)."""
    link_dir = Path(os.path.abspath(link_dir))
    if link_dir.exists() and not link_dir.is_dir():
        raise PrepError(f"--link {link_dir}: is a file, expected a directory (made if missing)")
    if _inside(Path(os.path.realpath(link_dir)), Path(os.path.realpath(src))):
        raise PrepError(f"--link {link_dir}: is inside --src {src}; prep never writes into the "
                        "source. Choose a directory outside it, e.g. ./data")
    return link_dir


def _check_owned(imagenet: Path) -> None:
    if imagenet.is_symlink() or (imagenet.exists() and not imagenet.is_dir()):
        raise PrepError(f"{imagenet}: exists and is not a directory made by prep; "
                        "move it away or choose another --link")
    if imagenet.is_dir() and not (imagenet / MARKER).is_file():
        stray = sorted(p.name for p in imagenet.iterdir())
        if stray:
            raise PrepError(
                f"{imagenet}: holds files not made by prep ({', '.join(stray[:5])}); "
                "prep will not mix its output with them: choose another --link or move them"
            )


def _plan_link(path: str | Path, have: str | None, target: str, conflicts: list, todo: list,
               ch: Changes) -> None:
    """One wanted link against what `_read_link` found at its path (`have`)."""
    if have is None:
        todo.append((path, target))
    elif have == target:
        ch.unchanged += 1
    else:
        conflicts.append(f"{path} -> {have} (prep wants -> {target})")
        todo.append((path, target))


def _read_link(path: str | Path, dir_fd: int | None = None) -> str | None:
    """The target of the link at `path` (its last part read relative to `dir_fd` when
    given: the kernel resolves one name); None when nothing is there; a PrepError for
    anything else in its place."""
    try:
        return os.readlink(os.path.basename(path) if dir_fd is not None else path,
                           dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: there, but not a link
            raise _unreadable(path, exc) from None
        raise _not_a_link(path) from None


def _plan_val_links(val: Path, wanted: dict[str, str], conflicts: list, todo: list,
                    ch: Changes) -> None:
    """`_plan_link` for every val link ("wnid/file"), class folder by class folder: one
    readlink per link, relative to the open folder (a rerun of ImageNet's 50,000 links:
    0.3 s less than a Path, an lstat and a readlink each)."""
    by_dir: dict[str, list[tuple[str, str]]] = {}
    for rel, target in wanted.items():
        folder, _, name = rel.partition("/")
        by_dir.setdefault(folder, []).append((name, target))
    base = f"{val}/"  # str concatenation: os.path.join costs ~1 us a link
    for folder, links in by_dir.items():
        parent = base + folder
        try:
            fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):  # not a folder: _stale_val_links refuses
            todo += [(f"{parent}/{name}", target) for name, target in links]
            continue
        except OSError as exc:
            raise _unreadable(parent, exc) from None
        try:
            for name, target in links:
                path = f"{parent}/{name}"
                _plan_link(path, _read_link(path, fd), target, conflicts, todo, ch)
        finally:
            os.close(fd)


def _not_a_link(path: str | Path) -> PrepError:
    return PrepError(f"{path}: exists and is not a link made by prep; prep will not replace "
                     "it even with --force: move it away or choose another --link")


def _unreadable(path: str, exc: OSError) -> PrepError:
    return PrepError(f"{path}: cannot read it ({exc.strerror or exc}); check the permissions "
                     "of the --link folder")


def _stale_val_links(val: Path, wanted: dict[str, str]) -> list[Path]:
    stale = []
    if not val.is_dir():
        return stale
    for cls in os.scandir(val):
        if not cls.is_dir(follow_symlinks=False):
            raise PrepError(f"{cls.path}: not made by prep; move it away or choose another --link")
        for e in os.scandir(cls.path):
            if f"{cls.name}/{e.name}" in wanted:
                continue
            if not e.is_symlink():
                raise PrepError(f"{e.path}: a file not made by prep inside its val folders; "
                                "move it away or choose another --link")
            stale.append(Path(e.path))
    return stale


def apply_outputs(link_dir: Path, out: Outputs, force: bool = False,
                  report: dict[str, str] | None = None, view: str = "imagenet") -> Changes:
    """Make `link_dir` hold exactly `out`; see the module docstring for the rules.
    `report` files (meta/problems.txt) describe this run, so they are rewritten
    without counting as a conflict or a change."""
    imagenet = link_dir / view  # DIR/imagenet, or DIR/<name> for an evaluation set
    _check_owned(imagenet)
    ch, conflicts, todo = Changes(), [], []
    for rel, target in out.links.items():
        path = link_dir / rel
        _plan_link(path, _read_link(path), target, conflicts, todo, ch)
    val = imagenet / "val"
    if not val.exists():  # common first run: skip 50,000 readlink calls
        base = f"{val}/"
        todo += [(base + rel, t) for rel, t in out.val_links.items()]
    else:
        _plan_val_links(val, out.val_links, conflicts, todo, ch)
    stale = _stale_val_links(val, out.val_links)
    conflicts += [f"{p} (no longer in the source's val)" for p in stale]
    later = out.meta_later
    if later is not None and (imagenet / "meta").exists():
        out.meta.update(later())  # a rerun: compared with what is there, as the others
        later = None
    meta_todo = []
    for name, data in out.meta.items():
        path = imagenet / "meta" / name
        if path.is_file() and path.read_bytes() == data:
            ch.unchanged += 1
        else:
            if path.exists():
                conflicts.append(f"{path} (content differs)")
            meta_todo.append((path, data))
    if conflicts and not force:
        head = "\n  ".join(conflicts[:10])
        more = f"\n  ... and {len(conflicts) - 10} more" if len(conflicts) > 10 else ""
        raise PrepError(f"{len(conflicts)} existing path(s) under {link_dir} differ from what "
                        f"prep would write:\n  {head}{more}\n"
                        "Rerun with --force to replace them (only links and prep's own files).")
    report_todo = [(imagenet / "meta" / name, text.encode())
                   for name, text in (report or {}).items()
                   if not (imagenet / "meta" / name).is_file()
                   or (imagenet / "meta" / name).read_text() != text]
    try:
        _write(imagenet, meta_todo, todo, stale, ch, later)
        for path, data in report_todo:
            write_atomic(path, data)
    except OSError as exc:
        for tmp in (imagenet / "meta").glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        raise PrepError(f"{link_dir}: could not write the dataset view ({exc.strerror or exc}"
                        f"{': ' + exc.filename if exc.filename else ''}); no temp file was "
                        "left. Free space (or fix the disk), then rerun: every link and meta "
                        "file is checked again, nothing is taken on trust") from None
    return ch


def _link_dir(item: tuple[str, list[tuple[str, str]]]) -> tuple[int, int]:
    """Make the links of one directory; returns (created, replaced). Each link is made
    relative to the open directory (symlinkat): the kernel resolves one name, not the
    whole path, per link."""
    parent, links = item
    os.makedirs(parent, exist_ok=True)
    created = replaced = 0
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while links:  # one C call per folder (prep.fastdir), then one per existing link
            done, err = make_symlinks(fd, [p.rpartition("/")[2] for p, _ in links],
                                      [t for _, t in links])
            created += done
            if done == len(links):
                break
            path, target = links[done]
            if err != errno.EEXIST:  # name the whole path, as without dir_fd
                raise OSError(err, os.strerror(err), path)
            replaced += _replace_link(parent, path, target)
            links = links[done + 1:]
    finally:
        os.close(fd)
    return created, replaced


def _replace_link(parent: str, path: str, target: str) -> int:
    """--force: swap a link atomically, never a moment without one; 1."""
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except OSError:
        os.unlink(tmp)
        raise
    return 1


def _write(imagenet: Path, meta_todo: list, todo: list, stale: list, ch: Changes,
           later: Callable[[], dict[str, bytes]] | None = None) -> None:
    """The ownership marker first, then the links, then the other meta files: a run that
    stops half way leaves no train.txt / val.txt describing links that are not there.
    `later` (meta files no earlier run wrote) runs on a side thread while the links are
    made: they are made in C calls that release the GIL (prep.fastdir), so the two overlap
    (ImageNet: train.txt's 44 MB take ~0.15 s, the 50,000 val links ~0.5 s)."""
    (imagenet / "meta").mkdir(parents=True, exist_ok=True)
    marker = [pd for pd in meta_todo if pd[0].name == "prep.json"]
    _write_meta(marker, ch)
    by_dir: dict[str, list[tuple[str, str]]] = {}
    for path, target in todo:
        path = str(path)
        parent = path.rpartition("/")[0] or os.path.dirname(path)  # dirname: ~1 us a link
        by_dir.setdefault(parent, []).append((path, target))
    # symlink() releases the GIL and most of its cost is in the kernel: 4 threads make
    # 50,000 links ~2x faster than one here (measured 0.97 s vs 1.83 s).
    with ThreadPoolExecutor(1) as side:
        built = side.submit(later) if later is not None else None
        for created, replaced in thread_map(_link_dir, by_dir.items(), LINK_THREADS):
            ch.created += created
            ch.replaced += replaced
        if built is not None:
            meta_todo = meta_todo + [(imagenet / "meta" / name, data)
                                     for name, data in built.result().items()]
    for path in stale:
        os.unlink(path)
        ch.removed += 1
    _write_meta([pd for pd in meta_todo if pd[0].name != "prep.json"], ch)


def _write_meta(items: list[tuple[Path, bytes]], ch: Changes) -> None:
    for path, data in items:
        existed = path.exists()
        write_atomic(path, data)
        ch.replaced += existed
        ch.created += not existed
