"""trioserve: a structured-concurrency WSGI server on Trio, speaking HTTP/1.1 and HTTP/2.

Public API:

* :func:`serve_wsgi` - serve a WSGI app inside a trio program;
* :class:`Server` - the handle it returns (bound addresses, graceful stop);
* :class:`Config` - every option, with its default;
* :class:`ConfigError` - raised for invalid options and unusable addresses.

Layering (data flows one way)::

    socket -> connection (reader) -> http1/http2 (sans-IO) -> stream task
           -> app thread (wsgi) -> stream task -> http1/http2 -> connection (sender) -> socket
"""

from .config import Config, ConfigError
from .server import Server, serve_wsgi

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "Server", "serve_wsgi"]
