"""All-reduce on a CPU (gloo) group that returns only once gloo's worker thread has let go
of the tensor.

A gloo collective runs on the process group's worker thread, which still holds the work,
and through it the tensor, for a moment after `wait()` returns. Dropping it there releases
the tensor's Python object, which takes the GIL. When the rank exits right after its last
collective, that moment can fall into interpreter shutdown. The thread then cannot take the
GIL, and the process aborts ("terminate called without an active exception", SIGABRT),
though the run finished (3 runs in 72 of a 3-rank CPU run on 2 cores). torchrun then
reports the rank as failed (pytorch/pytorch#179291 describes the same race).

While C++ holds a tensor, the tensor holds a reference to its Python object (torch's
PyObject preservation), so the Python reference count says when gloo has let go.

`lost_peer` tells a collective that failed because another rank went away (its own error
is the one to read) from a bug here, which keeps its traceback.
"""

from __future__ import annotations

import re
import sys
import time

import torch
import torch.distributed as dist

SETTLE_S = 2.0  # the longest wait for the worker thread to let go (it takes microseconds)


def refs(t: torch.Tensor) -> int:
    """The tensor's reference count, as `released` compares it (call it the same way)."""
    return sys.getrefcount(t)


def released(t: torch.Tensor, before: int) -> None:
    """Wait (releasing the GIL) until `t` has no more references than `before`, its
    `refs(t)` from before it was posted; at most SETTLE_S. Only CPU tensors: NCCL's
    watchdog frees its works on its own schedule, with no shutdown race of this kind."""
    if t.device.type != "cpu":
        return
    deadline = time.monotonic() + SETTLE_S
    while sys.getrefcount(t) > before and time.monotonic() < deadline:
        time.sleep(0.0002)


def all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """dist.all_reduce (blocking), returning once the tensor is this thread's alone."""
    before = refs(t)
    dist.all_reduce(t, op=op, group=group)
    released(t, before)
    return t


def lost_peer(exc: BaseException) -> str | None:
    """Why a collective failed, in one line, when `exc` is this rank losing another: gloo's
    transport errors (the other process ended, or the network between them failed, or it
    did not answer in time) and torch's distributed errors (NCCL's among them); None for
    anything else, which keeps its traceback."""
    text = str(exc).strip()
    if not (isinstance(exc, dist.DistError) or "gloo/transport/" in text):
        return None
    first = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else "")
    return first.split(". This is typically")[0].rstrip(".") or type(exc).__name__
