"""The embedded default upstream: each copy becomes an .eml file in the outbox folder.

Files are written atomically (temporary name, fsync, rename), so a reader never sees half a message.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from relay.core.rewrite import OutgoingCopy
from relay.files import write_atomically


class Outbox:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @property
    def label(self) -> str:
        return f"outbox folder {self.folder.resolve()}"

    async def write(self, queue_id: str, index: int, copy: OutgoingCopy) -> Path:
        path = self.folder / f"{queue_id}-{index:04d}.eml"
        await asyncio.to_thread(self._write, path, copy)
        return path

    def _write(self, path: Path, copy: OutgoingCopy) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomically(path, (copy.headers, copy.body))
