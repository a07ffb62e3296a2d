"""HTTP/1.1 request heads: where one ends, what is wrong with it, and two parsers for it.

:class:`trioserve.http1.HTTP1Connection` frames requests itself (it finds
the end of each head, counts a Content-Length body, decodes a chunked one with
:mod:`trioserve.chunked`) and hands each complete head to a *head parser*,
the only part the ``--http1-parser`` option chooses:

* ``h11``: the reference. h11 is the stricter, pure-Python implementation of
  RFC 9112 this project was built on.
* ``httptools``: llhttp, the parser of Node.js (through its Python binding,
  which uvicorn uses too): the same answers for about a twentieth of the time.

Before either sees a head, :func:`head_problem` checks its raw bytes against
the rules trioserve adds to RFC 9112's lenient options (request smuggling
guards), and after it, the connection applies the rest of its own rules to
the fields. So both parsers see only heads that are well-formed in every way
trioserve cares about, and any difference between their verdicts that a test
finds is a bug. Errors come out in trioserve's words (:class:`HeadError`),
never as a parser's message with a repr of the bytes in it.

No trio here, and no I/O.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Protocol

from .events import Headers
from .responses import CONTENT_LENGTH_DIGITS, in_words

# RFC 9112 §3: request-line = method SP request-target SP HTTP-version. The
# method is a token; the target any visible characters (checked further by
# split_target); the version 1.0 or 1.1 (anything else: 505).
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
# RFC 9112 §5.1: field-line = field-name ":" OWS field-value OWS; the name is a token.
_FIELD_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n]*")
# RFC 9110 §5.5: field values are visible characters, spaces and tabs (obs-text
# aside). h11 lets other control characters through; a proxy may strip or split
# on them, so they are refused. CR and LF are checked separately.
_CONTROL_CHARACTER = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# A whole head that needs no closer look: the request line, then field lines of
# a token, a colon and visible characters, spaces and tabs (no obs-fold, no
# control character, CRLF only).
_CLEAN_HEAD = re.compile(
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [\x21-\x7e]+ HTTP/[0-9]\.[0-9]"
    rb"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*)*"
)
# A whole head, its empty line included, that needs no closer look: clean as
# _CLEAN_HEAD and without a framing field (the common bodiless request), found
# in the one pass that also finds where it ends.
_PLAIN_HEAD = re.compile(
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [\x21-\x7e]+ HTTP/[0-9]\.[0-9]"
    rb"(?:\r\n(?!(?i:content-length|transfer-encoding):)"
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*)*"
    rb"\r\n\r\n"
)
# Fields whose values the connection must check before a parser sees them.
_FRAMING_FIELD = re.compile(rb"\n(?i:content-length|transfer-encoding):")
# The start of a request line: a method so far, or a method and its space.
_METHOD_SO_FAR = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*(?: |\Z)")
# Where a head ends: a line ending (CRLF, or a bare LF that h11 would take)
# and an empty line.
_HEAD_END = re.compile(rb"\r?\n\r?\n")


_LONG_CONTENT_LENGTH = f"Content-Length of more than {CONTENT_LENGTH_DIGITS} digits"


class HeadError(Exception):
    """A request head trioserve refuses: the status to answer with, and why in words."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def head_end(buffer: bytes | bytearray, start: int = 0) -> int:
    """Where the head beginning at ``start`` ends (just past its empty line), or -1.

    Raises HeadError for a head that ends with a bare LF: h11 would read it,
    a front proxy might not (request smuggling).
    """
    match = _HEAD_END.search(buffer, start)
    if match is None:
        return -1
    if match[0] != b"\r\n\r\n":
        raise HeadError(400, "bare LF line ending")
    return match.end()


def plain_head_end(buffer: bytes | bytearray, start: int = 0) -> int:
    """Where a complete head beginning at ``start`` ends if :func:`head_problem` would
    find nothing wrong with it at a glance; else -1 (it is incomplete, has a framing
    field, or needs the closer look: ask :func:`head_end` and :func:`head_problem`)."""
    match = _PLAIN_HEAD.match(buffer, start)
    return -1 if match is None else match.end()


