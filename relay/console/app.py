"""The console's web application: pages for a person, the JSON API for scripts, /healthz and /metrics.

Every page is rendered on the server and works with JavaScript off; the one script refreshes the activity
list in place. Pages and API read and change the spool through the Spool interface only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import formatdate
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from relay.activity import copies_word, local_time
from relay.config import Config
from relay.console.access import Access, add_security_headers, guard, json_errors, refusal
from relay.console.metrics import CONTENT_TYPE, ConsoleMetrics
from relay.console.words import DECISIONS, STATE_WORDS, decision_words
from relay.forwarder import ProbeStep
from relay.holding import RELEASE_CHOICES, CannotRelease, Holding, NotHeld, Settled
from relay.preview import Preview, preview_message
from relay.spool import DEFERRED, HELD, QUEUED, SENDING, MessageHistory, MessageSummary, Spool, SpoolWriteError

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# Room for the multipart wrapping of an uploaded message of listen.max_message_size.
_UPLOAD_OVERHEAD = 64 * 1024


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
                "last_reply": copy.last_reply,
                "next_attempt_at": iso_time(copy.next_attempt),
            }
            for copy in entry.copies
        ],
    }


def queue_state(state: str, attempts: int) -> str:
    return SENDING if state == SENDING else DEFERRED if attempts else QUEUED


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
                "last_reply": copy.last_reply,
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


class BadRequest(Exception):
    """A request the console cannot act on; its text goes back to the client."""


def _limit(query: Mapping[str, str]) -> int:
    raw = query.get("limit", str(DEFAULT_LIMIT))
    try:
        limit = int(raw)
    except ValueError:
        raise BadRequest(f"limit must be a whole number, not {raw!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}")
    return limit


def _decision(query: Mapping[str, str]) -> str | None:
    decision = query.get("decision") or None
    if decision is not None and decision not in DECISIONS:
        raise BadRequest(f"decision must be one of {', '.join(DECISIONS)}")
    return decision


def _spool(request: web.Request) -> Spool:
    spool = request.app[STATE].spool
    if spool is None:
        raise web.HTTPNotFound(reason="delivery.mode is direct: the relay stores nothing, so there is nothing to show")
    return spool


def _state(request: web.Request) -> ConsoleState:
    return request.app[STATE]


# --- the JSON API ---


async def api_messages(request: web.Request) -> web.Response:
    query = request.query
    entries = await _spool(request).history(_limit(query), _decision(query), query.get("q", "").strip())
    return web.json_response({"messages": [message_json(entry) for entry in entries]})


async def api_message(request: web.Request) -> web.Response:
    entry = await _spool(request).history_of(request.match_info["id"])
    if entry is None:
        return refusal(request, 404, f"no message {request.match_info['id']} in the history")
    return web.json_response(message_json(entry))


async def api_queue(request: web.Request) -> web.Response:
    summaries = await _spool(request).summaries()
    return web.json_response({"queue": [queue_json(summary) for summary in summaries]})


async def retry(request: web.Request) -> int | None:
    """Copies of the message made due now, or None when it is not in the queue."""
    spool = _spool(request)
    message_id = request.match_info["id"]
    count = await spool.retry_now(time.time(), message_id)
    if count == 0 and await spool.summary(message_id) is None:
        return None
    return count


async def api_retry(request: web.Request) -> web.Response:
    count = await retry(request)
    if count is None:
        return refusal(request, 404, f"no message {request.match_info['id']} in the queue")
    return web.json_response({"id": request.match_info["id"], "copies_due_now": count})


async def api_delete(request: web.Request) -> web.Response:
    if not await _spool(request).delete(request.match_info["id"]):
        return refusal(request, 404, f"no message {request.match_info['id']} in the queue")
    return web.json_response({"id": request.match_info["id"], "deleted": True})


def _holding(request: web.Request) -> Holding:
    holding = _state(request).holding
    if holding is None:
        raise web.HTTPNotFound(reason="delivery.mode is direct: nothing can be held")
    return holding


async def held_entries(request: web.Request) -> list[MessageHistory]:
    spool = _spool(request)
    entries = [await spool.history_of(held.id) for held in await spool.held_messages()]
    return [entry for entry in entries if entry is not None]


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
    return await _settled_answer(request, _holding(request).release(request.match_info["id"], how))


async def api_discard(request: web.Request) -> web.Response:
    return await _settled_answer(request, _holding(request).discard(request.match_info["id"]))


async def run_preview(state: ConsoleState, data: bytes, mail_from: str | None, rcpts: list[str]) -> Preview:
    # In a thread: a large message takes a while to parse, and the console's other requests go on.
    date = formatdate(localtime=True)
    return await asyncio.to_thread(preview_message, state.config.policy, data, state.hostname, date, mail_from, rcpts)


async def api_preview(request: web.Request) -> web.Response:
    data = await request.read()
    if not data:
        raise BadRequest("the body must be the message to preview (an .eml file's bytes)")
    result = await run_preview(_state(request), data, request.query.get("mail_from"), request.query.getall("rcpt", []))
    return web.json_response(preview_json(result))


async def healthz(request: web.Request) -> web.Response:
    state = _state(request)
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
    state = _state(request)
    snapshot = None if state.spool is None else await state.spool.metrics()
    return web.Response(body=state.metrics.render(snapshot), headers={"Content-Type": CONTENT_TYPE})


# --- pages ---


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    state = _state(request)
    page = request.app[TEMPLATES].get_template(template)
    html = page.render(
        csrf=state.access.csrf_token,
        path=request.path,
        stores_mail=state.spool is not None,
        **context,
    )
    return web.Response(text=html, content_type="text/html", status=status)


async def activity_page(request: web.Request) -> web.Response:
    query = request.query
    spool = _state(request).spool
    entries = [] if spool is None else await spool.history(_limit(query), _decision(query), query.get("q", "").strip())
    template = "_messages.html" if request.headers.get("X-Console-Fragment") else "activity.html"
    return render(
        request,
        template,
        entries=entries,
        decisions=DECISIONS,
        decision=query.get("decision", ""),
        q=query.get("q", ""),
    )


async def queue_page(request: web.Request) -> web.Response:
    spool = _state(request).spool
    summaries = [] if spool is None else await spool.summaries()
    return render(request, "queue.html", summaries=summaries, notice=request.query.get("notice", ""))


def _back_to(request: web.Request, page: str, notice: str) -> web.HTTPSeeOther:
    """After a form's change: back to its page (Post/Redirect/Get), which shows what happened."""
    return web.HTTPSeeOther(location=str(request.app.router[page].url_for().with_query(notice=notice)))


