"""UpstreamPool against real aiosmtpd upstreams: pipelined or not, TLS and AUTH, refusals, shared bodies."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from relay.config.models import UpstreamConfig
from relay.core.rewrite import OutgoingCopy
from relay.upstream.pool import UpstreamPool
from tests.conftest import Upstream, UpstreamFactory

HEADERS = b"From: a@src.test\r\nTo: undisclosed-recipients:;\r\nSubject: t\r\n\r\n"
BODY = b"line one\r\n.leading dot\r\n..two dots\r\n.\r\nlast line\r\n"


try:
    import uvloop
except ImportError:
    uvloop = None


@pytest.fixture(
    params=[
        "asyncio",
        pytest.param("uvloop", marks=pytest.mark.skipif(uvloop is None, reason="uvloop (extra 'fast') not installed")),
    ]
)
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    """Runs a test's scenario on asyncio's loop and on uvloop's, which `privacy-relay serve` uses when installed."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else None

    def run_scenario(scenario: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(scenario)

    return run_scenario


def advertise_pipelining(upstream: Upstream) -> None:
    async def handle_EHLO(server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    upstream.handler.handle_EHLO = handle_EHLO  # type: ignore[attr-defined]


@pytest.fixture(params=["pipelining", "one command at a time"])
def plain_upstream(request: pytest.FixtureRequest, make_upstream: UpstreamFactory) -> Upstream:
    upstream = make_upstream()
    if request.param == "pipelining":
        advertise_pipelining(upstream)
    return upstream


def pool_for(upstream: Upstream, tmp_path: Path, **settings: Any) -> UpstreamPool:
    if upstream.ca is not None:
        ca_file = tmp_path / "ca.pem"
        upstream.ca.cert_pem.write_to_path(str(ca_file))
        settings.setdefault("ca_file", ca_file)
    settings.setdefault("tls", "none")
    config = UpstreamConfig(host=upstream.host, port=upstream.port, timeout=10, **settings)
    return UpstreamPool(config, settings.get("username") and "secret", "relay.test")


def copy_to(*recipients: str, body: bytes = BODY, headers: bytes = HEADERS) -> OutgoingCopy:
    return OutgoingCopy(tuple(recipients), "single", headers, body)


def test_copies_arrive_byte_for_byte_and_the_connection_is_reused(run, plain_upstream: Upstream, tmp_path) -> None:
    async def scenario() -> None:
        pool = pool_for(plain_upstream, tmp_path)
        body = BODY + b"x" * 100 + b"\r\n"
        outcomes = [await pool.send("a@src.test", copy_to(f"r{n}@dst.test", body=body), False) for n in range(3)]
        await pool.close()
        assert [o.accepted for o in outcomes] == [["r0@dst.test"], ["r1@dst.test"], ["r2@dst.test"]]
        assert all(not o.refused for o in outcomes)
        assert [m.data for m in plain_upstream.messages] == [HEADERS + body] * 3
        assert len(pool._bodies) == 0

    run(scenario())


def test_bare_line_endings_are_sent_as_crlf_like_aiosmtplib(run, plain_upstream: Upstream, tmp_path) -> None:
    async def scenario() -> None:
        pool = pool_for(plain_upstream, tmp_path)
        await pool.send("a@src.test", copy_to("r@dst.test", headers=b"Subject: t\n\n", body=b".a\nb\rc"), False)
        await pool.close()
        assert plain_upstream.messages[0].data == b"Subject: t\r\n\r\n.a\r\nb\r\nc\r\n"

    run(scenario())


def test_a_large_body_is_written_in_slices_intact(run, plain_upstream: Upstream, tmp_path) -> None:
    async def scenario() -> None:
        pool = pool_for(plain_upstream, tmp_path)
        body = b"".join(b".%07d line of a big message\r\n" % n for n in range(40_000))
        outcome = await pool.send("a@src.test", copy_to("r@dst.test", body=body), False)
        await pool.close()
        assert outcome.accepted == ["r@dst.test"]
        assert plain_upstream.messages[0].data == HEADERS + body

    run(scenario())


def test_one_refused_recipient_does_not_stop_the_others(run, plain_upstream: Upstream, tmp_path) -> None:
    async def scenario() -> None:
        plain_upstream.handler.rcpt_replies["bad@dst.test"] = "550 5.1.1 No such user"
        pool = pool_for(plain_upstream, tmp_path)
        outcome = await pool.send("a@src.test", copy_to("ok@dst.test", "bad@dst.test", "ok2@dst.test"), False)
        await pool.close()
        assert outcome.accepted == ["ok@dst.test", "ok2@dst.test"]
        assert list(outcome.refused) == ["bad@dst.test"]
        refusal = outcome.refused["bad@dst.test"]
        assert (refusal.code, refusal.enhanced, refusal.text) == (550, "5.1.1", "No such user")
        assert plain_upstream.messages[0].rcpt_tos == ["ok@dst.test", "ok2@dst.test"]

    run(scenario())


def test_every_recipient_refused_sends_no_message_and_the_next_copy_goes(
    run, plain_upstream: Upstream, tmp_path
) -> None:
    async def scenario() -> None:
        plain_upstream.handler.rcpt_replies["bad@dst.test"] = "450 4.2.1 Try later"
        pool = pool_for(plain_upstream, tmp_path)
        refused = await pool.send("a@src.test", copy_to("bad@dst.test"), False)
        accepted = await pool.send("a@src.test", copy_to("ok@dst.test"), False)
        await pool.close()
        assert refused.accepted == [] and refused.refused["bad@dst.test"].code == 450
        assert accepted.accepted == ["ok@dst.test"]
        assert [m.rcpt_tos for m in plain_upstream.messages] == [["ok@dst.test"]]

    run(scenario())


def test_a_refused_sender_refuses_every_recipient_then_the_connection_resets(
    run, plain_upstream: Upstream, tmp_path
) -> None:
    async def scenario() -> None:
        plain_upstream.handler.mail_reply = "553 5.7.1 Sender not allowed"
        pool = pool_for(plain_upstream, tmp_path)
        outcome = await pool.send("a@src.test", copy_to("r1@dst.test", "r2@dst.test"), False)
        plain_upstream.handler.mail_reply = None
        after = await pool.send("a@src.test", copy_to("r3@dst.test"), False)
        await pool.close()
        assert outcome.accepted == []
        assert {r: reply.code for r, reply in outcome.refused.items()} == {"r1@dst.test": 553, "r2@dst.test": 553}
        assert after.accepted == ["r3@dst.test"]
        assert [m.rcpt_tos for m in plain_upstream.messages] == [["r3@dst.test"]]

    run(scenario())


def test_a_refused_message_refuses_its_recipients(run, plain_upstream: Upstream, tmp_path) -> None:
    async def scenario() -> None:
        plain_upstream.handler.data_reply = "554 5.6.0 Content rejected"
        pool = pool_for(plain_upstream, tmp_path)
        outcome = await pool.send("a@src.test", copy_to("r1@dst.test", "r2@dst.test"), False)
        await pool.close()
        assert outcome.accepted == []
        assert {reply.text for reply in outcome.refused.values()} == {"Content rejected"}

    run(scenario())


def test_an_idle_connection_the_upstream_closed_is_replaced(run, plain_upstream: Upstream, tmp_path) -> None:
    async def scenario() -> None:
        pool = pool_for(plain_upstream, tmp_path)
        await pool.send("a@src.test", copy_to("r1@dst.test"), False)
        (idle,) = pool._idle
        idle._transport.close()
        await asyncio.sleep(0.05)
        outcome = await pool.send("a@src.test", copy_to("r2@dst.test"), False)
        await pool.close()
        assert outcome.accepted == ["r2@dst.test"]
        assert [m.rcpt_tos for m in plain_upstream.messages] == [["r1@dst.test"], ["r2@dst.test"]]

    run(scenario())


def test_an_idle_connection_that_got_a_421_is_not_used(run, plain_upstream: Upstream, tmp_path) -> None:
    async def scenario() -> None:
        pool = pool_for(plain_upstream, tmp_path)
        await pool.send("a@src.test", copy_to("r1@dst.test"), False)
        (idle,) = pool._idle
        # What an upstream's idle timeout sends before it closes the connection.
        idle.data_received(b"421 4.4.2 upstream.test Error: timeout exceeded\r\n")
        outcome = await pool.send("a@src.test", copy_to("r2@dst.test"), False)
        await pool.close()
        assert (outcome.accepted, outcome.refused) == (["r2@dst.test"], {})
        assert [m.rcpt_tos for m in plain_upstream.messages] == [["r1@dst.test"], ["r2@dst.test"]]

    run(scenario())


def test_concurrent_copies_share_one_wire_body(run, plain_upstream: Upstream, tmp_path) -> None:
    async def scenario() -> None:
        pool = pool_for(plain_upstream, tmp_path, max_connections=3)
        body = b"shared\r\n" * 1000
        copies = [copy_to(f"r{n}@dst.test", body=body) for n in range(9)]
        outcomes = await asyncio.gather(*(pool.send("a@src.test", c, False) for c in copies))
        await pool.close()
        assert sorted(r for o in outcomes for r in o.accepted) == sorted(f"r{n}@dst.test" for n in range(9))
        assert all(m.data == HEADERS + body for m in plain_upstream.messages)
        await asyncio.sleep(0)
        assert len(pool._bodies) == 0

    run(scenario())


# aiosmtpd offers AUTH with auth_require_tls only after STARTTLS, so implicit TLS is tested without login.
@pytest.mark.parametrize("tls, username", [("starttls", "relay"), ("implicit", None)])
def test_tls_and_login_then_pipelined_copies(
    run, make_upstream: UpstreamFactory, tmp_path, tls: str, username: str | None
) -> None:
    async def scenario() -> None:
        upstream = make_upstream(tls=tls, credentials=(username, "secret") if username else None)
        advertise_pipelining(upstream)
        pool = pool_for(upstream, tmp_path, tls=tls, username=username)
        outcomes = [await pool.send("a@src.test", copy_to(f"r{n}@dst.test"), False) for n in range(2)]
        assert [c.supports("pipelining") for c in pool._idle] == [True]
        await pool.close()
        assert [o.accepted for o in outcomes] == [["r0@dst.test"], ["r1@dst.test"]]
        assert [m.data for m in upstream.messages] == [HEADERS + BODY] * 2

    run(scenario())
