"""A Falcon app to try trioserve with: the course lab's QuoteResource, with GET and POST.

Run it from the repository root::

    trioserve examples.falcon_app:app                           # http://127.0.0.1:8000/quote

Then try::

    curl http://127.0.0.1:8000/quote
    curl --http2-prior-knowledge http://127.0.0.1:8000/quote    # h2c
    curl -i -H "Content-Type: application/json" \\
         -d '{"quote": "Simple is better than complex.", "author": "Tim Peters"}' \\
         http://127.0.0.1:8000/quote                            # 201, echoed back
    curl -i -H "Content-Type: application/json" -d '{oops' http://127.0.0.1:8000/quote   # 400
"""

from __future__ import annotations

import threading
from typing import Any

import falcon

DEFAULT_QUOTE = {
    "quote": "I've always been more interested in the future than in the past.",
    "author": "Grace Hopper",
}


class QuoteResource:
    """GET: the latest quote as JSON. POST: add a quote ``{"quote": ..., "author": ...}``.

    Malformed JSON is answered with 400 by Falcon itself (``req.get_media()``
    raises ``MediaMalformedError``); a well-formed body without both string
    fields gets a 400 from the validation below.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # requests run in several worker threads
        self._quotes: list[dict[str, str]] = [dict(DEFAULT_QUOTE)]

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        with self._lock:
            resp.media = self._quotes[-1]

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        quote = self._validate(req.get_media())
        with self._lock:
            self._quotes.append(quote)
        resp.status = falcon.HTTP_201
        resp.media = quote

    @staticmethod
    def _validate(media: Any) -> dict[str, str]:
        if not isinstance(media, dict):
            raise falcon.HTTPBadRequest(title="Invalid quote", description="Send a JSON object.")
        quote = {}
        for field in ("quote", "author"):
            value = media.get(field)
            if not isinstance(value, str) or not value.strip():
                raise falcon.HTTPBadRequest(
                    title="Invalid quote", description=f"'{field}' must be a non-empty string."
                )
            quote[field] = value.strip()
        return quote


def create_app() -> falcon.App:
    """A new app with its own QuoteResource (tests use one each, so state never leaks)."""
    application = falcon.App()
    application.add_route("/quote", QuoteResource())
    return application


app = create_app()