def partial_head_problem(buffer: bytes | bytearray, start: int) -> str | None:
    """What the start of a head already shows to be wrong, before the rest arrives.

    Its request line, once complete, or the method so far: a client speaking
    something else (TLS on the cleartext port, say) is told at once rather
    than after a timeout.
    """
    line_end = buffer.find(b"\r\n", start)
    if line_end >= 0:
        return (
            None if _REQUEST_LINE.fullmatch(buffer, start, line_end) else "malformed request line"
        )
    method = _METHOD_SO_FAR.match(buffer, start)
    if method is None:
        return "malformed request line"
    return None


def head_problem(head: bytes) -> tuple[int, str] | None:
    """What is wrong with a complete raw head (CRLF line endings, without the empty line):
    the status to answer with, and why, or None.

    h11 follows RFC 9112's lenient options: it merges identical duplicate or
    list-form Content-Length values, accepts bare LF line endings, unfolds
    obs-fold lines and lets control characters through in field values; llhttp
    has leniencies of its own. Each is harmless alone, but a front proxy that
    reads the same bytes differently is how request smuggling starts, so
    trioserve refuses them (RFC 9112 §2.2, §5.2, §6.3 and RFC 9110 §5.5 allow
    rejecting them), and the framing fields too, the same way whichever parser
    then reads the head.
    """
    if _CLEAN_HEAD.fullmatch(head) is not None and _FRAMING_FIELD.search(head) is None:
        return None  # the common case, in one pass: well-formed, no framing field
    without_crlf = head.replace(b"\r\n", b"")
    if b"\n" in without_crlf or b"\r" in without_crlf:
        return 400, "bare LF or CR in the request head"
    if _CONTROL_CHARACTER.search(head):
        return 400, "control character in the request head"
    lines = head.split(b"\r\n")
    if _REQUEST_LINE.fullmatch(lines[0]) is None:
        return 400, "malformed request line"
    fields = lines[1:]
    for line in fields:
        if line[:1] in (b" ", b"\t"):
            return 400, "obsolete line folding"
        if _FIELD_LINE.fullmatch(line) is None:
            return 400, "malformed header line"
    lengths = codings = 0
    for line in fields:
        name = line[: line.index(b":")].lower()
        if name == b"content-length":
            lengths += 1
            if lengths > 1:
                return 400, "more than one Content-Length"
            value = line[15:].strip(b" \t")
            if b"," in value:
                return 400, "list-form Content-Length"
            if not value.isdigit():
                return 400, "invalid Content-Length"
            if len(value) > CONTENT_LENGTH_DIGITS:
                # The parsers bound it too, but not alike (h11: 20 characters,
                # leading zeros counted; llhttp: 2**64 - 1), so each would
                # refuse values the other takes: bounded here first, below both.
                return 400, _LONG_CONTENT_LENGTH
        elif name == b"transfer-encoding":
            codings += 1
            if codings > 1:
                return 501, "more than one Transfer-Encoding header"
            if line[18:].strip(b" \t").lower() != b"chunked":
                return 501, "unsupported Transfer-Encoding"
    if lengths and codings:
        # RFC 9112 §6.3: a sender MUST NOT send both; a server MAY reject.
        # Accepting would let a front proxy and us disagree on where the
        # body ends (request smuggling), so we always reject.
        return 400, "both Content-Length and Transfer-Encoding"
    return None


@dataclass(slots=True)
class ParsedHead:
    """A request head as a parser read it: field names lower-cased, values trimmed."""

    method: bytes
    target: bytes
    http_version: bytes  # b"1.0" or b"1.1"
    headers: Headers


class HeadParser(Protocol):
    """What :class:`~trioserve.http1.HTTP1Connection` needs of a parser."""

    name: str

    def parse(self, head: bytes) -> ParsedHead:
        """Parse one complete head (ending with its empty line); raises HeadError."""
        ...

    def release(self) -> None:
        """Between requests: drop what the next ``parse`` can build again."""
        ...


