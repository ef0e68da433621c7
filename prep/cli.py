"""The `prep` command line: a thin shell over the library functions."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import click

from prep import __version__
from prep.errors import PrepError, exit_on_error, refuse_overwrite, refuse_url, run_program
from shards.settings import ShardSettings

SHARD = ShardSettings()  # prep shard's defaults, declared once there

# numpy (the shard plan's permutation, pyarrow) starts one OpenBLAS thread per core, and on
# start-up they cost ~0.15 s of CPU that the shard writers need; `prep` does no linear algebra
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


class LocalPath(click.Path):
    """click.Path that refuses URLs (prep.errors.refuse_url) with a usage error."""

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> object:
        try:
            refuse_url(value, param.opts[0] if param else "path")
        except PrepError as exc:
            self.fail(str(exc), param, ctx)
        return super().convert(value, param, ctx)


class OutPath(LocalPath):
    """A local directory, or an object-storage prefix `s3://bucket/prefix` (kept as str)."""

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> object:
        from shards.store import is_store_url, parse_url

        if isinstance(value, str) and is_store_url(value):
            try:
                return str(parse_url(value))
            except PrepError as exc:
                self.fail(str(exc), param, ctx)
        return super().convert(value, param, ctx)


class ToolkitGroup(click.Group):
    """Every command's PrepError (and Ctrl-C) goes through prep.errors.exit_on_error."""

    def invoke(self, ctx: click.Context) -> object:
        return exit_on_error(super().invoke)(ctx)


def workers_option(what: str) -> Callable:
    """--workers, the same type and check in every command."""
    return click.option("--workers", type=click.IntRange(1), default=None,
                        help=f"Processes for {what}.")


quiet_option = click.option("--quiet", "-q", is_flag=True,
                            help="No progress bars (plain lines when output is a file).")


