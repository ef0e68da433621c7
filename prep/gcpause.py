"""Python's cyclic garbage collector kept off the millions of small, long-lived containers
of a plan (ImageNet: 1.28 M samples, each a tuple).

The collector runs every 700 new container objects and, as the heap grows, walks ever more
of them, although none of these lists, tuples and dicts form cycles. Measured here on the
full-scale plan of `prep shard` (1.28 M train samples): building it took 3.6 s with the
collector and 2.4 s without; pickling 100 of its 1,088 shard plans for the workers, once it
was built, 2.9 s (every collection walked the whole plan) and 0.08 s with the plan frozen.
So the collector is paused while a plan is built, and what was built is then frozen
(`gc.freeze`: left out of every later collection; freed as usual when no longer used)
until the command that planned it ends (`unfrozen_after`: a long-lived process, a notebook
or the tests, then collects as before).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    """No collection inside the block; afterwards, everything alive is frozen (even when
    the block raised) and collection resumes as it was."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was:
            gc.enable()


@contextmanager
def unfrozen_after() -> Iterator[None]:
    """What gc_paused froze inside the block (or decorated function) is unfrozen after it."""
    try:
        yield
    finally:
        gc.unfreeze()
