"""The `prep` command line: a thin shell over the library functions."""

from __future__ import annotations

from pathlib import Path

import click

from prep import __version__
from prep.errors import PrepError


def _fail(exc: PrepError) -> None:
    raise click.ClickException(str(exc)) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prep")
def main() -> None:
    """Prepare ImageNet (ILSVRC2012 / ILSVRC2017 CLS-LOC): link, index, shard, export."""


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--layout", type=click.Choice(["ilsvrc2017", "kaggle", "ilsvrc2012",
                                             "ilsvrc2012-tar", "imagefolder"]),
              default="ilsvrc2017", show_default=True, help="On-disk layout to imitate.")
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

    try:
        plan = write_sample(out, layout, SampleSpec(**opts))
    except PrepError as exc:
        _fail(exc)
    n_train = sum(map(len, plan.train.values()))
    click.echo(f"wrote {layout} sample to {out}: {len(plan.wnids)} classes, {n_train} train, "
               f"{len(plan.val)} val, {len(plan.test)} test images")
    for name, kind in sorted(plan.bad.items()):
        click.echo(f"  planted {kind}: {name}.JPEG")


@main.command()
@click.option("--src", required=True, type=click.Path(path_type=Path, readable=False),
              help="Root of the ImageNet copy (never written to). Relative paths are resolved.")
@click.option("--link", "link_dir", required=True, type=click.Path(path_type=Path),
              help="Directory for the dataset view, e.g. data/ (made if missing).")
@click.option("--extract-to", type=click.Path(path_type=Path), default=None,
              help="Where to unpack the original ILSVRC2012 .tar archives (outside --src).")
@click.option("--check", type=click.Choice(["fast", "sizes", "full"]), default="fast",
              show_default=True,
              help="fast: names, counts, val sizes (about the cost of `find`); sizes: also stat "
                   "every train file for zero-byte files; full: also decode every image.")
@click.option("--force", is_flag=True,
              help="Replace links and meta files prep made earlier that now differ.")
@click.option("--workers", type=int, default=None,
              help="Processes for scanning and checks (default: CPU count, at most 8).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def imagenet(src: Path, link_dir: Path, extract_to: Path | None, check: str, force: bool,
             workers: int | None, quiet: bool) -> None:
    """Detect and validate an ImageNet copy, rebuild val class folders and write meta/ files.

    Makes, under LINK: LINK/<basename of SRC> -> SRC, LINK/imagenet/train -> the train class
    folders, LINK/imagenet/val/<wnid>/<file> links, and LINK/imagenet/meta/ (train.txt,
    val.txt, synsets.txt, synset_words.txt, classes.csv, prep.json).
    """
    from prep.imagenet import prepare_imagenet
    from prep.report import format_report

    try:
        report = prepare_imagenet(src, link_dir, extract_to=extract_to, check=check,
                                  force=force, workers=workers, progress=not quiet)
    except PrepError as exc:
        _fail(exc)
    click.echo(format_report(report))


if __name__ == "__main__":
    main()