@click.group(cls=ToolkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prep")
def main() -> None:
    """Prepare ImageNet (ILSVRC2012 / ILSVRC2017 CLS-LOC): link, index, shard, export."""


@main.command()
@click.argument("out", type=LocalPath(path_type=Path))
@click.option("--layout", type=click.Choice(["ilsvrc2017", "kaggle", "ilsvrc2012",
                                             "ilsvrc2012-tar", "imagefolder", "blurred",
                                             "blurred-tar", "hf-tar", "hf-parquet",
                                             "timm-wds", "imagenet-v2", "imagenet-a",
                                             "imagenet-r", "imagenet-sketch"]),
              default="ilsvrc2017", show_default=True,
              help="On-disk layout to imitate (the imagenet-* ones: evaluation sets, "
                   "--val-per-class images per class).")
@click.option("--classes", default=10, show_default=True, help="Number of classes (1..1000).")
@click.option("--train-per-class", default=20, show_default=True, help="Train images per class.")
@click.option("--val-per-class", default=5, show_default=True,
              help="Val images per class (1000 classes x 50 uses the real val labels).")
@click.option("--test-images", default=0, show_default=True, help="Unlabelled test images.")
@click.option("--size", default=64, show_default=True, help="Longer image side in pixels.")
@click.option("--seed", default=0, show_default=True, help="Seed for classes, names, pixels.")
@click.option("--empty-files", is_flag=True, help="Zero-byte images (fast, for scale tests).")
@click.option("--bad-files", is_flag=True,
              help="Plant a CMYK JPEG, a PNG named .JPEG, a grayscale and a truncated JPEG.")
def sample(out: Path, layout: str, **opts) -> None:
    """Write a synthetic, learnable ILSVRC tree to OUT (for demos and tests)."""
    from prep.sample import SampleSpec, write_sample

    plan = write_sample(out, layout, SampleSpec(**opts))
    n_train = sum(map(len, plan.train.values()))
    if layout.startswith("imagenet-"):
        click.echo(f"wrote {layout} sample to {out}: {len(plan.wnids)} classes, "
                   f"{len(plan.wnids) * plan.spec.val_per_class} images")
        return
    click.echo(f"wrote {layout} sample to {out}: {len(plan.wnids)} classes, {n_train} train, "
               f"{len(plan.val)} val, {len(plan.test)} test images")
    for name, kind in sorted(plan.bad.items()):
        click.echo(f"  planted {kind}: {name}.JPEG")


@main.command()
@click.option("--src", required=True, type=LocalPath(path_type=Path, readable=False),
              help="Root of the ImageNet copy (never written to). Relative paths are resolved.")
@click.option("--link", "link_dir", required=True, type=LocalPath(path_type=Path),
              help="Directory for the dataset view, e.g. data/ (made if missing).")
@click.option("--extract-to", type=LocalPath(path_type=Path), default=None,
              help="Where to unpack the original ILSVRC2012 .tar archives (outside --src).")
@click.option("--check", type=click.Choice(["fast", "sizes", "full"]), default="fast",
              show_default=True,
              help="fast: names, counts, val sizes (about the cost of `find`); sizes: also stat "
                   "every train file for zero-byte files; full: also decode every image.")
@click.option("--force", is_flag=True,
              help="Replace links and meta files prep made earlier that now differ.")
@workers_option("extraction, scanning and checks (default: CPU count, at most 8)")
@quiet_option
def imagenet(src: Path, link_dir: Path, extract_to: Path | None, check: str, force: bool,
             workers: int | None, quiet: bool) -> None:
    """Detect and validate an ImageNet copy, rebuild val class folders and write meta/ files.

    Makes, under LINK: LINK/<basename of SRC> -> SRC, LINK/imagenet/train -> the train class
    folders, LINK/imagenet/val/<wnid>/<file> links, and LINK/imagenet/meta/ (train.txt,
    val.txt, synsets.txt, synset_words.txt, classes.csv, prep.json).
    """
    from prep.imagenet import prepare_imagenet
    from prep.report import format_report

    report = prepare_imagenet(src, link_dir, extract_to=extract_to, check=check,
                              force=force, workers=workers, progress=not quiet)
    click.echo(format_report(report))


@main.command()
@click.option("--src", required=True, type=LocalPath(path_type=Path, readable=False),
              help="The evaluation set's folder (never written to).")
@click.option("--link", "link_dir", required=True, type=LocalPath(path_type=Path),
              help="Directory for the view, e.g. data/ (made if missing).")
@click.option("--name", default=None,
              help="View name under --link (default: imagenet-v2-<variant>, imagenet-a, "
                   "imagenet-r, imagenet-sketch).")
@click.option("--kind", type=click.Choice(["imagenet-v2", "imagenet-a", "imagenet-r",
                                           "imagenet-sketch"]), default=None,
              help="Which set it is (default: detected from folder names and classes).")
@click.option("--force", is_flag=True, help="Replace links and meta files prep made earlier.")
def evalset(src: Path, link_dir: Path, name: str | None, kind: str | None,
            force: bool) -> None:
    """Link and index an evaluation set (ImageNetV2, ImageNet-A, -R, -Sketch).

    Writes LINK/NAME/val/<wnid>/<file> links and LINK/NAME/meta/ (val.txt with labels in
    the 1000-class sorted-WNID space, classes.csv, evalset.json); then
    `prep shard --data LINK/NAME --out S` and `train/main.py --evaluate --data S`.
    """
    from prep.evalset import prepare_evalset
    from prep.report import format_evalset

    r = prepare_evalset(src, link_dir, name=name, kind=kind, force=force)
    click.echo(format_evalset(r))


@main.command("export-preds")
@click.argument("result", type=LocalPath(path_type=Path, dir_okay=False))
@click.argument("out", type=LocalPath(path_type=Path, dir_okay=False), required=False)
@click.option("--format", "fmt", default="ilsvrc", show_default=True,
              type=click.Choice(["ilsvrc", "kaggle", "mmcls", "txt", "csv", "parquet"]),
              help="ilsvrc: official submission (top-5 ILSVRC2012_IDs, file-name order); "
                   "kaggle: ImageId,PredictionString; mmcls: path label score; txt: top-k "
                   "with names; csv/parquet: one row per sample.")
@click.option("--topk", type=click.IntRange(1), default=5, show_default=True,
              help="Predictions per sample (ilsvrc always 5).")
@click.option("--classes", "classes_csv", type=LocalPath(path_type=Path, dir_okay=False),
              default=None, help="meta/classes.csv from prep imagenet (default: the shipped "
                                 "1000-class ILSVRC table when the pickle has 1000 classes).")
@click.option("--summary", "show_summary", is_flag=True,
              help="Print accuracy and the most confused class pairs.")
@click.option("--plot", "plot_path", type=LocalPath(path_type=Path, dir_okay=False),
              default=None, help="Write a PNG of per-class accuracy and confused pairs.")
def export_preds(result: Path, out: Path | None, fmt: str, topk: int,
                 classes_csv: Path | None, show_summary: bool, plot_path: Path | None) -> None:
    """Turn a predictions pickle (this toolkit, mmpretrain 1.x, mmcls 0.x) into OUT.

    The pickle is loaded with a restricted unpickler: one that tries to run code is refused.
    """
    from prep.export import load_classes, plot, render, summary, write_export
    from prep.predictions import read_predictions

    for path, flag in ((out, "OUT"), (plot_path, "--plot")):
        if path is not None:
            refuse_overwrite(path, {"predictions pickle": result, "class table": classes_csv},
                             flag)
    preds = read_predictions(result)
    classes = load_classes(classes_csv, preds.scores.shape[1])
    if out is not None:
        write_export(render(preds, fmt, topk, classes), out)
        click.echo(f"wrote {out}: {len(preds.paths):,} samples, format {fmt}")
    elif not (show_summary or plot_path):
        raise PrepError("give OUT, --summary or --plot")
    if show_summary:
        click.echo(summary(preds, classes))
    if plot_path:
        click.echo(f"wrote {plot(preds, classes, plot_path)}")


def _slurm_part(env: dict[str, str]) -> str | None:
    """`i/N` of this task of a SLURM job array (`--array=0-7`, stepped `--array=0-7:4`);
    None outside an array."""
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
             "SLURM_ARRAY_TASK_STEP")
    raw = {n: env.get(n, "1" if n.endswith("STEP") else "0" if n.endswith("MIN") else None)
           for n in names}
    if raw["SLURM_ARRAY_TASK_COUNT"] is None:
        raise PrepError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not: give "
                        "--shard-range i/N explicitly")
    bad = [f"{n}={v!r}" for n, v in raw.items() if not (v.isascii() and v.isdigit())]
    if bad:
        raise PrepError(f"{', '.join(bad)}: not a whole number; give --shard-range i/N "
                        "explicitly")
    task, count, first, step = (int(raw[n]) for n in names)
    part, off = divmod(task - first, max(step, 1))
    if off or not 0 <= part < count:
        raise PrepError(f"SLURM array task {task} (min {first}, step {step}, count {count}) "
                        "is not one of evenly spaced tasks: give --shard-range i/N explicitly")
    return f"{part}/{count}"