async def queue_retry_form(request: web.Request) -> web.Response:
    count = await retry(request)
    notice = "not in the queue any more" if count is None else f"{copies_word(count)} will be sent within seconds"
    raise _back_to(request, "queue", notice)


async def queue_delete_confirm(request: web.Request) -> web.Response:
    summary = await _spool(request).summary(request.match_info["id"])
    if summary is None:
        return render(request, "gone.html", status=404, message_id=request.match_info["id"])
    return render(request, "confirm_delete.html", summary=summary)


async def queue_delete_form(request: web.Request) -> web.Response:
    deleted = await _spool(request).delete(request.match_info["id"])
    notice = "deleted; no delivery report is sent" if deleted else "not in the queue any more"
    raise _back_to(request, "queue", notice)


async def held_page(request: web.Request) -> web.Response:
    entries = [] if _state(request).spool is None else await held_entries(request)
    return render(request, "held.html", entries=entries, notice=request.query.get("notice", ""))


async def held_confirm(request: web.Request) -> web.Response:
    """The second question before a release as written or a discard."""
    message_id, step = request.match_info["id"], request.match_info["step"]
    entry = await _spool(request).history_of(message_id)
    held = await _spool(request).held_message(message_id)
    if entry is None or held is None or held.state != HELD or step not in ("written", "discard"):
        raise _back_to(request, "held", f"{message_id} is not held any more")
    return render(request, "confirm_held.html", entry=entry, step=step)


async def held_form(request: web.Request) -> web.Response:
    form = await request.post()
    message_id = request.match_info["id"]
    how = form.get("as")
    holding = _holding(request)
    try:
        if how == "discard":
            await holding.discard(message_id)
            notice = f"{message_id} discarded: it will never be sent"
        elif how in RELEASE_CHOICES:
            if how == "written" and form.get("confirm") != "yes":
                raise _back_to(request, "held", "not released: releasing as written needs the second confirmation")
            settled = await holding.release(message_id, how)
            notice = f"{message_id} released as {how}: {copies_word(settled.copies)} on their way"
        else:
            raise BadRequest("choose how to release the message")
    except (NotHeld, CannotRelease) as exc:
        notice = str(exc)
    raise _back_to(request, "held", notice)


