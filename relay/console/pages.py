"""The console's pages: server-rendered HTML (Jinja2) that works with JavaScript off, forms that Post/Redirect/Get."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from relay.config.models import Config
from relay.console.state import (
    TEMPLATES,
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
from relay.console.words import DECISIONS
from relay.core.activity import copies_word
from relay.delivery.holding import RELEASE_CHOICES, CannotRelease, NotHeld
from relay.spool.interface import HeldState


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    state = state_of(request)
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
    spool = state_of(request).spool
    entries = (
        [] if spool is None else await spool.history(limit_of(query), decision_of(query), query.get("q", "").strip())
    )
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
    spool = state_of(request).spool
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
    summary = await spool_of(request).summary(request.match_info["id"])
    if summary is None:
        return render(request, "gone.html", status=404, message_id=request.match_info["id"])
    return render(request, "confirm_delete.html", summary=summary)


async def queue_delete_form(request: web.Request) -> web.Response:
    deleted = await spool_of(request).delete(request.match_info["id"])
    notice = "deleted; no delivery report is sent" if deleted else "not in the queue any more"
    raise _back_to(request, "queue", notice)


async def held_page(request: web.Request) -> web.Response:
    entries = [] if state_of(request).spool is None else await held_entries(request)
    return render(request, "held.html", entries=entries, notice=request.query.get("notice", ""))


async def held_confirm(request: web.Request) -> web.Response:
    """The second question before a release as written or a discard."""
    message_id, step = request.match_info["id"], request.match_info["step"]
    entry = await spool_of(request).history_of(message_id)
    held = await spool_of(request).held_message(message_id)
    if entry is None or held is None or held.state is not HeldState.HELD or step not in ("written", "discard"):
        raise _back_to(request, "held", f"{message_id} is not held any more")
    return render(request, "confirm_held.html", entry=entry, step=step)


async def held_form(request: web.Request) -> web.Response:
    form = await request.post()
    message_id = request.match_info["id"]
    how = form.get("as")
    holding = holding_of(request)
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
    result = await run_preview(state_of(request), data, sender, rcpts) if data else None
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
    state = state_of(request)
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
        spool_bytes=0 if config.spool.shared else _spool_bytes(config),
        checks=checks,
    )


def _spool_bytes(config: Config) -> int:
    return sum(path.stat().st_size for path in config.spool.path.glob("spool.db*") if path.is_file())


async def status_check(request: web.Request) -> web.Response:
    """The steps of `privacy-relay check` for each upstream: connect, EHLO, TLS, login; no mail is sent."""
    state = state_of(request)
    if state.check_upstreams is None:
        raise web.HTTPNotFound(reason="this console cannot check the upstreams")
    return await status_page(request, await state.check_upstreams(state.config, state.hostname))