def _shard_range(value: str | None) -> tuple[int, int]:
    """`i/N` from --shard-range, else a SLURM job array's task, else the whole job."""
    if value is None:
        value = _slurm_part(dict(os.environ))
    if value is None:
        return 0, 1
    i, _, n = value.partition("/")
    if not (i.isascii() and i.isdigit() and n.isascii() and n.isdigit()
            and 0 <= int(i) < int(n)):
        raise click.BadParameter(f"expected i/N with 0 <= i < N, got {value!r}",
                                 param_hint="--shard-range")
    return int(i), int(n)


@main.command()
@click.option("--data", type=LocalPath(path_type=Path, file_okay=False),
              help="The imagenet/ dir `prep imagenet` made (holds train/, val/, meta/).")
@click.option("--src", type=LocalPath(path_type=Path, file_okay=False),
              help="Instead of --data: a release in archives, read in place (the "
                   "ILSVRC2012 tars; the face-blurred or Hugging Face tar.gz, or the Parquet "
                   "files: read twice), checked as `prep imagenet` checks it; nothing is "
                   "extracted.")
@click.option("--out", required=True, type=OutPath(path_type=Path, file_okay=False),
              help="Directory for the shards and manifest (made if missing), or an object "
                   "store prefix s3://BUCKET/PREFIX (AWS_* settings, ~/.aws).")
