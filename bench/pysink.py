"""Fallback sink when smtp-sink is absent: aiosmtpd that discards mail and prints smtp-sink's counters.

Run as `python -m bench.pysink PORT`; it listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import sys

from aiosmtpd.smtp import SMTP, Envelope, Session


class CountingHandler:
    def __init__(self) -> None:
        self.messages = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.messages += 1
        sys.stdout.write(f"mesg={self.messages}\r")
        sys.stdout.flush()
        return "250 2.0.0 Ok: discarded"


async def main(port: int) -> None:
    handler = CountingHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="pysink", data_size_limit=None, enable_SMTPUTF8=True), "127.0.0.1", port
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
