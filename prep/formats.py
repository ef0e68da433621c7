"""The on-disk formats prep writes, numbered, so that an output says which one it is and a
reader refuses one newer than it knows instead of misreading it.

- VIEW: the dataset view `prep imagenet` / `prep evalset` make (`DIR/<name>/meta/*.txt`,
  `classes.csv`, `prep.json`, the links), read by `prep shard`.
- SHARDS: a `prep shard` output (`_info.json` and its "prep" section, `index.parquet`'s
  columns, `SHA256SUMS`, the wids and DALI indexes), read by `prep verify`, the trainer and
  the loaders.

Raise a number when a reader of the previous format would misread the new one. Outputs
written before the numbers existed carry none; they are read as before.
"""

from __future__ import annotations

from prep import __version__
from prep.errors import PrepError

VIEW = 1
SHARDS = 1


def stamp(fmt: int) -> dict:
    """The provenance fields every output starts with: the tool and its format number."""
    return {"tool": f"prep {__version__}", "format": fmt}


def refuse_newer(doc: object, known: int, where: str, remedy: str) -> None:
    """PrepError when `doc` (a provenance dict) names a format above `known`."""
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > known:
        raise PrepError(f"{where}: written by a newer prep ({doc.get('tool', '?')}, format "
                        f"{fmt}; this prep {__version__} reads format {known} and older): "
                        f"update prep, or {remedy}")
