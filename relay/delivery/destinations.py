"""Where copies go: the outbox folder or an upstream pool, and the set of them a config names."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from relay.core.rewrite import OutgoingCopy
from relay.delivery.outbox import Outbox
from relay.upstream.errors import upstream_failure
from relay.upstream.pool import SendOutcome, UpstreamPool


class Destination(Protocol):
    @property
    def label(self) -> str: ...

    async def send_copy(
        self, queue_id: str, index: int, mail_from: str, copy: OutgoingCopy, smtputf8: bool
    ) -> SendOutcome: ...

    async def close(self) -> None: ...


class OutboxDestination:
    def __init__(self, folder: Path) -> None:
        self._outbox = Outbox(folder)
        self.written: list[Path] = []

    @property
    def label(self) -> str:
        return self._outbox.label

    async def send_copy(
        self, queue_id: str, index: int, mail_from: str, copy: OutgoingCopy, smtputf8: bool
    ) -> SendOutcome:
        await self._outbox.write(queue_id, index, copy)
        return SendOutcome(accepted=list(copy.recipients))

    async def close(self) -> None:
        return None


class UpstreamDestination:
    """An upstream pool; a copy with more recipients than the provider takes goes as several transactions."""

    def __init__(self, pool: UpstreamPool, max_recipients_per_message: int) -> None:
        self._pool = pool
        self._max_recipients = max_recipients_per_message

    @property
    def label(self) -> str:
        return f"upstream {self._pool.label}"

    async def send_copy(
        self, queue_id: str, index: int, mail_from: str, copy: OutgoingCopy, smtputf8: bool
    ) -> SendOutcome:
        if len(copy.recipients) <= self._max_recipients:
            return await self._pool.send(mail_from, copy, smtputf8)
        outcome = SendOutcome()
        for start in range(0, len(copy.recipients), self._max_recipients):
            chunk = copy.recipients[start : start + self._max_recipients]
            try:
                part = await self._pool.send(mail_from, dataclasses.replace(copy, recipients=chunk), smtputf8)
            except Exception as exc:
                if start == 0:
                    raise
                # Earlier transactions went through: only this one's recipients are left to retry.
                outcome.refused.update(dict.fromkeys(chunk, upstream_failure(exc, self.label).reply))
                continue
            outcome.accepted.extend(part.accepted)
            outcome.refused.update(part.refused)
        return outcome

    async def close(self) -> None:
        await self._pool.close()


_background: set[asyncio.Task[None]] = set()


def _close_later(destination: Destination, wait_for: Sequence[asyncio.Task[None]] = ()) -> None:
    """Close a replaced destination once the sends still using it are over."""

    async def close() -> None:
        if wait_for:
            await asyncio.wait(wait_for)
        await destination.close()

    task = asyncio.get_running_loop().create_task(close())
    _background.add(task)
    task.add_done_callback(_background.discard)


class Destinations:
    """The default destination and the named ones routes pick; one a reload removed falls back to the default."""

    def __init__(self, default: Destination, named: Mapping[str, Destination] | None = None) -> None:
        self.default = default
        self._named = dict(named or {})

    def get(self, upstream: str | None) -> Destination:
        if upstream is None:
            return self.default
        return self._named.get(upstream, self.default)

    def replace(
        self,
        default: Destination,
        named: Mapping[str, Destination] | None,
        wait_for: Sequence[asyncio.Task[None]] = (),
    ) -> None:
        """Take new destinations; the old ones close once the sends in wait_for are over."""
        old = [self.default, *self._named.values()]
        self.default, self._named = default, dict(named or {})
        for replaced in old:
            _close_later(replaced, wait_for)

    async def close(self) -> None:
        await self.default.close()
        for destination in self._named.values():
            await destination.close()
