"""The console's web application: pages for a person, the JSON API for scripts, /healthz and /metrics.

Every page is rendered on the server and works with JavaScript off; the one script refreshes the activity
list in place. Pages and API read and change the spool through the Spool interface only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from relay.console import api, pages
from relay.console.access import add_security_headers, guard, json_errors, refusal
from relay.console.state import STATE, TEMPLATES, BadRequest, ConsoleState
from relay.console.words import STATE_WORDS, decision_words
from relay.core.activity import copies_word, local_time
from relay.spool.interface import SpoolWriteError

# Room for the multipart wrapping of an uploaded message of listen.max_message_size.
_UPLOAD_OVERHEAD = 64 * 1024


@web.middleware
async def bad_requests(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except BadRequest as exc:
        return refusal(request, 400, str(exc))
    except SpoolWriteError as exc:
        # A shared spool's database out of reach: the page says so, and works again once it is back.
        return refusal(request, 503, exc.text)
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
        queue_state=api.queue_state,
    )
    app[TEMPLATES] = environment
    app.router.add_static("/static/", Path(__file__).parent / "static", name="static")
    app.router.add_get("/", pages.activity_page, name="activity")
    app.router.add_get("/held", pages.held_page, name="held")
    app.router.add_get("/held/{id}/confirm/{step}", pages.held_confirm)
    app.router.add_post("/held/{id}", pages.held_form)
    app.router.add_get("/queue", pages.queue_page, name="queue")
    app.router.add_post("/queue/{id}/retry", pages.queue_retry_form)
    app.router.add_get("/queue/{id}/delete", pages.queue_delete_confirm)
    app.router.add_post("/queue/{id}/delete", pages.queue_delete_form)
    app.router.add_get("/preview", pages.preview_page, name="preview")
    app.router.add_post("/preview", pages.preview_form)
    app.router.add_get("/status", pages.status_page, name="status")
    app.router.add_post("/status/check", pages.status_check)
    app.router.add_get("/api/messages", api.api_messages)
    app.router.add_get("/api/messages/{id}", api.api_message)
    app.router.add_get("/api/held", api.api_held)
    app.router.add_post("/api/held/{id}/release", api.api_release)
    app.router.add_post("/api/held/{id}/discard", api.api_discard)
    app.router.add_get("/api/queue", api.api_queue)
    app.router.add_post("/api/queue/{id}/retry", api.api_retry)
    app.router.add_delete("/api/queue/{id}", api.api_delete)
    app.router.add_post("/api/preview", api.api_preview)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/metrics", api.metrics)
    app.on_response_prepare.append(add_security_headers)
    return app
