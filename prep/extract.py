"""Safe, resumable extraction of the original ILSVRC2012 archives.

The ImageNet archives hold only flat regular files (`n01440764.tar` inside the train
tar, `ILSVRC2012_val_00000001.JPEG` inside the val tar). Anything else (a `../` or
absolute name, a folder, a symlink or hardlink, a device) is refused before a
byte is written, so nothing can land outside the target. Each file is written
under a temporary name and renamed; each class folder is built as `.nXXX.partial`
and renamed when complete, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path
from typing import IO, Any

from prep.classes import is_wnid
from prep.errors import PrepError
from prep.progress import progress_bar

_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def _check_member(archive: str, m: tarfile.TarInfo) -> str:
    """The member's file name if it is a plain, flat, regular file; else a clear error."""
    if not m.isfile():
        kind = ("symlink" if m.issym() else "hardlink" if m.islnk() else "directory"
                if m.isdir() else "device or special file")
        raise PrepError(f"{archive}: member {m.name!r} is a {kind}; ImageNet archives hold "
                        "only plain files, refusing to extract (nothing was written for it)")
    if not _SAFE_NAME.fullmatch(m.name) or m.name in (".", ".."):
        raise PrepError(f"{archive}: member name {m.name!r} is not a plain file name "
                        "(absolute path, '..' or a folder); refusing to extract")
    return m.name


def corrupt(archive: Path | str, exc: BaseException) -> PrepError:
    """The error for an archive that ends early or is damaged (what was extracted stays)."""
    return PrepError(f"{archive}: truncated or corrupt ({exc}); re-download it, then rerun: "
                     "the files already extracted are kept")


def write_member(path: Path, data_or_src: bytes | IO[bytes], size: int) -> None:
    """Write one image (bytes, or a member's file object) under a temp name and rename it;
    skip it when an earlier run wrote it whole. One read, one write, one rename: the open
    of a new file is most of the cost here, as for `tar -x`."""
    try:
        if os.stat(path).st_size == size:
            return  # written whole by an earlier run
    except FileNotFoundError:
        pass
    data = data_or_src if isinstance(data_or_src, bytes) else data_or_src.read()
    if len(data) != size:
        raise PrepError(f"{path}: archive member is truncated ({size} bytes expected)")
    tmp = f"{path.parent}/.{path.name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _extract_flat(tar: tarfile.TarFile, archive: str, target: Path, bar: Any) -> int:
    """Extract a stream of flat members into `target`; skip files already complete."""
    count = 0
    for m in tar:
        name = _check_member(archive, m)
        write_member(target / name, tar.extractfile(m), m.size)
        bar.update(m.size)
        count += 1
    return count


def _open(archive: Path, mode: str = "r:") -> tarfile.TarFile:
    try:
        return tarfile.open(archive, mode)
    except (tarfile.TarError, OSError) as exc:
        raise PrepError(f"{archive}: cannot open as a tar archive ({exc})") from exc


def extract_flat_archive(archive: Path, dest: Path, progress: bool = True) -> Path:
    """Val or test tar -> `dest` (flat); built as `.NAME.partial` and renamed when complete."""
    if dest.is_dir():
        return dest  # finished by an earlier run
    partial = dest.with_name(f".{dest.name}.partial")
    partial.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(total=archive.stat().st_size, unit="B", unit_scale=True,
                       desc=f"extract {archive.name}", disable=not progress)
    try:
        with _open(archive) as tar:
            _extract_flat(tar, str(archive), partial, bar)
    except (tarfile.TarError, EOFError) as exc:
        raise corrupt(archive, exc) from exc
    finally:
        bar.close()
    os.replace(partial, dest)
    return dest


def extract_train_archive(archive: Path, dest: Path, progress: bool = True) -> Path:
    """`ILSVRC2012_img_train.tar` (1000 inner `nXXXXXXXX.tar`) -> `dest/nXXXXXXXX/*.JPEG`."""
    dest.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(total=archive.stat().st_size, unit="B", unit_scale=True,
                       desc=f"extract {archive.name}", disable=not progress)
    try:
        with _open(archive) as outer:
            for m in outer:
                name = _check_member(str(archive), m)
                wnid = name[:-4] if name.endswith(".tar") else ""
                if not is_wnid(wnid):
                    raise PrepError(f"{archive}: member {name!r} is not a class tar "
                                    "(expected nXXXXXXXX.tar)")
                if (dest / wnid).is_dir():
                    bar.update(m.size)  # finished by an earlier run
                    continue
                partial = dest / f".{wnid}.partial"
                partial.mkdir(exist_ok=True)
                inner_name = f"{archive}:{name}"
                with tarfile.open(fileobj=outer.extractfile(m), mode="r|") as inner:
                    _extract_flat(inner, inner_name, partial, _NullBar())
                os.replace(partial, dest / wnid)
                bar.update(m.size)
    except (tarfile.TarError, EOFError) as exc:
        raise corrupt(archive, exc) from exc
    finally:
        bar.close()
    return dest


class _NullBar:
    def update(self, n: int) -> None:
        pass


def _class_member(archive: str, m: tarfile.TarInfo) -> tuple[str, str] | None:
    """(wnid, file name) of a member `[top/]nXXXXXXXX/name`; None for its folders; an error
    for anything else (links, devices, '..', absolute or deeper paths)."""
    parts = m.name.rstrip("/").split("/")
    if m.isdir() and len(parts) <= 2 and all(_SAFE_NAME.fullmatch(p) for p in parts):
        return None
    if not m.isfile():
        _check_member(archive, m)  # names the kind of member and refuses it
    if len(parts) == 3:
        parts = parts[1:]  # the release's own top folder (train_blurred/, val_blurred/)
    if len(parts) != 2 or not is_wnid(parts[0]) or not _SAFE_NAME.fullmatch(parts[1]) \
            or parts[1] in (".", ".."):
        raise PrepError(f"{archive}: member {m.name!r} is not <class folder>/<file> "
                        "(nXXXXXXXX/name); refusing to extract")
    return parts[0], parts[1]


def extract_class_archive(archive: Path, dest: Path, progress: bool = True) -> Path:
    """A .tar(.gz) of class folders (`train_blurred/nXXXXXXXX/*.jpg`) -> `dest/nXXXXXXXX/`.
    Streamed (gzip is read once, front to back); built as `.NAME.partial` and renamed when
    complete; a rerun after a kill skips the files already written whole."""
    if dest.is_dir():
        return dest  # finished by an earlier run
    partial = dest.with_name(f".{dest.name}.partial")
    partial.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(total=archive.stat().st_size, unit="B", desc=f"extract {archive.name}",
                       disable=not progress)
    made: set[str] = set()
    try:
        with open(archive, "rb") as raw, _open_stream(archive, raw) as tar:
            for m in tar:
                where = _class_member(str(archive), m)
                if where is not None:
                    wnid, name = where
                    if wnid not in made:
                        (partial / wnid).mkdir(exist_ok=True)
                        made.add(wnid)
                    write_member(partial / wnid / name, tar.extractfile(m), m.size)
                bar.update(raw.tell() - bar.n)
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, EOFError) and \
                "gzip" not in str(exc).lower() and "compressed" not in str(exc).lower():
            raise
        raise corrupt(archive, exc) from exc
    finally:
        bar.close()
    os.replace(partial, dest)
    return dest


def _open_stream(archive: Path, raw: IO[bytes]) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=raw, mode="r|*")
    except (tarfile.TarError, OSError) as exc:
        raise PrepError(f"{archive}: cannot open as a tar archive ({exc})") from exc
