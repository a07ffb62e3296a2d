"""The rules a response must keep on either protocol, and trioserve's own error responses.

Sans-IO: no trio, no h11, no h2. The app thread (:mod:`trioserve.wsgi`)
checks a response head against these rules when ``start_response`` is called,
so a head that breaks them becomes a 500 before anything is sent; both
protocol layers apply them again, and count the body, which only they can.

The rule set (docs/wsgi-http.md, "Responses"):

1. The status is final, 200 to 599, and its reason phrase holds only SP,
   HTAB, visible ASCII and obs-text: no CR, LF, NUL or other control character
   that could end the status line early (response splitting).
2. At most one Content-Length, of 1 to 18 digits. A Transfer-Encoding is
   ``chunked`` alone, given once, and never beside a Content-Length
   (RFC 9112 §6.2). Over HTTP/2 it is dropped like any connection-specific field.
3. With a Content-Length, the body is exactly that long. A chunk that would
   go past it is not sent, and a body that ends short is never ended cleanly:
   either way the response is aborted (HTTP/2: RST_STREAM(INTERNAL_ERROR);
   HTTP/1.1: the connection is closed) and :class:`InvalidResponse` says why.
4. A response to HEAD, and a 204 or 304, sends no body bytes and counts none:
   its Content-Length may describe the body a GET would have had.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from http import HTTPStatus

from .events import UNCHECKED, InvalidResponse

FINAL_STATUSES = range(200, 600)
NO_BODY_STATUSES = frozenset({204, 304})

# RFC 9112 §4: reason-phrase = 1*( HTAB / SP / VCHAR / obs-text )
_REASON = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
# The most digits a Content-Length may have, a response's here and a request's
# (trioserve.http1_heads, trioserve.http2_fields): 18 stay below 2**63, the
# largest size a 64-bit peer can represent.
CONTENT_LENGTH_DIGITS = 18
_CONTENT_LENGTH = re.compile(rb"[0-9]{1,%d}" % CONTENT_LENGTH_DIGITS)

_REASONS = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase for ``status``, or b"" for unknown codes."""
    return _REASONS.get(status, b"")


def error_body(status: int, detail: str = "") -> bytes:
    """The short plain-text body trioserve sends with its own error responses."""
    text = f"{status} {reason_phrase(status).decode()}"
    if detail:
        text += f": {detail}"
    return (text + "\n").encode("utf-8", "replace")


def check_status(status: int, reason: bytes = b"") -> None:
    """Rule 1 for a status already split into code and reason; raises InvalidResponse."""
    if status not in FINAL_STATUSES:
        raise InvalidResponse(f"status {status} is not a final status (200 to 599)")
    if not _REASON.fullmatch(reason):
        raise InvalidResponse("control character in the reason phrase")


# What the server looks for in a response's own fields, found in one pass
# (field_traits) and, for heads from start_response, once per distinct head:
# the app thread memoizes them with the head (trioserve.wsgi), so the trio
# side needs no scan of its own per response.
HAS_DATE = 1  # a Date field: the server adds none
HAS_SERVER = 2  # a Server field: the server adds none
HAS_FRAMING = 4  # a Content-Length or Transfer-Encoding field
ASKS_CLOSE = 8  # a Connection field with the close token: no reuse (HTTP/1.1)


def field_traits(headers: Iterable[tuple[bytes, bytes]], known: int = UNCHECKED) -> int:
    """HAS_DATE, HAS_SERVER, HAS_FRAMING and ASKS_CLOSE, or'ed, as ``headers`` have them;
    ``known`` instead, unless it is UNCHECKED (nobody has looked yet)."""
    if known != UNCHECKED:
        return known
    traits = 0
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"date":
            traits |= HAS_DATE
        elif lowered == b"server":
            traits |= HAS_SERVER
        elif lowered == b"content-length" or lowered == b"transfer-encoding":
            traits |= HAS_FRAMING
        elif lowered == b"connection" and b"close" in value.lower():
            traits |= ASKS_CLOSE
    return traits


def declared_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """Rule 2: the Content-Length ``headers`` declare, or None; raises InvalidResponse."""
    length: bytes | None = None
    codings = 0
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-length":
            if length is not None:
                shown = f"{length.decode('latin-1')!r} and {value.decode('latin-1')!r}"
                raise InvalidResponse(f"more than one Content-Length header: {shown}")
            length = value.strip(b" \t")
            if not _CONTENT_LENGTH.fullmatch(length):
                shown = value.decode("latin-1")
                raise InvalidResponse(f"invalid Content-Length {shown!r}")
        elif lowered == b"transfer-encoding":
            codings += 1
            if codings > 1:
                raise InvalidResponse("more than one Transfer-Encoding header")
            if value.strip(b" \t").lower() != b"chunked":
                shown = value.decode("latin-1")
                raise InvalidResponse(f"Transfer-Encoding {shown!r} is not chunked")
    if length is None:
        return None
    if codings:
        raise InvalidResponse("both Content-Length and Transfer-Encoding")
    return int(length)


def body_too_long(declared: int) -> InvalidResponse:
    """Rule 3, the error for a chunk that would pass the declared length."""
    return InvalidResponse(f"response body longer than its Content-Length of {declared}")


def body_too_short(declared: int, sent: int) -> InvalidResponse:
    """Rule 3, the error for a body that ended before the declared length."""
    return InvalidResponse(
        f"response body ended after {sent} of the {declared} bytes its Content-Length declared"
    )


# Where a library's message starts quoting data: a bytes or bytearray repr.
_QUOTED_DATA = re.compile(r"""\bbytearray\(|\bb['"]|(?: from)? <memory at 0x""")


def in_words(message: str, fallback: str = "malformed request") -> str:
    """A protocol library's error message without the data it quotes.

    h11 and h2 put the offending bytes in their messages as Python reprs
    (``bytearray(b'...')``, or hpack's ``<memory at 0x...>``); an error body
    or log line says what was wrong in words instead, so the message is cut
    where the first repr starts. A message that is nothing but a repr
    becomes ``fallback``.
    """
    match = _QUOTED_DATA.search(message)
    if match is not None:
        message = message[: match.start()]
    return message.rstrip(" :,(") or fallback
