"""httpbin (the HTTP request and response service) served by trioserve.

Run it from the repository root::

    trioserve examples.httpbin_app:app                          # http://127.0.0.1:8000/get

Then try::

    curl "http://127.0.0.1:8000/get?show=args"
    curl --http2-prior-knowledge http://127.0.0.1:8000/stream/3   # h2c
    curl -H "Range: bytes=0-9" http://127.0.0.1:8000/range/100
    curl "http://127.0.0.1:8000/drip?numbytes=5&duration=1&delay=0"
    curl -i http://127.0.0.1:8000/status/418

This is the ``httpbin`` distribution on PyPI (maintained by the PSF, version
0.10 and later), a Flask app. Without its optional ``flasgger`` dependency it
logs one warning on import and serves a static page at ``/`` instead of the
Swagger UI; every endpoint works.
"""

from __future__ import annotations

from httpbin import app

__all__ = ["app"]
