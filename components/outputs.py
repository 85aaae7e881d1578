"""Atomic stage outputs: build in a temporary sibling, then move into place.

A stage killed part-way leaves only a hidden ``.<name>.tmp-*`` folder, never a
half-written output that DVC (or the next stage) would accept.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `final` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    if final.exists() or final.is_symlink():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def require_outputs(root: str | Path, relative: Iterable[str]) -> None:
    """Raise if any promised output is missing (the executor's last check)."""
    root = Path(root)
    missing = [name for name in relative if not (root / name).exists()]
    if missing:
        raise RuntimeError(f"stage did not produce its declared outputs under {root}: {missing}")
