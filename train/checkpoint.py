"""Atomic checkpoints: written to a temp file, fsynced, renamed. `checkpoint.pt` is the
latest epoch, `checkpoint.prev.pt` the one before it (kept so that a damaged latest one
can be fallen back to), `best.pt` the best top-1. Loaded with torch.load(weights_only=True).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from prep.errors import DISK_ERRNOS, PrepError, os_error_in


def previous(path: Path) -> Path:
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save(state: dict, path: Path, keep_previous: bool = False) -> None:
    """Write `state` to `path` atomically. On a write error (disk full, ...) the temp file is
    removed and a PrepError names the checkpoint and the cause (the OSError behind torch's
    RuntimeError); the previous one is left as it was. With
    `keep_previous`, the file it replaces stays as `previous(path)` (a hard link made
    before the rename: there is never a moment without `path`)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
        tmp.unlink(missing_ok=True)
        kept = "the previous one is intact" if path.exists() else "none was written before"
        cause = os_error_in(exc)
        why = (cause.strerror or str(cause)) if cause is not None else str(exc)
        then = "; free space (or choose another --output-dir), then rerun with --resume auto" \
            if cause is not None and cause.errno in DISK_ERRNOS else ""
        raise PrepError(f"checkpoint {path}: could not be written ({why}); {kept}{then}") \
            from exc
    if keep_previous and path.exists():
        link = path.with_name(f".{path.name}.prev.tmp")
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, previous(path))
    os.replace(tmp, path)  # a kill before this line leaves the previous checkpoint intact


UNREADABLE = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
              ValueError, KeyError)


def load(path: Path, device: str = "cpu") -> dict:
    """A checkpoint's state; PrepError naming the file when it is damaged or not one."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise PrepError(f"{path}: no such checkpoint") from None
    except UNREADABLE as exc:
        raise PrepError(f"{path}: not a readable checkpoint (truncated or damaged: "
                        f"{type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(state, dict):
        raise PrepError(f"{path}: not a checkpoint (a {type(state).__name__}, not a dict)")
    return state


def load_for_resume(path: Path, device: str = "cpu") -> tuple[dict, Path, str | None]:
    """(state, the file it came from, a note). A damaged `path` falls back to
    `previous(path)`, saying so in the note; best.pt is never used or touched."""
    try:
        return load(path, device), path, None
    except PrepError as exc:
        prev = previous(path)
        if not prev.is_file():
            raise PrepError(f"{exc}; no previous checkpoint ({prev.name}) to fall back to: "
                            "remove it to start over, or --resume another file") from None
        state = load(prev, device)
        note = (f"warning: {exc}; resuming from the previous one, {prev} (epoch "
                f"{state.get('epoch', '?')})")
        return state, prev, note


def model_state(model: torch.nn.Module) -> dict:
    """Unwrapped (no DDP `module.` / compile `_orig_mod.` prefixes) state dict."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return model.state_dict()


def strip_prefixes(state: dict) -> dict:
    """Accept checkpoints saved from DDP or compiled models, as torchvision state dicts."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out
