"""HTTP/2 request header fields: RFC 9113 §8's rules, checked in one pass.

h2 can check received fields itself, as a chain of six generators, one per
rule, over every field of every request; its character check walks each
name and value byte by byte in Python. That chain was the largest single
item of an HTTP/2 request's time on the trio thread. So
:class:`trioserve.http2.HTTP2Connection` turns h2's inbound validation off
and calls :func:`request_fields` instead, which applies the same rules while
it picks out the pseudo-header fields the connection needs anyway:

* field names are lowercase visible ASCII, with a colon only as a
  pseudo-header field's first character (§8.2.1);
* values hold no NUL, CR or LF and neither start nor end with SP or HTAB
  (§8.2.1);
* no connection-specific field, and ``te`` only as ``trailers`` (§8.2.2);
* pseudo-header fields come first, once each, and are a request's own
  (§8.3); ``:method`` is always there, ``:scheme`` and ``:path`` are too
  except for a plain CONNECT (which has neither), and ``:protocol`` only
  comes with CONNECT (RFC 8441); ``:path`` is not empty;
* ``:authority`` or ``host`` is there, at most one ``host``, and the two
  agree when both are (h2's rule, RFC 9113 §8.3.1 in spirit).

A request that breaks one is malformed (§8.1.1): :class:`MalformedFields`,
which the connection answers with RST_STREAM(PROTOCOL_ERROR), a stream error,
where h2 would have ended the whole connection. h2's own validator stays the
reference: ``tests/test_http2_fields.py`` checks that both accept and refuse
the same field lists.

The character rules are pure functions of one field, and most fields repeat
from request to request (``host``, ``user-agent``, ``accept``), so fields
that passed them are remembered, a bounded set shared by every connection.

No trio here, and no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

from .events import Headers
from .responses import CONTENT_LENGTH_DIGITS

__all__ = ["MalformedFields", "RequestFields", "request_fields", "trailer_problem"]

# §8.2.1: a name is visible ASCII without uppercase letters or colons, bar
# the leading colon of a pseudo-header field. Empty names fail the ``+``.
_FIELD_NAME = re.compile(rb":?[\x21-\x39\x3b-\x40\x5b-\x7e]+").fullmatch
_SP, _HTAB = 0x20, 0x09

# §8.2.2: fields that only mean something to one HTTP/1.1 hop.
CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"}
)
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})

# Fields known to pass the character rules. Bounded in entries and size, and
# emptied when full: a client sending ever new fields only gets the full check.
_CLEAN_ENTRIES = 512
_CLEAN_FIELD_BYTES = 256
_clean: set[tuple[bytes, bytes]] = set()


class MalformedFields(Exception):
    """A request's (or trailer section's) fields break RFC 9113 §8; ``str()`` says which rule."""


class RequestFields(NamedTuple):
    """What :func:`request_fields` finds in a well-formed request's fields."""

    method: bytes
    path: bytes | None
    """``None`` only for a plain CONNECT."""
    scheme: bytes | None
    """``None`` only for a plain CONNECT."""
    authority: bytes | None
    headers: Headers
    """The regular fields in order, ``cookie`` fields joined into one at the end (§8.2.3)."""
    content_length: int | None
    expects_continue: bool


def _character_problem(name: bytes, value: bytes) -> str | None:
    if _FIELD_NAME(name) is None:
        return "empty field name" if not name else "invalid character in a field name"
    if value:
        if b"\r" in value or b"\n" in value or b"\x00" in value:
            return "CR, LF or NUL in a field value"
        if value[0] in (_SP, _HTAB) or value[-1] in (_SP, _HTAB):
            return "whitespace around a field value"
    return None


def _check_characters(field: tuple[bytes, bytes]) -> None:
    if field in _clean:
        return
    name, value = field
    problem = _character_problem(name, value)
    if problem is not None:
        raise MalformedFields(problem)
    if len(name) + len(value) <= _CLEAN_FIELD_BYTES:
        if len(_clean) >= _CLEAN_ENTRIES:
            _clean.clear()
        _clean.add(field)


def _regular_problem(name: bytes, value: bytes) -> str | None:
    """The §8.2.2 rules for a field that is not a pseudo-header field."""
    if name in CONNECTION_SPECIFIC:
        return "connection-specific field"
    if name == b"te" and value.lower() != b"trailers":
        return "te other than trailers"
    return None


def request_fields(fields: Iterable[tuple[bytes, bytes]]) -> RequestFields:
    """Check a request's decoded header fields and pick out what a server needs.

    Raises:
      MalformedFields: the request is malformed (RFC 9113 §8.1.1).
    """
    pseudo: dict[bytes, bytes] = {}
    headers: Headers = []
    cookies: list[bytes] = []
    host: bytes | None = None
    content_length: int | None = None
    expects_continue = False
    for field in fields:
        _check_characters(field)
        name, value = field
        if name[0] == 0x3A:  # b":"
            if headers or cookies:
                raise MalformedFields("pseudo-header field after a regular one")
            if name in pseudo:
                raise MalformedFields("repeated pseudo-header field")
            if name not in _REQUEST_PSEUDO:
                raise MalformedFields("unknown or response pseudo-header field")
            pseudo[name] = value
            continue
        problem = _regular_problem(name, value)
        if problem is not None:
            raise MalformedFields(problem)
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"host":
            if host is not None:
                raise MalformedFields("more than one host field")
            host = value
        elif name == b"content-length":
            # h2 leaves it to us (trioserve.http2._H2Connection). Digits, at most
            # as many as HTTP/1.1 allows, and any other one the same number.
            if not value.isdigit():
                raise MalformedFields("invalid content-length")
            if len(value) > CONTENT_LENGTH_DIGITS:
                raise MalformedFields(f"content-length of more than {CONTENT_LENGTH_DIGITS} digits")
            length = int(value)
            if content_length is not None and length != content_length:
                raise MalformedFields("conflicting content-length fields")
            content_length = length
        elif name == b"expect":
            expects_continue = value.lower() == b"100-continue"
        headers.append(field)
    if cookies:
        headers.append((b"cookie", b"; ".join(cookies)))

    method = pseudo.get(b":method")
    if method is None:
        raise MalformedFields("no :method")
    path = pseudo.get(b":path")
    scheme = pseudo.get(b":scheme")
    if method == b"CONNECT" and b":protocol" not in pseudo:
        if path is not None or scheme is not None:
            raise MalformedFields("CONNECT with :scheme or :path")
    else:
        if path is None or scheme is None:
            raise MalformedFields("no :scheme or no :path")
        if b":protocol" in pseudo and method != b"CONNECT":
            raise MalformedFields(":protocol without CONNECT")
        if not path:
            raise MalformedFields("empty :path")
    authority = pseudo.get(b":authority")
    if authority is None and host is None:
        raise MalformedFields("neither :authority nor host")
    if authority is not None and host is not None and authority != host:
        raise MalformedFields(":authority and host differ")
    return RequestFields(method, path, scheme, authority, headers, content_length, expects_continue)


def trailer_problem(fields: Iterable[tuple[bytes, bytes]]) -> str | None:
    """What is wrong with a trailer section's fields (RFC 9113 §8.1), or None."""
    try:
        for field in fields:
            _check_characters(field)
            name, value = field
            if name[0] == 0x3A:
                return "pseudo-header field in trailers"
            problem = _regular_problem(name, value)
            if problem is not None:
                return problem
    except MalformedFields as exc:
        return str(exc)
    return None
