"""The console's JSON API, /healthz and /metrics: what scripts, probes and Prometheus use (docs/console.md)."""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from relay.console.access import refusal
from relay.console.metrics import CONTENT_TYPE
from relay.console.state import (
    BadRequest,
    decision_of,
    held_entries,
    holding_of,
    limit_of,
    retry,
    run_preview,
    spool_of,
    state_of,
)
from relay.console.words import decision_words
from relay.core.preview import Preview
from relay.delivery.holding import RELEASE_CHOICES, CannotRelease, NotHeld, Settled
from relay.spool.interface import CopyState, HistoryState, MessageHistory, MessageSummary, SpoolWriteError


def iso_time(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def message_json(entry: MessageHistory) -> dict[str, Any]:
    record = entry.record
    return {
        "id": entry.id,
        "received_at": iso_time(entry.received_at),
        "sender": record.sender,
        "subject": record.subject,
        "recipients": list(record.recipients),
        "decision": record.decision,
        "reason": record.reason,
        "summary": decision_words(entry),
        "copies": [
            {
                "recipients": list(copy.recipients),
                "state": copy.state,
                "attempts": copy.attempts,
                "last_reply": None if copy.last_reply is None else copy.last_reply.render(),
                "next_attempt_at": iso_time(copy.next_attempt),
            }
            for copy in entry.copies
        ],
    }


def queue_state(state: CopyState, attempts: int) -> HistoryState:
    """A queued copy as the console names it: being sent, waiting for a retry (tried before), or queued."""
    if state is CopyState.SENDING:
        return HistoryState.SENDING
    return HistoryState.DEFERRED if attempts else HistoryState.QUEUED


def queue_json(summary: MessageSummary) -> dict[str, Any]:
    return {
        "id": summary.id,
        "received_at": iso_time(summary.received_at),
        "sender": summary.mail_from,
        "is_delivery_report": summary.is_bounce,
        "size": summary.size,
        "upstream": summary.upstream,
        "copies": [
            {
                "recipients": list(copy.recipients),
                "kind": copy.kind,
                "state": queue_state(copy.state, copy.attempts),
                "attempts": copy.attempts,
                "next_attempt_at": iso_time(copy.next_attempt),
                "last_reply": None if copy.last_reply is None else copy.last_reply.render(),
            }
            for copy in summary.copies
        ],
    }


def preview_json(result: Preview) -> dict[str, Any]:
    return {
        "mail_from": result.mail_from,
        "recipients": list(result.recipients),
        "decision": result.decision,
        "reason": result.reason,
        "reply": result.reply,
        "copies": [
            {"kind": copy.kind, "recipients": list(copy.recipients), "headers": copy.headers} for copy in result.copies
        ],
    }


async def api_messages(request: web.Request) -> web.Response:
    query = request.query
    entries = await spool_of(request).history(limit_of(query), decision_of(query), query.get("q", "").strip())
    return web.json_response({"messages": [message_json(entry) for entry in entries]})


async def api_message(request: web.Request) -> web.Response:
    entry = await spool_of(request).history_of(request.match_info["id"])
    if entry is None:
        return refusal(request, 404, f"no message {request.match_info['id']} in the history")
    return web.json_response(message_json(entry))


async def api_queue(request: web.Request) -> web.Response:
    summaries = await spool_of(request).summaries()
    return web.json_response({"queue": [queue_json(summary) for summary in summaries]})


async def api_retry(request: web.Request) -> web.Response:
    count = await retry(request)
    if count is None:
        return refusal(request, 404, f"no message {request.match_info['id']} in the queue")
    return web.json_response({"id": request.match_info["id"], "copies_due_now": count})


async def api_delete(request: web.Request) -> web.Response:
    if not await spool_of(request).delete(request.match_info["id"]):
        return refusal(request, 404, f"no message {request.match_info['id']} in the queue")
    return web.json_response({"id": request.match_info["id"], "deleted": True})


async def api_held(request: web.Request) -> web.Response:
    return web.json_response({"held": [message_json(entry) for entry in await held_entries(request)]})


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:  # json.JSONDecodeError and UnicodeDecodeError
        raise BadRequest('the body must be a JSON object, for example {"as": "split"}') from None
    if not isinstance(body, dict):
        raise BadRequest('the body must be a JSON object, for example {"as": "split"}')
    return body


async def _settled_answer(request: web.Request, settling: Awaitable[Settled]) -> web.Response:
    try:
        settled = await settling
    except NotHeld as exc:
        return refusal(request, 404 if exc.state is None else 409, str(exc))
    except CannotRelease as exc:
        return refusal(request, 422, str(exc))
    return web.json_response({"id": settled.id, "state": settled.state, "copies": settled.copies})


async def api_release(request: web.Request) -> web.Response:
    body = await _json_object(request)
    how = body.get("as")
    if how not in RELEASE_CHOICES:
        raise BadRequest(f'"as" must be one of {", ".join(RELEASE_CHOICES)}')
    if how == "written" and body.get("confirm") is not True:
        raise BadRequest(
            'releasing as written shows every recipient to all the others; send {"as": "written", "confirm": true}'
        )
    return await _settled_answer(request, holding_of(request).release(request.match_info["id"], how))


async def api_discard(request: web.Request) -> web.Response:
    return await _settled_answer(request, holding_of(request).discard(request.match_info["id"]))


async def api_preview(request: web.Request) -> web.Response:
    data = await request.read()
    if not data:
        raise BadRequest("the body must be the message to preview (an .eml file's bytes)")
    result = await run_preview(
        state_of(request), data, request.query.get("mail_from"), request.query.getall("rcpt", [])
    )
    return web.json_response(preview_json(result))


async def healthz(request: web.Request) -> web.Response:
    state = state_of(request)
    problems = []
    if not state.accepting():
        problems.append("the relay is not accepting mail")
    if state.spool is not None:
        try:
            await state.spool.check_writable()
        except SpoolWriteError as exc:
            problems.append(f"the spool cannot be written: {exc.text}")
    if problems:
        return web.json_response({"status": "unavailable", "problems": problems}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    state = state_of(request)
    snapshot = None if state.spool is None else await state.spool.metrics()
    return web.Response(body=state.metrics.render(snapshot), headers={"Content-Type": CONTENT_TYPE})
