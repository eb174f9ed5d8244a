"""`privacy-relay held list | show ID | release ID [--as split|bcc|written] | discard ID`.

Safe while the relay runs: the spool settles each held message once, so the console and this command
cannot both release it; the relay's scheduler sends released copies within seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys

from relay.config.models import Config
from relay.core.activity import copies_word, local_time
from relay.delivery.holding import CannotRelease, Holding, NotHeld
from relay.spool import build_spool
from relay.spool.interface import SpoolWriteError
from relay.spool.sqlite import DATABASE_NAME


def _confirmed(recipients: int) -> bool:
    if not sys.stdin.isatty():
        return False
    answer = input(f"All {recipients} recipients will see each other's addresses. Type yes to send it as written: ")
    return answer.strip().lower() == "yes"


async def _run(config: Config, args: argparse.Namespace) -> int:
    if not config.spool.shared and not (config.spool.path / DATABASE_NAME).exists():
        print(f"There is no spool at {config.spool.path.resolve()} (spool.path).", file=sys.stderr)
        return 1
    spool = build_spool(config)
    await spool.open()
    holding = Holding(spool, config.listen.own_hostname()[0], lambda: config)
    try:
        if args.held_command == "list":
            held = await spool.held_messages()
            if not held:
                print("Nothing is held.")
                return 0
            print(f"{'ID':<13} {'received':<19} {'rcpts':>5} sender")
            for message in held:
                received = local_time(message.received_at)
                print(f"{message.id:<13} {received:<19} {len(message.recipients):>5} {message.mail_from}")
            print(f"\n{len(held)} message(s) held for review.")
            return 0
        message_id: str = args.id
        if args.held_command == "show":
            entry = await spool.history_of(message_id)
            found = await spool.held_message(message_id)
            if entry is None or found is None:
                print(f"No held message {message_id}.", file=sys.stderr)
                return 1
            print(f"id:         {entry.id}\nstate:      {found.state}\nreceived:   {local_time(entry.received_at)}")
            print(f"sender:     {entry.record.sender}\nsubject:    {entry.record.subject}")
            print(f"reason:     {entry.record.reason}\nrecipients: {', '.join(entry.record.recipients)}")
            return 0
        if args.held_command == "discard":
            await holding.discard(message_id)
            print(f"Discarded {message_id}: it will never be sent.")
            return 0
        if args.release_as == "written" and not args.yes:
            found = await spool.held_message(message_id)
            if found is None or not _confirmed(len(found.recipients)):
                print("Not released. To send it as written, confirm, or add --yes.", file=sys.stderr)
                return 1
        settled = await holding.release(message_id, args.release_as)
        print(f"Released {message_id} as {args.release_as}: {copies_word(settled.copies)} queued.")
        return 0
    except NotHeld as exc:
        print(f"privacy-relay: {exc}", file=sys.stderr)
        return 1 if exc.state is None else 3
    except CannotRelease as exc:
        print(f"privacy-relay: {exc}", file=sys.stderr)
        return 1
    finally:
        await spool.close()


def run_held_command(config: Config, args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(config, args))
    except (sqlite3.Error, SpoolWriteError, OSError) as exc:
        where = config.spool.url or config.spool.path.resolve()
        print(f"privacy-relay: cannot use the spool at {where}: {exc}", file=sys.stderr)
        return 1
