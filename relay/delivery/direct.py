"""delivery.mode direct: every copy is sent while the client waits; DATA gets 250 only once all are taken."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from relay.config.models import Config, RouteConfig
from relay.core.activity import MessageRecord
from relay.core.replies import Reply
from relay.core.rewrite import OutgoingCopy
from relay.core.routing import route_for
from relay.delivery.destinations import Destination, Destinations
from relay.delivery.report import DeliveryReport
from relay.upstream.errors import upstream_failure


class DirectDelivery:
    """Sends every copy while the client waits, at most max_connections at a time."""

    def __init__(
        self,
        default: Destination,
        concurrency: int,
        named: Mapping[str, Destination] | None = None,
        routes: Sequence[RouteConfig] = (),
    ) -> None:
        self._destinations = Destinations(default, named)
        self._concurrency = concurrency
        self._routes = tuple(routes)

    def reconfigure(
        self, config: Config, destination: Destination, named: Mapping[str, Destination] | None = None
    ) -> None:
        self._destinations.replace(destination, named)
        self._routes = config.routes
        self._concurrency = config.upstream.max_connections

    def destination_for(self, mail_from: str) -> Destination:
        return self._destinations.get(route_for(mail_from, self._routes))

    async def deliver(
        self,
        queue_id: str,
        mail_from: str,
        copies: Sequence[OutgoingCopy],
        smtputf8: bool,
        record: MessageRecord | None = None,
    ) -> DeliveryReport:
        """Nothing is stored in direct mode, so no history is kept (record is not used)."""
        destination = self.destination_for(mail_from)
        report = DeliveryReport(destination.label, len(copies))
        pending = list(enumerate(copies))
        pending.reverse()
        unreachable: Reply | None = None

        async def worker() -> None:
            nonlocal unreachable
            while pending:
                index, copy = pending.pop()
                if unreachable is not None:
                    report.failures.update(dict.fromkeys(copy.recipients, unreachable))
                    continue
                try:
                    outcome = await destination.send_copy(queue_id, index, mail_from, copy, smtputf8)
                except Exception as exc:
                    reply = upstream_failure(exc, destination.label).reply
                    # The destination is down or refuses us: don't try it once per copy.
                    unreachable = reply
                    report.failures.update(dict.fromkeys(copy.recipients, reply))
                    continue
                report.delivered_recipients += len(outcome.accepted)
                report.failures.update(outcome.refused)

        workers = min(self._concurrency, len(copies))
        await asyncio.gather(*(worker() for _ in range(workers)))
        return report

    async def stop(self, grace: float) -> None:
        await self._destinations.close()