# ---- h11: the reference ---------------------------------------------------------------

# h11's RemoteProtocolError messages in trioserve's words, looked up by the
# start of h11's text once the data it quotes is cut off (responses.in_words).
# A message not listed is shown as in_words leaves it, so a change of wording
# in h11 costs only polish, never a repr on the wire.
_H11_WORDINGS = (
    ("illegal request line", "malformed request line"),
    ("no request line", "no request line"),
    ("illegal header line", "malformed header line"),
    ("continuation line at start", "obsolete line folding"),
    ("illegal chunk header", "malformed chunk size line"),
    ("malformed chunk footer", "chunk data not followed by CRLF"),
    ("receive buffer too long", "request header fields too large"),
    ("missing mandatory host", "missing Host header"),
    ("found multiple host", "more than one Host header"),
    ("conflicting content-length", "conflicting Content-Length headers"),
    ("bad content-length", "invalid Content-Length"),
    ("multiple transfer-encoding", "more than one Transfer-Encoding header"),
    ("only transfer-encoding: chunked", "unsupported Transfer-Encoding"),
    ("illegal method", "invalid method"),
    ("illegal target", "invalid request target"),
    ("illegal header name", "invalid header name"),
    ("illegal header value", "invalid header value"),
    ("peer unexpectedly closed", "connection closed in the middle of a request"),
)


def describe(exc: Exception) -> str:
    """What a parser's error says was wrong, in words, with no repr."""
    text = in_words(str(exc))
    lowered = text.lower()
    for start, wording in _H11_WORDINGS:
        if lowered.startswith(start):
            return wording
    return text


class H11HeadParser:
    """Heads read by h11, each by a fresh ``h11.Connection`` (only heads are fed to it)."""

    name = "h11"

    def __init__(self, max_head_size: int) -> None:
        import h11  # here: the httptools parser alone never loads it

        self._h11 = h11
        self._max_head_size = max_head_size

    def parse(self, head: bytes) -> ParsedHead:
        h11 = self._h11
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head_size)
        connection.receive_data(head)
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as exc:
            raise HeadError(exc.error_status_hint, describe(exc)) from None
        if not isinstance(event, h11.Request):  # pragma: no cover - a whole head was fed
            raise HeadError(400, "malformed request")
        return ParsedHead(
            bytes(event.method), bytes(event.target), bytes(event.http_version), list(event.headers)
        )

    def release(self) -> None:
        pass  # each head gets a fresh h11.Connection anyway


# ---- httptools (llhttp) ---------------------------------------------------------------


