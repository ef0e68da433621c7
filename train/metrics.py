"""Per-epoch metrics as JSONL and CSV, and a PNG of the loss and accuracy curves."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from prep.atomic import write_atomic

COLUMNS = ["epoch", "lr", "train_loss", "val_loss", "top1", "top5", "real_top1", "real_top5",
           "train_img_s", "data_wait", "epoch_s", "val_samples"]


def write_metrics(out: Path, history: list[dict]) -> None:
    """metrics.jsonl and metrics.csv, one row per finished epoch, rewritten whole (temp +
    rename) from the checkpoint's history: after a kill between the checkpoint and these
    files, the resumed run writes every epoch exactly once."""
    lines = "".join(json.dumps(row) + "\n" for row in history)
    write_atomic(out / "metrics.jsonl", lines)
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(history)
    write_atomic(out / "metrics.csv", buf.getvalue())


def plot_metrics(out: Path, history: list[dict]) -> Path | None:
    """Loss (train, val) and top-1/top-5 per epoch, as out/curves.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    a.legend()
    b.plot(epochs, [100 * h["top1"] for h in history], "o-", label="top-1")
    b.plot(epochs, [100 * h["top5"] for h in history], "o-", label="top-5")
    b.set(xlabel="epoch", ylabel="val accuracy (%)", title="val accuracy", ylim=(0, 100))
    b.legend()
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
