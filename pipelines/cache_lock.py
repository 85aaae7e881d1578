"""A lock on a stage's cache folder, so a garbage collection never deletes what a running stage uses.

The stages that read and write a cache (download's `.cache/download`, extract's `.cache/extract`) hold its
lock shared for their whole run, their Beam workers' writes included; `tools.cache_gc` holds it
exclusively, and refuses to start while a stage holds it. DVC's own repository lock cannot do this: DVC
releases it while a stage's command runs. An advisory `flock` on `<cache>/.lock`, released by the kernel
when the process ends, however it ends; a cache in a bucket (`gs://...`) has no lock here (garbage
collection refuses such a cache anyway).
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from typing import Iterator

LOCK_FILE = ".lock"


class CacheBusy(RuntimeError):
    """The cache is in use by another process."""


@contextmanager
def held(root: str | os.PathLike | None, exclusive: bool = False) -> Iterator[bool]:
    """Hold `root`'s lock: shared (a stage: waits while a garbage collection runs), or exclusive without
    waiting (a garbage collection: `CacheBusy` if a stage holds it). Yields whether the lock is held: an
    exclusive lock on a folder that does not exist yet is not (no folder is made for it), and the caller must
    then leave that folder alone, since a stage that starts meanwhile creates it and holds its own lock."""
    if root is None or "://" in str(root) or (exclusive and not os.path.isdir(root)):
        yield False  # no cache here yet: nothing to collect, and no folder made for it
        return
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, LOCK_FILE), "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
        except BlockingIOError:
            raise CacheBusy(
                f"the cache {root} is in use by a running stage (its lock {LOCK_FILE} is held): run the garbage "
                "collection when no stage runs, e.g. after `dvc repro` or `python -m tools.retrain` has finished"
            ) from None
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
