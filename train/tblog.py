"""Optional TensorBoard logging (`--set tensorboard=true`): per-step loss, LR and img/s
every `log_every` steps, every per-epoch metric (x-axis: global step; `epoch/epoch` maps
steps to epochs), under OUTPUT_DIR/tensorboard. Rank 0 only.
After a resume, events past the checkpoint's step (from the interrupted run) are dropped
(`purge_step`), so the curves show each step once."""

from __future__ import annotations

from pathlib import Path


class TensorBoardLog:
    def __init__(self, out: Path, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise SystemExit("tensorboard=true needs the tensorboard package: pip install "
                             "tensorboard (or `pip install -e .[tensorboard]`), then reinstall "
                             "Pillow-SIMD as scripts/setup.sh does") from exc
        # steps are counted from 1 (the scheduler's count after each step): a run resumed
        # after `start_step` steps drops the interrupted run's events from start_step + 1 on
        self.writer = SummaryWriter(str(out / "tensorboard"),
                                    purge_step=start_step + 1 if start_step else None)

    def step(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"step/{k}", v, step)

    def epoch(self, step: int, metrics: dict) -> None:
        """Per-epoch metrics at the global step where the epoch ended (so one x-axis, and a
        resume purges them with the per-step values)."""
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(f"epoch/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
