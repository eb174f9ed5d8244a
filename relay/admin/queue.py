"""`privacy-relay queue list | show ID | retry [ID] | delete ID`: the spool seen and changed by a person.

Safe while the relay runs: SQLite's WAL lets this process read and write beside it, and the relay looks at
the spool again within seconds, so a retried copy goes out without a restart.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time

from relay.config.models import Config
from relay.core.activity import local_time
from relay.spool import build_spool
from relay.spool.interface import AdminSpool, CopyState, MessageSummary, SpoolWriteError
from relay.spool.sqlite import DATABASE_NAME


def _next_attempt(summary: MessageSummary) -> str:
    waiting = [c.next_attempt for c in summary.copies]
    if not waiting:
        return "-"
    soonest = min(waiting)
    return "now" if soonest <= time.time() else local_time(soonest)


def _print_list(summaries: list[MessageSummary]) -> None:
    if not summaries:
        print("The spool is empty.")
        return
    print(f"{'ID':<13} {'received':<19} {'size':>9} {'copies':>6} {'next attempt':<19} sender")
    for s in summaries:
        sender = s.mail_from or "<>"
        if s.is_bounce:
            sender += " (delivery report)"
        print(
            f"{s.id:<13} {local_time(s.received_at):<19} {s.size:>9} {len(s.copies):>6} {_next_attempt(s):<19} {sender}"
        )
    copies = sum(len(s.copies) for s in summaries)
    print(f"\n{len(summaries)} message(s), {copies} cop{'y' if copies == 1 else 'ies'} waiting.")


def _print_summary(s: MessageSummary) -> None:
    print(f"id:        {s.id}")
    print(f"sender:    {s.mail_from or '<>'}{' (a delivery report made by the relay)' if s.is_bounce else ''}")
    print(f"received:  {local_time(s.received_at)}")
    print(f"size:      {s.size} bytes (body, stored once)")
    print(f"upstream:  {s.upstream or 'the default upstream'}")
    for c in s.copies:
        state = "being sent" if c.state is CopyState.SENDING else f"next attempt {local_time(c.next_attempt)}"
        print(f"\ncopy {c.position + 1} ({c.kind}) to {', '.join(c.recipients)}")
        print(f"  {state}; attempts so far: {c.attempts}")
        if c.last_reply is not None:
            print(f"  last reply: {c.last_reply.render()}")
    for f in s.failures:
        print(f"\nfailed for good: {f.recipient}: {f.reply.render()}")


async def _run(config: Config, action: str, message_id: str | None) -> int:
    if not config.spool.shared and not (config.spool.path / DATABASE_NAME).exists():
        print(f"There is no spool at {config.spool.path.resolve()} (spool.path).", file=sys.stderr)
        return 1
    spool = build_spool(config)
    await spool.open()
    try:
        return await _act(spool, action, message_id)
    finally:
        await spool.close()


async def _act(spool: AdminSpool, action: str, message_id: str | None) -> int:
    if action == "list":
        _print_list(await spool.summaries())
        return 0
    if action == "retry":
        count = await spool.retry_now(time.time(), message_id)
        if message_id is not None and count == 0 and await spool.summary(message_id) is None:
            print(f"No message {message_id} in the spool.", file=sys.stderr)
            return 1
        print(f"{count} cop{'y' if count == 1 else 'ies'} will be sent again within seconds.")
        return 0
    assert message_id is not None
    if action == "show":
        summary = await spool.summary(message_id)
        if summary is None:
            print(f"No message {message_id} in the spool.", file=sys.stderr)
            return 1
        _print_summary(summary)
        return 0
    if not await spool.delete(message_id):
        print(f"No message {message_id} in the spool.", file=sys.stderr)
        return 1
    print(f"Deleted {message_id}; no delivery report is sent.")
    return 0


def run_queue_command(config: Config, action: str, message_id: str | None) -> int:
    try:
        return asyncio.run(_run(config, action, message_id))
    except (sqlite3.Error, SpoolWriteError, OSError) as exc:
        where = config.spool.url or config.spool.path.resolve()
        print(f"privacy-relay: cannot use the spool at {where}: {exc}", file=sys.stderr)
        return 1
