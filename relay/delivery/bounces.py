"""Where a delivery report goes when no mail can carry it: a file in outbox/failed/, for a person to read."""

from __future__ import annotations

import os
from pathlib import Path

from relay.files import write_atomically


def write_failed(folder: Path, name: str, parts: tuple[bytes, ...]) -> Path:
    """Keep an undeliverable notification as a file, for a person to read, when mail can't carry it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{os.path.basename(name)}.eml"
    write_atomically(path, parts)
    return path
