"""What the `prep` commands print: the summary of `prep imagenet`, `prep evalset`,
`prep shard` and `prep verify`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prep.imagenet import EXPECTED, PrepReport
from prep.scan import Problems

SHOW = 5  # problem files listed per kind; the full list is in meta/problems.txt


def format_report(r: PrepReport) -> str:
    rows = [("layout", r.layout), ("source", str(r.src)),
            ("classes", f"{len(r.classes)} (labels: sorted-WNID index 0..{len(r.classes) - 1})")]
    for split in ("train", "val", "test"):
        n = r.counts.get(split, 0)
        if n or split != "test":
            rows.append((split, f"{n:>9,} images  (ImageNet: {EXPECTED[split]:,})"))
    rows.append(("val labels", " + ".join(r.label_sources) +
                 (" (all agree)" if len(r.label_sources) > 1 else "")))
    ch = r.changes
    if ch.nothing_to_do:
        rows.append(("output", f"{r.link_dir}: up to date, nothing changed "
                               f"({ch.unchanged:,} paths checked)"))
    else:
        rows.append(("output", f"{r.link_dir}: {ch.created:,} created, {ch.replaced:,} replaced, "
                               f"{ch.removed:,} removed, {ch.unchanged:,} unchanged"))
    rows.append(("time", f"{r.seconds:.1f} s"))
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{width}}  {v}" for k, v in rows]
    lines += [f"  note: {n}" for n in r.notes]
    lines += problem_lines(r.problems)
    p = r.problems
    if p.empty or p.extra or p.broken_links or p.undecodable or p.missing or p.unlisted or \
            p.ignored:
        lines.append(f"  full list: {r.link_dir}/imagenet/meta/problems.txt")
    return "\n".join(lines)


def problem_lines(p: Problems) -> list[str]:
    """A warning line per kind of problem found in a source, naming the first files."""
    lines = []
    for kind, items in (("empty files", p.empty), ("not images (by name)", p.extra),
                        ("missing files (annotated or listed, not on disk)", p.missing),
                        ("train files not in ImageSets/CLS-LOC/train_cls.txt", p.unlisted),
                        ("broken symlinks", p.broken_links), ("undecodable", p.undecodable),
                        ("ignored (macOS / Windows metadata, not images)", p.ignored),
                        *((f"{k} (readers must convert)", v) for k, v in p.notes.items())):
        if items:
            shown = ", ".join(items[:SHOW]) + (" ..." if len(items) > SHOW else "")
            lines.append(f"  warning: {len(items):,} {kind}: {shown}")
    return lines


def format_shard(r: Any, out: Path) -> str:
    """The summary `prep shard` prints (r: shards.build.ShardReport)."""
    n = sum(x.num_samples for x in r.written)
    mb = sum(x.filesize for x in r.written) / 1e6
    rate = f", {n / r.seconds:,.0f} img/s, {mb / r.seconds:,.1f} MB/s" if r.written else ""
    lines = [f"{out}: wrote {len(r.written)} shards ({n:,} samples, {mb:,.1f} MB) in "
             f"{r.seconds:.1f} s{rate}; kept {r.kept} finished earlier"]
    lines += [f"  note: {note}" for note in r.notes]
    if r.problems:  # --src: what the listing of the release found
        lines += problem_lines(r.problems)
    if r.trusted:
        lines.append(f"  strict check: {r.trusted:,} sources passed it in an earlier run and "
                     f"are unchanged since ({r.record}); the rest were checked")
    if r.pending:
        lines.append(f"  {r.pending} shards belong to other --shard-range parts; the last "
                     "part to finish (or `prep shard --finalize`) writes the manifest")
    if r.info:
        for split, s in r.info["splits"].items():
            lens = s["shard_lengths"]
            lines.append(f"  {split:<10} {s['num_samples']:>9,} samples in {len(lens):>5} "
                         f"shards ({min(lens)}..{max(lens)} per shard)")
        prep = r.info["prep"]
        if prep["repairs"]:
            lines.append("  repaired: " + ", ".join(f"{k} {v}"
                                                    for k, v in prep["repairs"].items()))
        if prep["skipped"]:
            lines.append(f"  skipped {len(prep['skipped'])} undecodable: "
                         + "; ".join(prep["skipped"][:3]))
        lines.append(f"  manifest: {out}/_info.json, index.parquet, SHA256SUMS, "
                     "<split>.shardindex.json, <shard>.idx (DALI)")
    return "\n".join(lines)


def format_verify(r: Any, out: Path, deep: bool, show: int = 50) -> str:
    """What `prep verify` prints (r: shards.verify.VerifyReport)."""
    lines = [f"  problem: {p}" for p in r.problems[:show]]
    if len(r.problems) > show:
        lines.append(f"  ... and {len(r.problems) - show} more")
    verdict = "OK" if r.ok else f"{len(r.problems)} problem(s)"
    lines.append(f"{out}: {r.shards} shards, {r.samples:,} samples"
                 f"{', images decoded' if deep else ''}: {verdict}")
    return "\n".join(lines)


def format_evalset(r: Any) -> str:
    """What `prep evalset` prints (r: prep.evalset.EvalsetReport)."""
    what = f"{r.kind} ({r.variant})" if r.variant else r.kind
    ch = r.changes
    done = "up to date, nothing changed" if ch.nothing_to_do else \
        f"{ch.created:,} created, {ch.replaced:,} replaced, {ch.removed:,} removed"
    lines = [f"  set      {what}", f"  source   {r.src}",
             f"  classes  {len(r.classes_present)} (labels: 1000-class sorted-WNID index)",
             f"  images   {r.images:,}", f"  output   {r.view}: {done}",
             f"  time     {r.seconds:.1f} s"]
    lines += [f"  note: {note}" for note in r.notes]
    if r.problems.ignored:
        lines.append(f"  ignored {len(r.problems.ignored)} macOS / Windows metadata file(s)")
    if r.problems.extra:
        lines.append(f"  warning: {len(r.problems.extra)} non-image file(s): "
                     + ", ".join(r.problems.extra[:5]))
    return "\n".join(lines)
