#!/usr/bin/env python
"""Every GPU claim of the trainer and loader, measured by one prepared command.

    python3 scripts/gpu_check.py --out gpu-check          # one NVIDIA GPU, ~8 min
    python3 scripts/gpu_check.py --device cpu --tiny --out /tmp/gc   # dry run (the tests)
    make gpu-check                                        # the first line, from the repo

It runs on the GPU machine as it is (its own torch, no package index): the few pure-Python
packages that machine lacks travel as wheels in `.gpu-wheels/` (`make gpu-wheels` fills
it here) and are installed with `pip install --no-index --no-deps --target OUT/site` by
the first lines below; the C helpers are built there, or the table says Pillow was used.

Measures, on real photographs (scripts/photo_corpus.py: 500x375 with a share of 1000x750):
1. ResNet-50, bf16 autocast, channels_last, SGD, batch 256: img/s on synthetic batches
   already on the device vs the real loader (pass-through and `--max-size 384` shards,
   `--decode cpu` with N workers and `--decode gpu`), eager and `torch.compile`; data-wait
   fraction and peak GPU memory per configuration; ratio real/synthetic.
2. nvJPEG batch decode with crop/resize/flip on the device, 2 CPU cores at most: img/s and
   CPU fallbacks.
3. Correctness: a short training run on the learnable sample reaches the CPU path's
   accuracy; the evaluator counts every val sample once; a SIGKILL then `--resume auto`
   gives the uninterrupted run's losses; NCCL initialises under
   `torchrun --standalone --nproc_per_node=1`.
Prints one markdown table; writes OUT/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".gpu-wheels"
NEEDED = ("webdataset", "braceexpand", "defusedxml", "click", "yaml", "pyarrow", "tqdm")


def bootstrap(out: Path) -> dict:
    """Import what the toolkit needs, installing carried wheels first where missing; build
    the C helpers. Returns what was found (for the JSON)."""
    missing = []
    for mod in NEEDED:
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    site = out / "site"
    if missing and WHEELS.is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--target", str(site), *map(str, sorted(WHEELS.glob("*.whl")))],
                       check=True)
    sys.path[:0] = [str(site), str(REPO), str(REPO / "scripts")]
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(site), str(REPO), os.environ.get("PYTHONPATH", "")])
    still = [m for m in missing if not _importable(m)]
    if still:
        raise SystemExit(f"gpu_check: missing {still}; run `make gpu-wheels` where pip can "
                         "reach an index and carry .gpu-wheels/ along")
    built = {}
    for module in ("prep.jpeg", "train.jpeg_region", "shards.tarpack"):
        r = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True,
                           cwd=REPO)
        built[module] = r.returncode == 0
    import torch
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "installed_from_wheels": missing,
            "c_helpers_built": built}


def _importable(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


def prep(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "prep.cli", *args], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)


def make_data(out: Path, per_class: int, val_per_class: int, workers: int,
              sample_per_class: int, sample_val: int, sample_size: int) -> dict[str, Path]:
    """Photo tree -> view -> pass-through and --max-size 384 shards; the learnable sample
    -> its shards."""
    from photo_corpus import build_photo_tree

    root = out / "data"
    tree = build_photo_tree(root / "photos", per_class, val_per_class, root / "wheels",
                            large_share=0.15)
    if not (root / "view/imagenet").is_dir():
        prep("imagenet", "-q", "--src", str(tree), "--link", str(root / "view"))
    shards = {}
    for name, extra in (("pass", ()), ("384", ("--max-size", "384"))):
        shards[name] = root / f"shards-{name}"
        prep("shard", "-q", "--data", str(root / "view/imagenet"), "--out", str(shards[name]),
             "--workers", str(workers), "--splits", "train,val", *extra)
    sample = root / "sample"
    if not sample.is_dir():
        prep("sample", str(sample), "--layout", "ilsvrc2017", "--classes", "10",
             "--train-per-class", str(sample_per_class), "--val-per-class", str(sample_val),
             "--size", str(sample_size))
        prep("imagenet", "-q", "--src", str(sample), "--link", str(root / "sample-view"))
    shards["sample"] = root / "shards-sample"
    prep("shard", "-q", "--data", str(root / "sample-view/imagenet"), "--out",
         str(shards["sample"]), "--workers", str(workers), "--num-shards", "8")
    return shards


def throughput(name: str, shards: Path | None, decode: str, compile_: bool, device,
               arch: str, batch: int, size: int, workers: int, seconds: float) -> dict:
    """img/s of SGD steps on `arch` (bf16 autocast on CUDA, channels_last), fed by synthetic
    batches already on the device (`shards` None) or by the toolkit's train loader."""
    import torch

    from train.config import TrainConfig
    from train.data import SkipCounter, make_train_loader, read_split
    from train.engine import autocast
    from train.model import build_model
    from train.normalize import batch_transform

    cuda = device.type == "cuda"
    split = read_split(str(shards), "train") if shards else None
    cfg = TrainConfig(arch=arch, num_classes=split.num_classes if split else 1000,
                      batch_size=batch, image_size=size, workers=workers, channels_last=True,
                      amp="bf16" if cuda else "none", compile=compile_, shuffle_buffer=1000)
    model = build_model(cfg, device)
    net = torch.compile(model) if compile_ else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    if shards is None:
        x = torch.randn(batch, 3, size, size, device=device).contiguous(
            memory_format=torch.channels_last)
        y = torch.randint(0, cfg.num_classes, (batch,), device=device)
        batches = iter(lambda: (x, y), None)
        norm = None
    else:
        def forever():
            epoch = 0
            while True:
                yield from make_train_loader(split, cfg, 0, 1, epoch, SkipCounter(0.01),
                                             cuda and decode != "gpu", decode)
                epoch += 1

        batches = forever()
        norm = batch_transform(cfg, device, decode, size)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    images = steps = 0
    wait = 0.0
    t0 = start = None
    warm = 5 if not compile_ else 10
    while True:
        t_wait = time.perf_counter()
        xb, yb = next(batches)
        if norm is not None:
            xb, yb = norm(xb), yb.to(device, non_blocking=True)
        waited = time.perf_counter() - t_wait
        with autocast(device, cfg.amp):
            loss = loss_fn(net(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        if steps == warm:
            sync()
            t0 = start = time.perf_counter()
            continue
        if t0 is not None:
            images += len(yb)
            wait += waited
            if steps % 5 == 0:
                sync()
                if time.perf_counter() - start >= seconds:
                    break
    sync()
    elapsed = time.perf_counter() - t0
    row = {"config": name, "img_s": images / elapsed, "data_wait": wait / elapsed,
           "steps": steps - warm, "seconds": elapsed,
           "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None}
    del net, model, opt
    if cuda:
        torch.cuda.empty_cache()
    return row


def nvjpeg_rate(shards: Path, device, size: int, seconds: float) -> dict:
    """Batch decode + crop/resize/flip on the device from raw shard bytes, the process
    confined to 2 CPU cores."""
    import random

    import torch

    from shards.tarread import samples
    from train.decode import rrc_box
    from train.device_decode import DeviceDecoder, _raw, _size

    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])
    torch.set_num_threads(2)
    data = [s["jpg"] for t in sorted(shards.glob("train-*.tar")) for s in samples(str(t))]
    rng = random.Random(0)
    decoder = DeviceDecoder(device, size)
    batch = 256 if device.type == "cuda" else 16
    raws = [_raw(d) for d in data]
    boxes = [rrc_box(*_size(d), (0.08, 1.0), rng) for d in data]
    n = t0 = 0
    start = time.perf_counter()
    i = 0
    while True:
        idx = [(i + k) % len(data) for k in range(batch)]
        i += batch
        raw = ([raws[k] for k in idx], torch.tensor([boxes[k] for k in idx],
                                                     dtype=torch.float64),
               torch.zeros(batch, dtype=torch.bool), [f"m{k}" for k in idx])
        decoder(raw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if t0 == 0:
            t0 = time.perf_counter()  # after the first (warm-up) batch
            continue
        n += batch
        if time.perf_counter() - t0 >= seconds:
            break
    os.sched_setaffinity(0, range(os.cpu_count() or 1))
    return {"img_s": n / (time.perf_counter() - t0), "fallbacks": decoder.fallbacks,
            "images": n, "cores": 2, "warmup_s": t0 - start}


def train_run(shards: Path, out: Path, device: str, epochs: int, extra: list[str],
              kill_after_epoch: int | None = None) -> dict:
    """train/main.py under `torchrun --standalone --nproc_per_node=1` (NCCL on CUDA);
    optionally SIGKILLed once epoch `kill_after_epoch` is checkpointed, then resumed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(REPO / "train/main.py"), "--data", str(shards), "--output-dir", str(out),
           "--device", device, "--recipe", str(REPO / "train/recipes/cpu_demo.yaml"),
           "--set", f"epochs={epochs}", *extra]
    if kill_after_epoch is not None:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").is_file() and \
                    len((out / "metrics.jsonl").read_text().splitlines()) > kill_after_epoch:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait()
        cmd += ["--resume", "auto"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"gpu_check: training failed:\n{r.stderr[-3000:]}")
    return history(out)[-1]  # the last epoch's metrics (train loss, top-1, val samples)


def history(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def nccl_check(out: Path, device: str) -> dict:
    script = out / "nccl_check.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        f"cuda = {device == 'cuda'!r}\n"
        "dist.init_process_group('nccl' if cuda else 'gloo')\n"
        "t = torch.ones(4, device='cuda' if cuda else 'cpu') * (dist.get_rank() + 1)\n"
        "dist.all_reduce(t)\n"
        "print(dist.get_backend(), float(t.sum()))\n"
        "dist.destroy_process_group()\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=1", str(script)], capture_output=True, text=True)
    backend, total = (r.stdout.split() + ["", ""])[:2] if r.returncode == 0 else ("", "")
    return {"ok": r.returncode == 0 and total == "4.0", "backend": backend,
            "error": r.stderr[-500:] if r.returncode else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "gpu-check")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--tiny", action="store_true",
                    help="the CPU dry run: small model, images and runs (< 1 min)")
    ap.add_argument("--seconds", type=float, default=None, help="per throughput configuration")
    a = ap.parse_args()
    if a.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", a.device):
        ap.error(f"--device {a.device!r}: expected cpu, cuda or cuda:N")
    if a.out.exists() and not a.out.is_dir():
        ap.error(f"--out {a.out}: is a file; give a directory for the results")
    t_start = time.perf_counter()
    try:
        a.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        ap.error(f"--out {a.out}: cannot create it ({exc.strerror})")
    env = bootstrap(a.out)
    import torch

    if a.device and a.device.startswith("cuda") and (
            not torch.cuda.is_available()
            or int((a.device.split(":") + ["0"])[1]) >= torch.cuda.device_count()):
        ap.error(f"--device {a.device}: no such CUDA device here "
                 f"({torch.cuda.device_count()} GPU(s)); use --device cpu for the dry run")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    cores = len(os.sched_getaffinity(0))
    tiny = a.tiny
    seconds = a.seconds or (1.0 if tiny else 20.0)
    arch, batch, size = ("resnet18", 8, 64) if tiny else ("resnet50", 256, 224)
    workers = 1 if tiny else max(1, cores - 2)
    result: dict = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(),
                    "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                    "cores": cores, "tiny": tiny, "env": env, "arch": arch, "batch": batch}
    t = time.perf_counter()
    shards = make_data(a.out, 4 if tiny else 300, 2 if tiny else 20, max(1, cores),
                       16 if tiny else 60, 4 if tiny else 10, 48 if tiny else 96)
    result["data_s"] = time.perf_counter() - t
    decodes = ["cpu"] + (["gpu"] if cuda else [])
    configs = [("synthetic, eager", None, "cpu", False)]
    configs += [(f"{k} shards, --decode {d}, eager", shards[k], d, False)
                for k in ("pass", "384") for d in decodes]
    if cuda:  # torch.compile on the CPU dry run would take longer than the rest of it
        configs += [("synthetic, compile", None, "cpu", True),
                    (f"384 shards, --decode {decodes[-1]}, compile", shards["384"],
                     decodes[-1], True)]
    rows = []
    for name, sh, decode, comp in configs:
        row = throughput(name, sh, decode, comp, device, arch, batch, size, workers, seconds)
        row["decode"] = decode if sh else None
        rows.append(row)
        print(f"  {name}: {row['img_s']:,.0f} img/s", file=sys.stderr, flush=True)
    base = {True: rows[0]["img_s"]}
    for r in rows:
        synth = next((x["img_s"] for x in rows if x["config"].startswith("synthetic") and
                      x["config"].endswith("compile") == r["config"].endswith("compile")),
                     base[True])
        r["ratio_to_synthetic"] = r["img_s"] / synth
    result["throughput"] = rows
    result["nvjpeg"] = nvjpeg_rate(shards["pass"], device, size, seconds)
    t = time.perf_counter()
    dev = "cuda" if cuda else "cpu"
    sample = shards["sample"]
    epochs = 2 if tiny else 4
    extra = ["--set", f"workers={min(8, workers)}"]
    if tiny:
        extra = [a for kv in ("workers=1", "batch_size=16", "image_size=32", "val_resize=36",
                              "val_crop=32") for a in ("--set", kv)]
    full = train_run(sample, a.out / "run-full", dev, epochs, extra)
    killed = train_run(sample, a.out / "run-killed", dev, epochs, extra, kill_after_epoch=0)
    reference = full
    if cuda:  # the CPU path's accuracy on the same sample, same recipe
        reference = train_run(sample, a.out / "run-cpu", "cpu", epochs, extra)
    info = json.loads((sample / "_info.json").read_text())
    n_val = info["splits"]["validation"]["num_samples"]
    losses_full = [h["train_loss"] for h in history(a.out / "run-full")]
    losses_killed = [h["train_loss"] for h in history(a.out / "run-killed")]
    tol = 2e-2 if cuda else 1e-4  # cuDNN picks non-deterministic kernels
    result["correctness"] = {
        "top1": full["top1"], "top1_cpu_path": reference["top1"],
        "top1_killed_resumed": killed["top1"],
        "top1_ok": full["top1"] >= reference["top1"] - 0.05,
        "val_samples": full["val_samples"], "val_samples_expected": n_val,
        "counted_once": full["val_samples"] == n_val,
        "losses_uninterrupted": losses_full, "losses_killed_resumed": losses_killed,
        "resume_ok": len(losses_full) == len(losses_killed) and all(
            abs(p - q) <= tol * max(abs(p), 1e-9) for p, q in zip(losses_full, losses_killed)),
        "nccl": nccl_check(a.out, dev), "seconds": time.perf_counter() - t}
    result["total_s"] = time.perf_counter() - t_start
    (a.out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))


def table(r: dict) -> str:
    lines = [f"{r['device']} ({r['cores']} cores), torch {r['env']['torch']}, {r['date']}, "
             f"{r['arch']} batch {r['batch']}{' (tiny dry run)' if r['tiny'] else ''}", "",
             "| configuration | img/s | real/synthetic | data wait | peak GiB |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for x in r["throughput"]:
        peak = f"{x['peak_gib']:.1f}" if x["peak_gib"] is not None else "-"
        lines.append(f"| {x['config']} | {x['img_s']:,.0f} | {x['ratio_to_synthetic']:.2f} | "
                     f"{100 * x['data_wait']:.0f}% | {peak} |")
    nv = r["nvjpeg"]
    lines.append(f"| nvJPEG batch decode + crop/resize/flip, 2 cores | {nv['img_s']:,.0f} | | | "
                 f"fallbacks {nv['fallbacks']} |")
    c = r["correctness"]
    lines += ["", f"correctness: top-1 {c['top1']:.3f} (CPU path {c['top1_cpu_path']:.3f}, "
              f"{'ok' if c['top1_ok'] else 'LOW'}); val samples {c['val_samples']} of "
              f"{c['val_samples_expected']} ({'each once' if c['counted_once'] else 'WRONG'});"
              f" kill + resume {'equal losses' if c['resume_ok'] else 'DIFFERENT losses'}; "
              f"process group {c['nccl']['backend'] or 'FAILED'} "
              f"({'ok' if c['nccl']['ok'] else 'failed'})",
              f"C helpers: {r['env']['c_helpers_built']}; total {r['total_s']:.0f} s"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