@click.option("--samples-per-shard", type=click.IntRange(1), default=None,
              help="Samples per shard (default: ~1250, shard count rounded to a power of 2).")
@click.option("--num-shards", type=click.IntRange(1), default=None,
              help="Shards per split (overrides --samples-per-shard).")
@workers_option("writing shards (default: CPU count)")
@click.option("--seed", default=SHARD.seed, show_default=True,
              help="Seed of the train permutation.")
@click.option("--max-size", type=click.IntRange(16), default=None,
              help="Pre-resize: longer side at most PX (FFCV-style; default: keep sizes).")
@click.option("--quality", type=click.IntRange(1, 100), default=SHARD.quality,
              show_default=True, help="JPEG quality of resized images.")
@click.option("--splits", default=",".join(SHARD.splits), show_default=True,
              help="Comma-separated splits (test only when meta/test.txt exists).")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default=SHARD.on_error,
              show_default=True, help="Undecodable image: stop, or leave it out and list it.")
@click.option("--check", type=click.Choice(["full", "header"]), default=SHARD.check,
              show_default=True,
              help="full: entropy-decode every JPEG (a file cut short is undecodable even when "
                   "it ends in EOI; ~0.5 ms per 50 KB image, spread over --workers); header: "
                   "trust a complete header and EOI (faster, for sources already checked).")
@click.option("--shard-range", default=None,
              help="i/N: write only part i of N (several machines); default from "
                   "SLURM_ARRAY_TASK_ID/COUNT when set.")
@click.option("--finalize", is_flag=True,
              help="Only merge the manifests of a --shard-range run (all parts finished).")
@click.option("--force", is_flag=True,
              help="Replace shards in --out made from other input or options.")
@quiet_option
def shard(data: Path | None, src: Path | None, out: Path | str, samples_per_shard: int | None,
          num_shards: int | None,
          workers: int | None, seed: int, max_size: int | None, quality: int, splits: str,
          on_error: str, check: str, shard_range: str | None, finalize: bool, force: bool,
          quiet: bool) -> None:
    """Write reproducible WebDataset tar shards and their manifest (resumable)."""
    from prep.report import format_shard
    from shards.build import shard_dataset, shard_release

    if (data is None) == (src is None):
        raise click.UsageError("give --data (a view `prep imagenet` made) or --src (a "
                               "release in archives), not both")
    settings = ShardSettings(
        splits=tuple(s.strip() for s in splits.split(",") if s.strip()), num_shards=num_shards,
        samples_per_shard=samples_per_shard, seed=seed, max_size=max_size, quality=quality,
        on_error=on_error, check=check)
    workers = workers or len(os.sched_getaffinity(0))
    if isinstance(out, str):  # s3://bucket/prefix
        from shards.store_build import shard_to_store

        if shard_range or finalize:
            raise PrepError("--shard-range / --finalize: not supported with an s3:// --out "
                            "yet; write the parts to local directories, or shard in one run")
        r = shard_to_store(data or src, out, settings, workers=workers, force=force,
                           progress=not quiet, src=data is None)
    else:
        run = shard_dataset if data is not None else shard_release
        r = run(data if data is not None else src, out, settings, workers=workers,
                shard_range=_shard_range(shard_range), force=force,
                finalize_only=finalize, progress=not quiet)
    click.echo(format_shard(r, out))


@main.command()
@click.argument("out", type=OutPath(path_type=Path, file_okay=False))
@click.option("--deep", is_flag=True, help="Also decode every image.")
@workers_option("checking shards (default: CPU count)")
@quiet_option
def verify(out: Path | str, deep: bool, workers: int | None, quiet: bool) -> None:
    """Check shards against the manifest: counts, checksums, members, keys, labels."""
    from prep.report import format_verify
    from shards.verify import verify_shards

    r = verify_shards(out, deep, workers or len(os.sched_getaffinity(0)), not quiet)
    click.echo(format_verify(r, out, deep))
    if not r.ok:
        raise SystemExit(1)


def run() -> None:
    """The `prep` program (console script and `python -m prep.cli`)."""
    run_program(main)


if __name__ == "__main__":
    run()
