"""Writing a file so that a reader, or a crash, sees the old file or the new one, never half of one; and the
lock that processes changing the same file (workers, the command line) take in turn."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from filelock import AsyncFileLock, FileLock


def write_atomically(path: Path, parts: Iterable[bytes]) -> None:
    """A temporary file in the same folder (mkstemp: mode 0600), fsync, rename, fsync the folder."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            for part in parts:
                handle.write(part)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _lock_file(path: Path) -> Path:
    # Beside the file, hidden; it stays there between uses (removing it would race with the next taker).
    return path.with_name(f".{path.name}.lock")


def change_lock(path: Path) -> FileLock:
    """Held while a process reads, changes and writes `path`, so two at once do not lose one's change."""
    # Imported when needed: filelock costs every worker process start-up time and memory.
    from filelock import FileLock

    return FileLock(_lock_file(path), mode=0o600)


def async_change_lock(path: Path) -> AsyncFileLock:
    """change_lock() for the event loop: the wait for another process runs in a thread."""
    from filelock import AsyncFileLock

    return AsyncFileLock(_lock_file(path), mode=0o600)
