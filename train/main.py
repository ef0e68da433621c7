"""Train (and evaluate) a torchvision classifier on `prep shard` WebDataset shards, with DDP.

    python train/main.py --data shards/ --recipe train/recipes/cpu_demo.yaml --output-dir runs/demo
    torchrun --nproc_per_node=8 train/main.py --data shards/ \\
        --recipe train/recipes/resnet50.yaml --output-dir runs/rn50
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        train/main.py ...                                  (multi-node; see scripts/slurm_train.sh)
    torchrun ... train/main.py --data shards/ --evaluate --checkpoint runs/rn50/checkpoint.pt

Settings come from train/config.py defaults, then --recipe, then --set name=value. DDP is
detected from torchrun's RANK/WORLD_SIZE; rank 0 does all the writing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from torch.optim.lr_scheduler import LRScheduler

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torchvision

from prep.errors import (
    PrepError,
    SettingError,
    exit_on_error,
    ignore_sigint,
    refuse_inside,
    refuse_overwrite,
    refuse_url,
)
from prep.predictions import per_class_accuracy, write_predictions
from prep.scoring import RESTRICTED, global_index, official_label, real_for, subset_wnids
from shards import tarread
from train import checkpoint as ckpt
from train import jpeg_region
from train.config import (
    TrainConfig,
    apply,
    check_config,
    load_config,
    parse_set,
    settings_help,
)
from train.data import (
    SkipCounter,
    SplitInfo,
    make_eval_loader,
    make_train_loader,
    read_split,
    read_splits,
    train_size,
    train_steps,
)
from train.device_decode import DecodeNormalize, DeviceDecoder, resolve_decode
from train.dist_init import init_process_group
from train.engine import LossNotFinite, Normalize, evaluate, train_one_epoch
from train.metrics import plot_metrics, write_metrics
from train.tblog import TensorBoardLog


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                epilog=settings_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True,
                   help="`prep shard` output: a directory, a URL prefix (http://host/shards) or "
                   "a pipe: template with {} for the file name, e.g. 'pipe:aws s3 cp "
                   "s3://bucket/shards/{} -'")
    p.add_argument("--recipe", default=None, help="YAML settings file (default: none)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override one setting, e.g. --set epochs=3 (default: none)")
    p.add_argument("--output-dir", default="runs/default", help="(default: runs/default)")
    p.add_argument("--resume", default=None,
                   help="'auto' (OUTPUT_DIR/checkpoint.pt if present) or a path (default: none)")
    p.add_argument("--evaluate", action="store_true", help="only evaluate --checkpoint")
    p.add_argument("--checkpoint", default=None, help="weights to evaluate (default: none)")
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    p.add_argument("--tta-flip", action="store_true", help="average with flipped images")
    p.add_argument("--out", default=None,
                   help="with --evaluate: write the predictions pickle here (default: none)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda (each rank its own GPU) or cuda:N (one process); a GPU "
                   "that is not there is an error (default: cuda if available, else cpu)")
    p.add_argument("--decode", default="auto", choices=("auto", "cpu", "gpu", "pil"),
                   help="JPEG decoding: cpu (workers; region decoder), gpu (nvJPEG on the "
                   "device, workers only read), pil (plain Pillow reference path), auto (gpu "
                   "when nvJPEG works, else cpu) (default: auto)")
    short = p.add_argument_group("the flags of torchvision's references and timm (shorthands "
                                 "for --set NAME=VALUE; applied after --recipe, before --set)")
    for flags, setting, kind, text in SHORTHANDS:
        short.add_argument(*flags, dest=f"short_{setting}", type=kind, default=None,
                           metavar=setting.upper(), help=f"--set {setting}=... ({text})")
    short.add_argument("--amp", dest="short_amp", nargs="?", const="bf16", default=None,
                       choices=("none", "bf16", "fp16"),
                       help="mixed precision: bf16 when given alone, or fp16 (GradScaler)")
    args, unknown = p.parse_known_args(argv)
    if unknown:
        p.error(_unknown_flags(unknown, p))
    for flag in ("output_dir", "checkpoint", "out", "recipe", "resume"):
        value = getattr(args, flag)
        if value is not None and value != "auto":
            refuse_url(value, f"--{flag.replace('_', '-')}")
    short = _shorthand_values(args)
    _say_which_wins(short, args.set)
    args.set = [f"{setting}={value}" for setting, value in short] + args.set
    return args


def _say_which_wins(short: list[tuple[str, object]], sets: list[str]) -> None:
    """A setting given by a flag and by --set: --set is applied last and wins; say so."""
    named = {item.partition("=")[0].strip(): item for item in sets}
    for setting, value in short:
        if setting in named and os.environ.get("RANK", "0") == "0":
            print(f"note: {setting} is given twice ({setting}={value} by its flag, "
                  f"--set {named[setting]}); --set is applied last and wins",
                  file=sys.stderr, flush=True)


# (flags, setting, type, meaning): torchvision's references/classification/train.py and
# timm's train.py spell these the same way
SHORTHANDS = [
    (("--model", "--arch"), "arch", str, "torchvision model name, e.g. resnet50"),
    (("--epochs",), "epochs", int, "training epochs"),
    (("-b", "--batch-size"), "batch_size", int, "images per process"),
    (("--lr",), "lr", float, "peak LR for a global batch of 256"),
    (("--wd", "--weight-decay"), "weight_decay", float, "weight decay"),
    (("-j", "--workers"), "workers", int, "data-loading processes per rank"),
    (("--label-smoothing", "--smoothing"), "label_smoothing", float, "label smoothing"),
]


def _shorthand_values(args: argparse.Namespace) -> list[tuple[str, object]]:
    names = [s for _, s, _, _ in SHORTHANDS] + ["amp"]
    return [(n, getattr(args, f"short_{n}")) for n in names
            if getattr(args, f"short_{n}") is not None]


def _unknown_flags(unknown: list[str], parser: argparse.ArgumentParser) -> str:
    """`unknown flag --lrr (did you mean --lr?)`, for each unknown one."""
    import difflib

    known = [o for a in parser._actions for o in a.option_strings]
    parts = []
    for flag in (u.split("=", 1)[0] for u in unknown if u.startswith("-")):
        close = difflib.get_close_matches(flag, known, n=3, cutoff=0.6)
        parts.append(f"unknown flag {flag}" + (f" (did you mean {', '.join(close)}?)"
                                                if close else ""))
    return "; ".join(parts) or f"unexpected arguments: {' '.join(unknown)}"


def parse_device(device_arg: str | None, local_rank: int) -> torch.device:
    """--device: None (the local rank's GPU when CUDA works, else the CPU), `cpu`, `cuda`
    or `gpu` (this rank's GPU), `cuda:N` (GPU N, one process only). Asking for a GPU that is
    not there is an error, never a silent fall back to the CPU."""
    if device_arg is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    name = device_arg.strip().lower()
    if name == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"(?:cuda|gpu)(?::(\d+))?", name)
    if not m:
        raise SettingError(f"--device {device_arg!r}: expected cpu, cuda (or gpu) or cuda:N")
    if not torch.cuda.is_available():
        raise SettingError(f"--device {device_arg}: CUDA is not available here (no GPU, or no "
                           "driver); use --device cpu")
    index = int(m[1]) if m[1] is not None else local_rank
    if int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > 1 and m[1] is not None:
        raise SettingError(f"--device {device_arg}: with several processes on this node each "
                           "rank takes its own GPU (LOCAL_RANK); pass --device cuda")
    if index >= torch.cuda.device_count():
        raise SettingError(f"--device {device_arg}: this machine has "
                           f"{torch.cuda.device_count()} GPU(s) (cuda:0..)")
    return torch.device(f"cuda:{index}")


def setup_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; NCCL on GPU, gloo on CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = parse_device(device_arg, local)
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
    else:  # share the cores among the processes of this node
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1:
        init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def build_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    model = torchvision.models.get_model(cfg.arch, num_classes=cfg.num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig,
                    peak_lr: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():  # norm weights and biases are the 1-d parameters
        (no_decay if cfg.no_wd_norm_bias and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=peak_lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak LR at a step: linear warmup, then step / cosine / linear."""
    e = step / steps_per_epoch
    if e < cfg.warmup_epochs:
        return e / cfg.warmup_epochs
    if cfg.lr_schedule == "step":
        return cfg.lr_gamma ** sum(e >= m for m in cfg.lr_steps)
    progress = (e - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-9)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return max(0.0, 1.0 - progress)  # linear (FFCV): down to 0 at the last step


def batch_transform(cfg: TrainConfig, device: torch.device, decode: str, size: int) -> Callable:
    """uint8 batch -> normalized float on the device; with --decode gpu, decode first."""
    norm = Normalize(device, cfg.channels_last)
    return DecodeNormalize(DeviceDecoder(device, size), norm) if decode == "gpu" else norm


def check_classes(saved: list[str] | None, shards: list[str] | None, checkpoint: str,
                  data: str) -> list[str] | None:
    """The class list predictions are named with: the checkpoint's, which must be the
    shards' (same WNIDs, same order). A checkpoint without one (torchvision weights, an older
    run) is taken to follow the shards' order, with a warning."""
    if saved is None:
        if shards is not None:
            print(f"warning: {checkpoint} has no class list; assuming the model's classes are "
                  f"the shards' ({len(shards)} classes, {data}/_info.json order)", flush=True)
        return shards
    if shards is None or saved == shards:
        return saved
    i = next((i for i, (a, b) in enumerate(zip(saved, shards)) if a != b),
             min(len(saved), len(shards)))
    have = (f"class {i} is {saved[i] if i < len(saved) else 'missing'} in the checkpoint, "
            f"{shards[i] if i < len(shards) else 'missing'} in the shards")
    raise PrepError(f"{checkpoint}: the model was trained on other classes than the shards in "
                    f"{data} have ({len(saved)} vs {len(shards)} classes; {have}). Its "
                    "predictions would be named wrongly: use shards made from the same classes")


def load_weights(model: torch.nn.Module, state: dict, checkpoint: str, arch: str) -> None:
    saved_arch = (state.get("config") or {}).get("arch")
    if saved_arch and saved_arch != arch:
        raise PrepError(f"{checkpoint}: holds a {saved_arch}, the settings say arch={arch}: "
                        f"--set arch={saved_arch} (or use a checkpoint of a {arch})")
    try:
        model.load_state_dict(ckpt.strip_prefixes(state.get("model", state)))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise PrepError(f"{checkpoint}: its weights do not fit a {arch} with these settings "
                        f"({first[1].strip() if len(first) > 1 else first[0][:200]})"
                        ) from None


def scoring(split: SplitInfo, classes: list[str] | None, split_name: str) -> dict:
    """How `evaluate` scores this split: ImageNet-A/-R restrict the logits to their 200
    classes; ImageNet val (any copy, any subset) adds ReaL's top-1/top-5."""
    kind = (split.evalset or {}).get("kind")
    if kind in RESTRICTED:
        if classes is None:
            raise PrepError(f"{kind}: the model's class list is unknown, so its logits cannot "
                            "be restricted to the 200 classes; evaluate a checkpoint of this "
                            "trainer or shards whose _info.json lists the classes")
        index = {w: i for i, w in enumerate(classes)}
        return {"valid": [index[w] for w in subset_wnids(kind) if w in index]}
    if split.evalset is None and split_name in ("val", "validation") and classes and \
            all(w in global_index() for w in classes):
        return {"real": real_for, "official": official_label,
                "to_global": [global_index()[w] for w in classes]}
    return {}


def _local(data: str) -> str | None:
    return data.removeprefix("file://") if tarread.is_local(data) and "{}" not in data else None


def run_eval(args: argparse.Namespace, cfg: TrainConfig, rank: int, world: int,
             device: torch.device) -> dict:
    master_process = rank == 0  # prints and writes (nanoGPT's name)
    if not args.checkpoint:
        raise SettingError("--evaluate needs --checkpoint PATH")
    split = read_split(args.data, args.split)
    if args.out:
        out = Path(args.out)
        refuse_overwrite(out, {"checkpoint": args.checkpoint}, "--out")
        refuse_inside(out, {"shard directory": _local(args.data)}, "--out")
        if not out.parent.is_dir():
            raise PrepError(f"--out {out}: directory {out.parent} does not exist")
    state = ckpt.load(Path(args.checkpoint))
    if "config" in state and args.recipe is None:  # the run's own settings, then --set
        cfg = apply(TrainConfig(), state["config"], str(args.checkpoint))
        for item in args.set:  # only the settings named change
            cfg = apply(cfg, parse_set(item), f"--set {item}")
        check_config(cfg, f"{args.checkpoint} with --set")
    classes = check_classes(state.get("classes"), split.classes, args.checkpoint, args.data)
    if split.num_classes != cfg.num_classes:
        raise PrepError(f"{args.checkpoint}: a {cfg.num_classes}-class model, the shards in "
                        f"{args.data} have {split.num_classes} classes")
    model = build_model(cfg, device)
    load_weights(model, state, args.checkpoint, cfg.arch)
    decode = resolve_decode(args.decode, device)
    loader = make_eval_loader(split, cfg, rank, world, cfg.batch_size, device.type == "cuda",
                              decode)
    kept: dict | None = {} if args.out else None
    metrics = evaluate(model, loader, batch_transform(cfg, device, decode, cfg.val_crop),
                       num_samples=split.num_samples, amp=cfg.amp, num_classes=cfg.num_classes,
                       show=master_process, tta_flip=args.tta_flip, keep=kept,
                       **scoring(split, classes, args.split))
    if args.out:
        out = Path(args.out)
        results = write_predictions(kept, out, cfg.num_classes, rank, world,
                                    classes or split.classes)
        if results is not None:  # rank 0
            metrics["per_class_top1"] = per_class_accuracy(results, cfg.num_classes)
            (out.with_suffix(".metrics.json")).write_text(json.dumps(metrics, indent=1) + "\n")
    if master_process:
        print(json.dumps(metrics))
    return metrics


@exit_on_error
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.recipe, args.set)
    rank, world, device = setup_distributed(args.device)
    try:
        torch.manual_seed(cfg.seed + rank)
        if args.evaluate:
            return run_eval(args, cfg, rank, world, device)
        return fit(args, cfg, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _resume(path: str | None, auto: bool, cfg: TrainConfig, classes: list[str] | None,
            data: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: LRScheduler, scaler: torch.amp.GradScaler, rank: int) -> tuple:
    """(start epoch, best top-1, history) from a checkpoint; fresh when there is none."""
    master_process = rank == 0
    if not path or (auto and not Path(path).is_file()):
        return 0, 0.0, []
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
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start, best, history = state["epoch"] + 1, state["best_top1"], state["history"]
    except (KeyError, ValueError) as exc:
        raise PrepError(f"{src}: not a training checkpoint of this trainer (no optimizer "
                        f"state: {exc}); use it with --evaluate, or start a new run") from None
    if master_process:
        print(f"resumed from {src}: epoch {start}, step {scheduler.last_epoch}")
    return start, best, history


def fit(args: argparse.Namespace, cfg: TrainConfig, rank: int, world: int,
        device: torch.device) -> dict:
    master_process = rank == 0  # prints and writes (nanoGPT's name)
    out = Path(args.output_dir)
    refuse_inside(out, {"shard directory": _local(args.data)}, "--output-dir")
    for where in (out, *out.parents):  # the directory itself, or a file on its way
        if where.exists() and not where.is_dir():
            raise SettingError(f"--output-dir {out}: {where} is a file, not a directory; "
                               "choose a directory for checkpoints and metrics")
    train_split, val_split = read_splits(args.data, "train", "val")
    if train_split.num_classes != cfg.num_classes:
        raise SettingError(f"the shards have {train_split.num_classes} classes, the config "
                           f"{cfg.num_classes}: --set num_classes={train_split.num_classes}")
    steps = train_steps(train_split.num_samples, world, cfg.batch_size)
    if steps == 0:
        raise SettingError(f"{train_split.num_samples} train samples are fewer than one global "
                           f"batch ({world} process(es) x batch_size {cfg.batch_size}): lower "
                           "batch_size")
    peak_lr = cfg.lr * world * cfg.batch_size / 256  # linear scaling rule (Goyal et al.)
    model_without_ddp = build_model(cfg, device)  # torchvision's name; `model` is wrapped
    optimizer = build_optimizer(model_without_ddp, cfg, peak_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    auto = args.resume == "auto"
    resume = str(out / "checkpoint.pt") if auto else args.resume
    start, best, history = _resume(resume, auto, cfg, train_split.classes, args.data,
                                   model_without_ddp,
                                   optimizer, scheduler, scaler, rank)
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
        except OSError as exc:
            raise SettingError(f"--output-dir {out}: cannot write there ({exc.strerror}); "
                               "choose a writable directory") from exc
    decode = resolve_decode(args.decode, device)
    if master_process:
        print(f"decode: {decode}" + (" (region decoder)" if decode == "cpu" and
                                     jpeg_region.available() else ""), flush=True)
    val_norm = batch_transform(cfg, device, decode, cfg.val_crop)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    pin = device.type == "cuda"
    metrics: dict = {}
    tb = TensorBoardLog(out, scheduler.last_epoch) if cfg.tensorboard and master_process else None
    try:
        for epoch in range(start, cfg.epochs):
            loader = make_train_loader(train_split, cfg, rank, world, epoch,
                                       SkipCounter(cfg.max_skip_rate), pin, decode)
            norm = batch_transform(cfg, device, decode, train_size(cfg, epoch))
            try:
                metrics = train_one_epoch(
                    model, loader, steps=steps, optimizer=optimizer, scheduler=scheduler,
                    scaler=scaler, criterion=criterion, norm=norm, cfg=cfg, epoch=epoch,
                    show=master_process, log_step=tb.step if tb else None)
            except LossNotFinite as exc:
                raise SystemExit(f"{exc}: stopping. The last good checkpoint is "
                                 f"{out / 'checkpoint.pt'} (epoch {epoch - 1}).") from exc
            val_loader = make_eval_loader(val_split, cfg, rank, world, cfg.batch_size, pin, decode)
            metrics |= evaluate(model, val_loader, val_norm, num_samples=val_split.num_samples,
                                amp=cfg.amp, num_classes=cfg.num_classes, show=master_process,
                                **scoring(val_split, train_split.classes, "val"))
            metrics |= {"epoch": epoch, "lr": scheduler.get_last_lr()[0]}
            history.append(metrics)
            if master_process:
                save_epoch(out, model=model_without_ddp, optimizer=optimizer,
                           scheduler=scheduler, scaler=scaler, cfg=cfg, epoch=epoch,
                           history=history, best=max(best, metrics["top1"]),
                           is_best=metrics["top1"] > best, classes=train_split.classes)
                if tb:
                    tb.epoch(scheduler.last_epoch, metrics)
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                  for k, v in metrics.items()}), flush=True)
            best = max(best, metrics["top1"])
    finally:
        if tb:
            tb.close()
    return metrics


def save_epoch(out: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: LRScheduler, scaler: torch.amp.GradScaler, cfg: TrainConfig, epoch: int,
               history: list[dict], best: float, is_best: bool,
               classes: list[str] | None) -> None:
    state = {"model": ckpt.model_state(model), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
             "epoch": epoch, "best_top1": best, "history": history, "config": cfg.to_dict(),
             "classes": classes}  # WNIDs in label order: evaluate/resume compare them
    ckpt.save(state, out / "checkpoint.pt", keep_previous=True)
    if is_best:
        ckpt.save(state, out / "best.pt")
    write_metrics(out, history)
    plot_metrics(out, history)


if __name__ == "__main__":
    try:
        main()
    finally:
        ignore_sigint()  # done: a Ctrl-C during shutdown must not end it with -SIGINT
