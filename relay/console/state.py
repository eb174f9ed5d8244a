"""What the console's handlers share: its state, and the reads and checks both the pages and the API make."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate

import jinja2
from aiohttp import web

from relay.config.models import Config
from relay.console.access import Access
from relay.console.metrics import ConsoleMetrics
from relay.console.words import DECISIONS
from relay.core.preview import Preview, preview_message
from relay.delivery.holding import Holding
from relay.spool.interface import MessageHistory, Spool
from relay.upstream.pool import ProbeStep

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


@dataclass
class ConsoleState:
    """What the handlers share; config is replaced when the relay reloads its own (SIGHUP)."""

    config: Config
    spool: Spool | None  # None in direct delivery: nothing is stored
    access: Access
    metrics: ConsoleMetrics
    accepting: Callable[[], bool]  # whether the relay takes mail right now
    hostname: str
    holding: Holding | None  # None in direct delivery
    check_upstreams: UpstreamCheck | None  # what `privacy-relay check` does, given by the relay's wiring


# The wiring (relay.server) gives the console what `privacy-relay check` runs; the console sits below it.
UpstreamCheck = Callable[[Config, str], Awaitable[list[tuple[str, list[ProbeStep]]]]]
STATE = web.AppKey("state", ConsoleState)
TEMPLATES = web.AppKey("templates", jinja2.Environment)


class BadRequest(Exception):
    """A request the console cannot act on; its text goes back to the client."""


def limit_of(query: Mapping[str, str]) -> int:
    raw = query.get("limit", str(DEFAULT_LIMIT))
    try:
        limit = int(raw)
    except ValueError:
        raise BadRequest(f"limit must be a whole number, not {raw!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}")
    return limit


def decision_of(query: Mapping[str, str]) -> str | None:
    decision = query.get("decision") or None
    if decision is not None and decision not in DECISIONS:
        raise BadRequest(f"decision must be one of {', '.join(DECISIONS)}")
    return decision


def spool_of(request: web.Request) -> Spool:
    spool = request.app[STATE].spool
    if spool is None:
        raise web.HTTPNotFound(reason="delivery.mode is direct: the relay stores nothing, so there is nothing to show")
    return spool


def state_of(request: web.Request) -> ConsoleState:
    return request.app[STATE]


def holding_of(request: web.Request) -> Holding:
    holding = state_of(request).holding
    if holding is None:
        raise web.HTTPNotFound(reason="delivery.mode is direct: nothing can be held")
    return holding


async def retry(request: web.Request) -> int | None:
    """Copies of the message made due now, or None when it is not in the queue."""
    spool = spool_of(request)
    message_id = request.match_info["id"]
    count = await spool.retry_now(time.time(), message_id)
    if count == 0 and await spool.summary(message_id) is None:
        return None
    return count


async def held_entries(request: web.Request) -> list[MessageHistory]:
    spool = spool_of(request)
    entries = [await spool.history_of(held.id) for held in await spool.held_messages()]
    return [entry for entry in entries if entry is not None]


async def run_preview(state: ConsoleState, data: bytes, mail_from: str | None, rcpts: list[str]) -> Preview:
    # In a thread: a large message takes a while to parse, and the console's other requests go on.
    date = formatdate(localtime=True)
    return await asyncio.to_thread(
        preview_message, state.config.policy.settings(), data, state.hostname, date, mail_from, rcpts
    )
