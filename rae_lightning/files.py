"""Files that are whole or absent: written beside their target and renamed over it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit flush it to disk
    and rename it over ``path``.

    A process stopped at any moment leaves either the previous file or the new one under
    ``path``, never a truncated one, and no temporary file behind unless it was killed
    outright. The rename is atomic because both names lie in the same folder.

    Args:
        path: the file to write.
        mode: a writing mode of :func:`open` (``"wb"``, ``"w"``).
        **open_kwargs: passed to :func:`open` (``newline=""`` for CSV).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with open(partial, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    _sync_folder(target.parent)


def _sync_folder(folder: Path) -> None:
    # the rename itself reaches the disk only when the folder's entry is flushed
    if not hasattr(os, "O_DIRECTORY"):
        return
    handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
