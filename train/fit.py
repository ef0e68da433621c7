"""The training run: epochs of train + val, checkpoints, resume, preemption, receipts.

Local shards train through train.resumable: the run's position is (epoch, samples of the
epoch's order consumed), saved in every checkpoint, so `--resume auto` continues at the
next step, on any number of ranks and workers. `--save-every` writes step checkpoints;
SIGTERM / SIGUSR1 make every rank finish its step, write one together and exit with
EXIT_PREEMPTED (train.preempt). Every epoch's record carries its receipt: `samples` and
`coverage` (train.resumable), checked against the index's value. Shards in object storage
(s3://) take the same path through a node's bounded cache (shards.cache), their order
shuffled in windows of `shard_window` shards. Shards behind a URL or a pipe and foreign ones
(timm's: no index.parquet) stream through train.data's loader and resume at epoch ends only.
The LR follows samples seen (epochs as a fraction), not steps, so it is continuous across a
change of world size (docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from prep.errors import PrepError, SampleError, SettingError, refuse_inside
from shards.cache import ShardCache
from shards.store import is_store_url
from train import checkpoint as ckpt
from train import jpeg_region
from train.config import TrainConfig
from train.data import (
    SkipCounter,
    SplitInfo,
    _train_map,
    collate_with_ring,
    local_dir,
    local_world,
    make_eval_loader,
    make_train_loader,
    open_store_cache,
    read_splits,
    train_size,
    train_steps,
)
from train.decode import derive_seed
from train.device_decode import resolve_decode
from train.engine import EpochTally, LossNotFinite, evaluate, scoring, train_one_epoch
from train.metrics import plot_metrics, write_metrics
from train.model import build_model, build_optimizer, check_classes, load_weights
from train.normalize import batch_transform
from train.preempt import EXIT_PREEMPTED, GO_ON, STOP, Preempted, StepControl
from train.resumable import (
    STATE_VERSION,
    ResumableLoader,
    Skipped,
    SplitRows,
    coverage_hex,
    epoch_order,
    key_hash,
    key_hashes,
    planned_coverage,
    read_rows,
)
from train.run_state import check_fingerprint, data_fingerprint, gather, rng_state, set_rng_state
from train.tblog import TensorBoardLog

PREEMPTED_FILE = "preempted.json"  # written when a signal stopped the run (slurm_train.sh)


def lr_factor(e: float, cfg: TrainConfig) -> float:
    """Multiplier of the peak LR after `e` epochs of samples (a fraction): linear warmup,
    then step / cosine / linear."""
    if e < cfg.warmup_epochs:
        return e / cfg.warmup_epochs
    if cfg.lr_schedule == "step":
        return cfg.lr_gamma ** sum(e >= m for m in cfg.lr_steps)
    progress = (e - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-9)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return max(0.0, 1.0 - progress)  # linear (FFCV): down to 0 at the last step


@dataclass
class Partial:
    """The epoch in progress, summed over all ranks, at a step checkpoint."""

    loss_sum: float = 0.0
    seen: int = 0
    coverage: int = 0  # XOR of key hashes of the samples trained on
    skipped: int = 0
    skipped_xor: int = 0  # XOR of key hashes of the unusable samples left out


@dataclass
class RunState:
    """Where a run is: restored from a checkpoint, or fresh."""

    epoch: int = 0  # the epoch in progress (or next)
    consumed: int = 0  # samples of its order taken, all ranks
    step: int = 0  # global steps taken
    best: float = 0.0
    history: list = field(default_factory=list)
    partial: Partial = field(default_factory=Partial)
    rng: list | None = None  # every rank's RNG streams (restored when the world size is kept)
    world: int = 0


def fit(args: argparse.Namespace, cfg: TrainConfig, rank: int, world: int,
        device: torch.device) -> dict:
    master_process = rank == 0  # prints and writes (nanoGPT's name)
    out = Path(args.output_dir)
    local = local_dir(args.data)
    refuse_inside(out, {"shard directory": local}, "--output-dir")
    for where in (out, *out.parents):  # the directory itself, or a file on its way
        if where.exists() and not where.is_dir():
            raise SettingError(f"--output-dir {out}: {where} is a file, not a directory; "
                               "choose a directory for checkpoints and metrics")
    train_split, val_split = read_splits(args.data, "train", "val")
    # random access needs a `prep shard` output on local disk or in object storage: its
    # index.parquet gives every sample's shard and offset (foreign shards, timm's, have
    # none; URL and pipe --data cannot seek: they stream)
    store = is_store_url(args.data)
    seekable = (local is not None or store) and train_split.checksums is not None
    if args.save_every and not seekable:
        raise SettingError("--save-every: step checkpoints need `prep shard` output on a local "
                           "directory or in object storage (the loader seeks through "
                           "index.parquet); URL, pipe or foreign shards resume at epoch ends")
    window = min(cfg.shard_window, len(train_split.urls)) if store and seekable else 0
    train_split.cache = val_split.cache = open_store_cache(
        args.data, args.cache_dir, args.cache_size,
        max(2 * window + 2, local_world() * max(cfg.workers, 1) + 1))
    control = StepControl(args.save_every, rank, world)  # parses --save-every
    if train_split.num_classes != cfg.num_classes:
        raise SettingError(f"the shards have {train_split.num_classes} classes, the config "
                           f"{cfg.num_classes}: --set num_classes={train_split.num_classes}")
    steps = train_steps(train_split.num_samples, world, cfg.batch_size)
    if steps == 0:
        raise SettingError(f"{train_split.num_samples} train samples are fewer than one global "
                           f"batch ({world} process(es) x batch_size {cfg.batch_size}): lower "
                           "batch_size")
    rows = read_rows(args.data, "train") if seekable else None
    fingerprint = data_fingerprint(rows.keys, rows.shards, cfg.seed, window) if rows else None
    peak_lr = cfg.lr * world * cfg.batch_size / 256  # linear scaling rule (Goyal et al.)
    model_without_ddp = build_model(cfg, device)  # torchvision's name; `model` is wrapped
    optimizer = build_optimizer(model_without_ddp, cfg, peak_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    auto = args.resume == "auto"
    run = _resume(str(out / "checkpoint.pt") if auto else args.resume, auto, cfg,
                  train_split.classes, args.data, model_without_ddp, optimizer, scaler,
                  fingerprint, rank, world)
    model = torch.nn.parallel.DistributedDataParallel(model_without_ddp) if world > 1 \
        else model_without_ddp
    if cfg.compile:
        model = torch.compile(model)
    if master_process:
        resolved = {"config": cfg.to_dict(), "argv": sys.argv, "world_size": world,
                    "peak_lr": peak_lr, "steps_per_epoch": steps, "torch": torch.__version__}
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(resolved, indent=1) + "\n")
            (out / PREEMPTED_FILE).unlink(missing_ok=True)
        except OSError as exc:
            raise SettingError(f"--output-dir {out}: cannot write there ({exc.strerror}); "
                               "choose a writable directory") from exc
        _trim_steps_log(out, run.step)
    decode = resolve_decode(args.decode, device)
    if master_process:
        print(f"decode: {decode}" + (" (region decoder)" if decode == "cpu" and
                                     jpeg_region.available() else ""), flush=True)
    trainer = Trainer(args, cfg, rank, world, device, decode, out, model, model_without_ddp,
                      optimizer, scaler, control, run, peak_lr)
    trainer.fingerprint, trainer.classes = fingerprint, train_split.classes
    trainer.cache, trainer.window = train_split.cache, window
    control.install()
    stopped = False
    try:
        return trainer.epochs(train_split, val_split, rows)
    except Preempted:
        stopped = True  # the handlers stay: torchrun's SIGTERM to the rest must not kill it
        raise SystemExit(EXIT_PREEMPTED) from None
    finally:
        control.close(keep_handlers=stopped)
        if trainer.loader is not None:
            trainer.loader.close()
        if trainer.tb:
            trainer.tb.close()


class Trainer:
    """The epoch loop of `fit`, with the state its step hook and checkpoints share."""

    def __init__(self, args: argparse.Namespace, cfg: TrainConfig, rank: int, world: int,
                 device: torch.device, decode: str, out: Path, model: torch.nn.Module,
                 model_without_ddp: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, control: StepControl, run: RunState,
                 peak_lr: float):
        self.args, self.cfg, self.rank, self.world, self.device = args, cfg, rank, world, device
        self.decode, self.out, self.model, self.model_without_ddp = decode, out, model, \
            model_without_ddp
        self.optimizer, self.scaler, self.control, self.run = optimizer, scaler, control, run
        self.peak_lr, self.master = peak_lr, rank == 0
        self.tb = TensorBoardLog(out, run.step) if cfg.tensorboard and self.master else None
        self.skips = SkipCounter(cfg.max_skip_rate)
        self.skipped = [0, 0]  # this rank's unusable samples this epoch: count, key XOR
        self.loader: ResumableLoader | None = None
        self.fingerprint: dict | None = None
        self.classes: list[str] | None = None
        self.stopped_at: tuple[int, int] | None = None  # the position of the last save
        self.cache: ShardCache | None = None  # s3:// data: this node's shard cache
        self.window = 0  # s3:// data: shards shuffled together (epoch_order)

    def _on_skip(self, s: Skipped) -> None:
        self.skips(SampleError(s.why))  # warns; raises above max_skip_rate
        self.skipped[0] += 1
        self.skipped[1] ^= key_hash(s.key)

    def _train_loader(self, rows: SplitRows, epoch: int) -> ResumableLoader:
        """The resumable loader at the run's position; a new one only when the crop size
        changes (progressive resizing): its workers persist across epochs."""
        size = train_size(self.cfg, epoch)
        if self.loader is None or self.loader_size != size:
            cfg, pin = self.cfg, self.device.type == "cuda"
            collate_fn, ring = collate_with_ring(cfg.workers, cfg.batch_size, size, pin,
                                                 self.decode)
            if self.loader is not None:
                self.loader.close()
            self.loader = ResumableLoader(
                rows, _train_map(cfg, epoch, derive_seed(cfg.seed, epoch, self.rank),
                                 self.decode, self.cfg.num_classes),
                batch_size=cfg.batch_size, rank=self.rank, world=self.world, seed=cfg.seed,
                workers=cfg.workers, collate=collate_fn, ring=ring, pin=pin,
                on_skip=self._on_skip, cache=self.cache, window=self.window)
            self.loader_size = size
            self.loader.load_state_dict(
                {"version": STATE_VERSION, "epoch": epoch, "num_samples": len(rows.keys),
                 "seed": cfg.seed, "window": self.window,
                 "consumed": self.run.consumed if epoch == self.run.epoch else 0})
        return self.loader

    def epochs(self, train_split: SplitInfo, val_split: SplitInfo,
               rows: SplitRows | None) -> dict:
        cfg, run, world = self.cfg, self.run, self.world
        hashes = key_hashes(rows.keys) if rows is not None else None
        n = train_split.num_samples
        pin = self.device.type == "cuda"
        val_norm = batch_transform(cfg, self.device, self.decode, cfg.val_crop)
        criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        metrics: dict = {}
        for epoch in range(run.epoch, cfg.epochs):
            if rows is not None:
                loader = self._train_loader(rows, epoch)
                steps, consumed0 = loader.steps_left(), loader.consumed
            else:  # remote or foreign shards: the streaming loader, from the epoch start
                loader = make_train_loader(train_split, cfg, self.rank, world, epoch,
                                           self.skips, pin, self.decode)
                steps, consumed0 = train_steps(n, world, cfg.batch_size), 0
            per_step = world * cfg.batch_size
            p = run.partial if self.master else Partial()
            tally = EpochTally.start(self.device, p.loss_sum, p.seen)
            first = run.step

            def lr_at(k: int, epoch: int = epoch, consumed0: int = consumed0,
                      per_step: int = per_step) -> float:
                return self.peak_lr * lr_factor(epoch + (consumed0 + k * per_step) / n, cfg)

            def after_step(k: int, first: int = first, tally: EpochTally = tally) -> None:
                run.step = first + k + 1
                self.skips.seen += cfg.batch_size
                action = self.control.after_step(run.step)
                if action != GO_ON:
                    self._step_checkpoint(action, tally)

            try:
                metrics = train_one_epoch(
                    self.model, loader, steps=steps, optimizer=self.optimizer,
                    scaler=self.scaler, criterion=criterion,
                    norm=batch_transform(cfg, self.device, self.decode, train_size(cfg, epoch)),
                    cfg=cfg, epoch=epoch, show=self.master, lr_at=lr_at, tally=tally,
                    first_step=first, log_step=self._log_step, after_step=after_step)
            except LossNotFinite as exc:
                raise SystemExit(f"{exc}: stopping. The last good checkpoint is "
                                 f"{self.out / 'checkpoint.pt'}.") from exc
            if rows is not None:
                if self.control.stop_now():  # asked during the last steps: stop before val
                    self._step_checkpoint(STOP, tally, at_end=True)
                metrics |= self._receipt(hashes)
            val_loader = make_eval_loader(val_split, cfg, self.rank, world, cfg.batch_size,
                                          pin, self.decode)
            metrics |= evaluate(self.model, val_loader, val_norm,
                                num_samples=val_split.num_samples, amp=cfg.amp,
                                num_classes=cfg.num_classes, show=self.master,
                                **scoring(val_split, self.classes, "val"))
            metrics |= {"epoch": epoch, "lr": lr_at(steps)}
            run.history.append(metrics)
            run.epoch, run.consumed, run.partial = epoch + 1, 0, Partial()
            self.skipped = [0, 0]
            is_best, run.best = metrics["top1"] > run.best, max(run.best, metrics["top1"])
            rngs = gather(rng_state(), self.control.group)
            if self.master:
                self._save((epoch + 1, 0), Partial(), rngs, is_best)
                write_metrics(self.out, run.history)
                plot_metrics(self.out, run.history)
                if self.tb:
                    self.tb.epoch(run.step, metrics)
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                  for k, v in metrics.items()}), flush=True)
            if self.control.stop_now():
                self.stopped_at = (epoch + 1, 0)
                self._preempted(f"stopped after epoch {epoch} (its checkpoint is written)")
        return metrics

    def _log_step(self, step: int, values: dict) -> None:
        if self.tb:
            self.tb.step(step, values)
        if self.master:
            with open(self.out / "steps.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "epoch": self.run.epoch} | values) + "\n")

    def _gathered(self, tally: EpochTally, loader_coverage: int) -> Partial:
        """The epoch so far, summed over every rank (a collective), with what an earlier run
        of this epoch carried (run.partial, restored from the checkpoint)."""
        mine = (tally.loss_sum.item(), tally.seen, loader_coverage, *self.skipped)
        parts = gather(mine, self.control.group)
        carried = self.run.partial
        cov, sk_xor = carried.coverage, carried.skipped_xor
        for _, _, c, _, x in parts:
            cov, sk_xor = cov ^ c, sk_xor ^ x
        # loss and seen: rank 0's tally started from the carried sums already
        return Partial(sum(p[0] for p in parts), sum(p[1] for p in parts), cov,
                       carried.skipped + sum(p[3] for p in parts), sk_xor)

    def _step_checkpoint(self, action: int, tally: EpochTally, at_end: bool = False) -> None:
        """Every rank: gather the epoch so far and the RNG streams; rank 0 writes the step
        checkpoint. STOP: then raise Preempted."""
        loader = self.loader
        if loader is None:  # remote shards: no position to save inside an epoch
            if action == STOP:
                self._preempted("stopped without a step checkpoint (remote or foreign shards "
                                "resume at the last epoch's checkpoint)")
            return
        if at_end:  # the loader moved on to the next epoch: save the end of this one
            epoch, consumed, coverage = loader.finished
        else:
            epoch, consumed, coverage = loader.epoch, loader.consumed, loader.coverage
        partial = self._gathered(tally, coverage)
        rngs = gather(rng_state(), self.control.group)
        self.stopped_at = (epoch, consumed)
        if self.master:
            self._save((epoch, consumed), partial, rngs)
        self.control.saved()
        if action == STOP:
            self._preempted(f"stopped; step checkpoint written at epoch {epoch}, sample "
                            f"{consumed} of its order, step {self.run.step}")
        if self.master:
            print(f"step checkpoint: epoch {epoch}, sample {consumed}, step {self.run.step}",
                  flush=True)

    def _preempted(self, what: str) -> None:
        """Every rank, after the checkpoint: rank 0 says so and writes preempted.json; all
        wait for it (torchrun ends the other ranks once one exits), then Preempted."""
        if self.master:
            print(f"{self.control.signal_name()}: {what}, {self.control.since_signal():.1f} s "
                  f"after the signal; exit status {EXIT_PREEMPTED}. Continue with the same "
                  "command and --resume auto", flush=True)
            (self.out / PREEMPTED_FILE).write_text(json.dumps(
                {"signal": self.control.signal_name(), "position": self.stopped_at,
                 "step": self.run.step, "exit_status": EXIT_PREEMPTED}) + "\n")
        self.control.barrier()
        raise Preempted(what)

    def _receipt(self, hashes: np.ndarray) -> dict:
        """The epoch's receipt (all ranks), checked against the index's value for the
        samples the epoch planned: stops naming the difference."""
        epoch, consumed, coverage = self.loader.finished
        done = self._gathered(EpochTally.start(self.device), coverage)
        order = epoch_order(len(hashes), self.cfg.seed, epoch, self.window,
                            self.loader.shard_sizes)
        planned = planned_coverage(hashes, order[:consumed])
        if coverage_hex(done.coverage ^ done.skipped_xor) != planned:
            raise PrepError(f"epoch {epoch}: coverage {coverage_hex(done.coverage)} is not the "
                            f"index's {planned} for the epoch's {consumed} planned samples: "
                            "a sample was trained on twice or missed; the run stops")
        if self.master:
            left = len(hashes) - consumed
            print(f"epoch {epoch}: coverage: exact ({consumed - done.skipped} samples"
                  + (f", {done.skipped} unusable skipped" if done.skipped else "")
                  + (f"; {left} left over: fewer than a global batch" if left else "") + ")",
                  flush=True)
        return {"samples": consumed - done.skipped, "coverage": coverage_hex(done.coverage),
                "coverage_check": "exact", "skipped": done.skipped}

    def _save(self, position: tuple[int, int], partial: Partial, rngs: list | None,
              is_best: bool = False) -> None:
        """Rank 0: the checkpoint of a position (epoch, consumed): checkpoint.pt, the one it
        replaces kept as checkpoint.prev.pt (train.checkpoint)."""
        run = self.run
        state = {"model": ckpt.model_state(self.model_without_ddp),
                 "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                 "epoch": position[0] - 1,  # the last finished epoch
                 "position": {"version": STATE_VERSION, "epoch": position[0],
                              "consumed": position[1]},
                 "step": run.step, "best_top1": run.best, "history": run.history,
                 "partial": asdict(partial), "rng": rngs, "world_size": self.world,
                 "data": self.fingerprint, "config": self.cfg.to_dict(),
                 "classes": self.classes}  # WNIDs in label order: evaluate/resume compare
        ckpt.save(state, self.out / "checkpoint.pt", keep_previous=True)
        if is_best:
            ckpt.save(state, self.out / "best.pt")


def _trim_steps_log(out: Path, step: int) -> None:
    """steps.jsonl holds each step once: lines past the resumed step (from the interrupted
    run) are dropped."""
    path = out / "steps.jsonl"
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
    if len(kept) != len(lines):
        path.write_text("".join(kept))


def _resume(path: str | None, auto: bool, cfg: TrainConfig, classes: list[str] | None,
            data: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, fingerprint: dict | None, rank: int,
            world: int) -> RunState:
    """The run's state from a checkpoint (refused when it belongs to other data); fresh
    when there is none."""
    master_process = rank == 0
    if not path or (auto and not Path(path).is_file()):
        torch.manual_seed(cfg.seed + rank)
        return RunState()
    if auto:
        state, src, note = ckpt.load_for_resume(Path(path))
        if note and master_process:
            print(note, flush=True)
    else:
        state, src = ckpt.load(Path(path)), Path(path)
    check_classes(state.get("classes"), classes, str(src), data)
    load_weights(model, state, str(src), cfg.arch)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        best, history = state["best_top1"], state["history"]
    except (KeyError, ValueError) as exc:
        raise PrepError(f"{src}: not a training checkpoint of this trainer (no optimizer "
                        f"state: {exc}); use it with --evaluate, or start a new run") from None
    position = state.get("position")
    if position is None:  # an epoch checkpoint of an older trainer
        run = RunState(state["epoch"] + 1, 0, state.get("scheduler", {}).get("last_epoch", 0),
                       best, history)
    else:
        if fingerprint is not None:
            check_fingerprint(state.get("data"), fingerprint, str(src), data)
        elif position["consumed"]:
            raise PrepError(f"{src}: a step checkpoint (epoch {position['epoch']}, sample "
                            f"{position['consumed']}) needs local or s3:// shards to seek to "
                            f"its position; {data} can only be streamed")
        run = RunState(position["epoch"], position["consumed"], state["step"], best, history,
                       Partial(**(state.get("partial") or {})), state.get("rng"),
                       state.get("world_size", 0))
    if run.rng is not None and run.world == world:
        set_rng_state(run.rng[rank])
    else:  # another world size: fresh streams, seeded by the position
        torch.manual_seed(derive_seed(cfg.seed, run.step, rank))
    if master_process:
        where = f", sample {run.consumed} of the epoch" if run.consumed else ""
        change = (f"; saved on {run.world} rank(s), now {world}: the rest of the epoch is "
                  "split over the new ranks" if run.world and run.world != world else "")
        print(f"resumed from {src}: epoch {run.epoch}, step {run.step}{where}{change}",
              flush=True)
    return run
