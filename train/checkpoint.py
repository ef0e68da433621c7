"""Atomic checkpoints: written to a temp file, fsynced, renamed. `checkpoint.pt` is the
latest epoch, `best.pt` the best top-1. Loaded with torch.load(weights_only=True)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save(state: dict, path: Path) -> None:
    """Write `state` to `path` atomically. On a write error (disk full, ...) the temp file is
    removed and the error names the checkpoint; the previous one is left as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
        tmp.unlink(missing_ok=True)
        kept = "the previous one is intact" if path.exists() else "none was written before"
        raise OSError(f"checkpoint {path}: could not be written ({exc}); {kept}") from exc
    os.replace(tmp, path)  # a kill before this line leaves the previous checkpoint intact


def load(path: Path, device: str = "cpu") -> dict:
    return torch.load(path, map_location=device, weights_only=True)


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
