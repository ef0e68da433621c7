"""Train (and evaluate) a torchvision classifier on `prep shard` WebDataset shards, with DDP.

    python train/main.py --data shards/ --recipe train/recipes/cpu_demo.yaml --output-dir runs/demo
    torchrun --nproc_per_node=8 train/main.py --data shards/ \\
        --recipe train/recipes/resnet50.yaml --output-dir runs/rn50
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        train/main.py ...                                  (multi-node; see scripts/slurm_train.sh)
    torchrun ... train/main.py --data shards/ --evaluate --checkpoint runs/rn50/checkpoint.pt

Settings come from train/config.py defaults, then --recipe, then --set name=value. DDP is
detected from torchrun's RANK/WORLD_SIZE; rank 0 does all the writing.

Exit status: 0 done; 1 an error (one line); 75 stopped by SIGTERM or SIGUSR1 after writing
a step checkpoint (continue with --resume auto); 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from prep.errors import (
    PrepError,
    SettingError,
    exit_lost_peer,
    exit_on_error,
    refuse_inside,
    refuse_overwrite,
    refuse_url,
    run_program,
)
from prep.predictions import per_class_accuracy, write_predictions
from train import checkpoint as ckpt
from train.collectives import lost_peer
from train.config import (
    TrainConfig,
    apply,
    check_config,
    load_config,
    parse_set,
    settings_help,
)
from train.data import (
    local_dir,
    local_world,
    make_eval_loader,
    open_store_cache,
    read_split,
)
from train.device_decode import resolve_decode
from train.dist_init import init_process_group
from train.engine import evaluate, scoring
from train.fit import fit
from train.gather import gather_on_rank0
from train.model import build_model, check_classes, load_weights
from train.normalize import batch_transform
from train.preempt import stop_with_torchrun


@exit_on_error
def main(argv: list[str] | None = None) -> dict:
    """Train (train/fit.py) or evaluate (run_eval): the settings, the process group, then
    the work; the functions below follow in the order it reaches them."""
    args = parse_args(argv)
    cfg = load_config(args.recipe, args.set)
    rank, world, device = setup_distributed(args.device)
    try:
        torch.manual_seed(cfg.seed + rank)
        if args.evaluate:
            return run_eval(args, cfg, rank, world, device)
        return fit(args, cfg, rank, world, device)
    except Exception as exc:
        reason = lost_peer(exc) if world > 1 else None
        if reason is None:
            raise
        exit_lost_peer(
            f"rank {rank}: lost contact with another rank ({reason}): it stopped, and its own "
            "error comes first in the log (torchrun's summary names it), or the network "
            "between them failed; once the cause is fixed, rerun with --resume auto")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                epilog=settings_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True,
                   help="`prep shard` output: a directory, an object-storage prefix "
                   "s3://BUCKET/PREFIX (AWS_* settings, ~/.aws; read through --cache-dir), a "
                   "URL prefix (http://host/shards) or a pipe: template with {} for the file "
                   "name, e.g. 'pipe:curl -s http://host/shards/{}'")
    p.add_argument("--cache-dir", default=None,
                   help="s3:// --data: where this node keeps shards, shared by its ranks and "
                   "workers (default: $XDG_CACHE_HOME/prep-shards, ~/.cache/prep-shards)")
    p.add_argument("--cache-size", default=None, metavar="SIZE",
                   help="s3:// --data: the most the cache dir holds at any moment, e.g. 200GB, "
                   "500MiB or bytes; least recently used shards go first (default: the whole "
                   "dataset, or half the free space there when that is less)")
    p.add_argument("--recipe", default=None, help="YAML settings file (default: none)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override one setting, e.g. --set epochs=3 (default: none)")
    p.add_argument("--output-dir", default="runs/default", help="(default: runs/default)")
    p.add_argument("--resume", default=None,
                   help="'auto' (OUTPUT_DIR/checkpoint.pt if present) or a path (default: none)")
    p.add_argument("--save-every", default=None, metavar="N|TIME",
                   help="also write a step checkpoint every N steps, or every TIME (90s, 30m, "
                   "1.5h); local or s3:// shards (default: at epoch ends only)")
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
    for flag in ("output_dir", "checkpoint", "out", "recipe", "resume", "cache_dir"):
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
    if local_world() > 1 and m[1] is not None:
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
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world()))
    if world > 1:
        init_process_group("nccl" if use_cuda else "gloo")
    stop_with_torchrun(rank)
    return rank, world, device


def run_eval(args: argparse.Namespace, cfg: TrainConfig, rank: int, world: int,
             device: torch.device) -> dict:
    master_process = rank == 0  # prints and writes (nanoGPT's name)
    if not args.checkpoint:
        raise SettingError("--evaluate needs --checkpoint PATH")
    split = read_split(args.data, args.split)
    if args.out:
        out = Path(args.out)
        refuse_overwrite(out, {"checkpoint": args.checkpoint}, "--out")
        refuse_inside(out, {"shard directory": local_dir(args.data)}, "--out")
        if not out.parent.is_dir():
            raise PrepError(f"--out {out}: directory {out.parent} does not exist")
    state = ckpt.load(Path(args.checkpoint))
    if "config" in state and args.recipe is None:  # the run's own settings, then --set
        cfg = apply(TrainConfig(), state["config"], str(args.checkpoint))
        for item in args.set:  # only the settings named change
            cfg = apply(cfg, parse_set(item), f"--set {item}")
        check_config(cfg, f"{args.checkpoint} with --set")
    # sized for the workers of the settings in force: the checkpoint's, not the defaults
    split.cache = open_store_cache(args.data, args.cache_dir, args.cache_size,
                                   local_world() * max(cfg.workers, 1) + 1)
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
        merged = gather_on_rank0(kept, out, rank, world)
        if merged is not None:  # rank 0
            results = write_predictions(merged, out, cfg.num_classes, classes or split.classes)
            metrics["per_class_top1"] = per_class_accuracy(results, cfg.num_classes)
            (out.with_suffix(".metrics.json")).write_text(json.dumps(metrics, indent=1) + "\n")
    if master_process:
        print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    run_program(main)
