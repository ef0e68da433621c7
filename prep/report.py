"""The summary table `prep imagenet` prints."""

from __future__ import annotations

from prep.imagenet import EXPECTED, PrepReport

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
    p = r.problems
    for kind, items in (("empty files", p.empty), ("not images (by name)", p.extra),
                        ("missing files (annotated or listed, not on disk)", p.missing),
                        ("train files not in ImageSets/CLS-LOC/train_cls.txt", p.unlisted),
                        ("broken symlinks", p.broken_links), ("undecodable", p.undecodable),
                        ("ignored (macOS / Windows metadata, not images)", p.ignored),
                        *((f"{k} (readers must convert)", v) for k, v in p.notes.items())):
        if items:
            shown = ", ".join(items[:SHOW]) + (" ..." if len(items) > SHOW else "")
            lines.append(f"  warning: {len(items):,} {kind}: {shown}")
    if p.empty or p.extra or p.broken_links or p.undecodable or p.missing or p.unlisted or \
            p.ignored:
        lines.append(f"  full list: {r.link_dir}/imagenet/meta/problems.txt")
    return "\n".join(lines)