async def preview_page(request: web.Request) -> web.Response:
    return render(request, "preview.html", result=None, text="", mail_from="", rcpts="")


async def preview_form(request: web.Request) -> web.Response:
    form = await request.post()
    upload = form.get("file")
    text = form.get("text")
    data = b""
    if isinstance(upload, web.FileField):
        data = upload.file.read()
    if not data and isinstance(text, str):
        data = text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")
    mail_from = form.get("mail_from")
    rcpts_text = form.get("rcpts")
    rcpts = rcpts_text.replace(",", " ").split() if isinstance(rcpts_text, str) else []
    sender = mail_from.strip() if isinstance(mail_from, str) and mail_from.strip() else None
    result = await run_preview(_state(request), data, sender, rcpts) if data else None
    return render(
        request,
        "preview.html",
        result=result,
        text=text if isinstance(text, str) else "",
        mail_from=sender or "",
        rcpts=" ".join(rcpts),
        empty=not data,
    )


async def status_page(request: web.Request, checks: list[Any] | None = None) -> web.Response:
    state = _state(request)
    config = state.config
    snapshot = None if state.spool is None else await state.spool.metrics()
    counters = {} if snapshot is None else snapshot.counters
    upstreams = sorted({label for name, label in counters if name == "upstream_up"})
    upstream_state = [
        (name, counters[("upstream_up", name)], counters.get(("upstream_last_delivery", name))) for name in upstreams
    ]
    return render(
        request,
        "status.html",
        config=config,
        accepting=state.accepting(),
        snapshot=snapshot,
        upstream_state=upstream_state,
        spool_bytes=_spool_bytes(config),
        checks=checks,
    )


def _spool_bytes(config: Config) -> int:
    return sum(path.stat().st_size for path in config.spool.path.glob("spool.db*") if path.is_file())


async def status_check(request: web.Request) -> web.Response:
    """The steps of `privacy-relay check` for each upstream: connect, EHLO, TLS, login; no mail is sent."""
    state = _state(request)
    if state.check_upstreams is None:
        raise web.HTTPNotFound(reason="this console cannot check the upstreams")
    return await status_page(request, await state.check_upstreams(state.config, state.hostname))


@web.middleware
async def bad_requests(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except BadRequest as exc:
        return refusal(request, 400, str(exc))
    return response


def build_app(state: ConsoleState) -> web.Application:
    app = web.Application(
        middlewares=[json_errors, guard(state.access), bad_requests],
        client_max_size=state.config.listen.max_message_size + _UPLOAD_OVERHEAD,
    )
    app[STATE] = state
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("relay.console", "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    environment.globals.update(
        local_time=local_time,
        decision_words=decision_words,
        state_words=STATE_WORDS,
        copies_word=copies_word,
        queue_state=queue_state,
    )
    app[TEMPLATES] = environment
    app.router.add_static("/static/", Path(__file__).parent / "static", name="static")
    app.router.add_get("/", activity_page, name="activity")
    app.router.add_get("/held", held_page, name="held")
    app.router.add_get("/held/{id}/confirm/{step}", held_confirm)
    app.router.add_post("/held/{id}", held_form)
    app.router.add_get("/queue", queue_page, name="queue")
    app.router.add_post("/queue/{id}/retry", queue_retry_form)
    app.router.add_get("/queue/{id}/delete", queue_delete_confirm)
    app.router.add_post("/queue/{id}/delete", queue_delete_form)
    app.router.add_get("/preview", preview_page, name="preview")
    app.router.add_post("/preview", preview_form)
    app.router.add_get("/status", status_page, name="status")
    app.router.add_post("/status/check", status_check)
    app.router.add_get("/api/messages", api_messages)
    app.router.add_get("/api/messages/{id}", api_message)
    app.router.add_get("/api/held", api_held)
    app.router.add_post("/api/held/{id}/release", api_release)
    app.router.add_post("/api/held/{id}/discard", api_discard)
    app.router.add_get("/api/queue", api_queue)
    app.router.add_post("/api/queue/{id}/retry", api_retry)
    app.router.add_delete("/api/queue/{id}", api_delete)
    app.router.add_post("/api/preview", api_preview)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.on_response_prepare.append(add_security_headers)
    return app