class HttptoolsHeadParser:
    """Heads read by llhttp through httptools, fed only the head.

    One llhttp parser serves a connection's heads for as long as each request
    ends with its head (no body) and llhttp would read another message after it
    (asked when the message completes): llhttp is then ready for the next one.
    A request with a body leaves it waiting for that body, which goes
    elsewhere, and llhttp refuses anything after a message it took as the
    connection's last, so in those cases the next head gets a new parser.
    """

    name = "httptools"

    def __init__(self, max_head_size: int) -> None:
        import httptools  # an optional dependency: imported only when chosen

        self._httptools = httptools
        self._max_head_size = max_head_size
        self._reference: H11HeadParser | None = None  # for methods llhttp does not know
        self._parser: httptools.HttpRequestParser | None = None
        self._target = b""
        self._headers: Headers = []
        self._reusable = False

    # Callbacks of httptools.HttpRequestParser (the head only).
    def on_url(self, url: bytes) -> None:
        self._target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        value = value.strip(b" \t")
        if name == b"transfer-encoding":
            # h11 hands it over in lower case (head_problem let only "chunked"
            # through, in any case): the app sees the same either way.
            value = value.lower()
        self._headers.append((name, value))

    def on_message_complete(self) -> None:
        # Asked here, while llhttp still holds this message's flags: once the
        # message is over it resets them, and should_keep_alive() says yes even
        # after "Proxy-Connection: close", which llhttp obeys (and trioserve, as
        # h11, ignores): the next head would then be refused.
        assert self._parser is not None
        self._reusable = self._parser.should_keep_alive()

    def parse(self, head: bytes) -> ParsedHead:
        httptools = self._httptools
        self._target = b""
        headers: Headers = []
        self._headers = headers
        self._reusable = False
        parser = self._parser
        if parser is None:
            parser = self._parser = httptools.HttpRequestParser(self)
            # The framing fields were checked already (head_problem), more strictly
            # than llhttp does and as h11 reads them ("chunked" with OWS around
            # it): llhttp's own judgement of them would only make the two differ.
            parser.set_dangerous_leniencies(lenient_transfer_encoding=True)
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            self._reusable = False  # an Upgrade request: read whole, but llhttp stops there
        except httptools.HttpParserError as exc:
            self._reusable = False
            if isinstance(exc, httptools.HttpParserInvalidMethodError) or head[:4] == b"PRI ":
                # llhttp knows a fixed list of methods (in capitals only), and takes
                # PRI for the start of an HTTP/2 preface; RFC 9110 §9.1 lets a
                # method be any token, which the request line was checked to have.
                # The reference parser reads such a head, as it would alone.
                if self._reference is None:
                    self._reference = H11HeadParser(self._max_head_size)
                return self._reference.parse(head)
            raise HeadError(400, describe(exc)) from None
        finally:
            if not self._reusable:
                self._parser = None  # the next head gets a fresh one
        target, self._target = self._target, b""
        self._headers = []  # the request's own list goes with it, not kept while idle
        return ParsedHead(parser.get_method(), target, parser.get_http_version().encode(), headers)

    def release(self) -> None:
        # llhttp's parser is about 700 bytes: a dozing connection should not
        # hold one, and making the next is cheap next to a request.
        self._parser = None


def httptools_available() -> bool:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return False
    return True


def head_parser(choice: str, max_head_size: int) -> HeadParser:
    """The parser ``--http1-parser`` names: ``h11``, ``httptools``, or ``auto``
    (httptools when it can be imported, else h11)."""
    if choice == "httptools" or (choice == "auto" and httptools_available()):
        return HttptoolsHeadParser(max_head_size)
    return H11HeadParser(max_head_size)


# ---- targets and upgrade settings -----------------------------------------------------

# RFC 9112 §3.2.2 absolute-form: scheme "://" authority, then path and query.
_ABSOLUTE_FORM = re.compile(rb"(?i:https?)://([^/?#@]+)([/?][^#]*)?")


def split_target(method: bytes, target: bytes) -> tuple[bytes, bytes | None, str | None]:
    """The origin-form target, the authority of an absolute-form one, and any problem.

    RFC 9112 §3.2: a server takes origin-form (``/path?query``), ``*`` for
    OPTIONS, and absolute-form (``http://host/path``, whose host replaces the
    Host field, §3.2.2). A WSGI app cannot answer CONNECT's authority-form, and
    anything else has no PATH_INFO to give it.
    """
    if method == b"CONNECT":  # whatever its target: a 2xx would turn the connection into a tunnel
        return target, None, "CONNECT is not supported"
    if target[:1] == b"/":
        return target, None, None
    if target == b"*" and method == b"OPTIONS":
        return target, None, None
    match = _ABSOLUTE_FORM.fullmatch(target)
    if match is None:
        return target, None, "invalid request target"
    path = match[2] or b"/"
    if path[:1] == b"?":
        path = b"/" + path
    return path, match[1], None


def valid_settings(value: bytes) -> bool:
    """Is ``value`` a well-formed ``HTTP2-Settings`` header (base64url of 6-byte entries)?"""
    try:
        padded = value + b"=" * (-len(value) % 4)
        decoded = base64.b64decode(padded, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(decoded) % 6 == 0
