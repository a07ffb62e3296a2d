"""A sans-IO scan of a chunked request body's framing, to refuse chunk sizes early.

The HTTP/1.1 parser reads chunked bodies itself; this follows the same bytes
beside it, to see what the parser does not show or does not check:

* h11 accepts chunk sizes of up to 20 hex digits (more than 64 bits) and then
  waits for the data, until the body timeout or the body limit. A front proxy
  that keeps sizes in 64 bits reads such a size differently (request
  smuggling), and a size the body limit cannot hold is better refused at once.
* h11 does not expose a chunk's size before its data has arrived.

So the scan refuses, before the parser acts on them: a chunk size that is not
1 to 16 hex digits (400, at the seventeenth digit); a size that does not fit
in what the body limit still allows (413, at the byte after its digits, before
any of its data); a malformed chunk extension,
a bare CR or LF, chunk data not followed by CRLF, and a trailer field with a
control character or obs-fold (400, as in the request head). Whether a body
is refused, and with which status, never depends on how its bytes were cut
into reads. It keeps no body data: at most one line (bounded) and a few counters.

It depends on no parser. :class:`ChunkedScan` is fed every byte that follows
a chunked request's head, in order, whatever parser reads them (h11 today, a
second HTTP/1.1 backend later), and stops at the end of the body: bytes past
it belong to the next request and are not looked at.

Grammar (RFC 9112 §7.1)::

    chunked-body   = *chunk last-chunk trailer-section CRLF
    chunk          = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
    last-chunk     = 1*("0") [ chunk-ext ] CRLF
    chunk-ext      = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
    trailer-section = *( field-line CRLF )
"""

from __future__ import annotations

import enum
import re
from typing import Final, NamedTuple

# The most hex digits a chunk size may have: 16 fill 64 bits.
MAX_SIZE_DIGITS = 16

# The longest chunk-size line (size and extensions) accepted. Clients rarely
# send extensions at all; a line this long is an attack on the parser.
MAX_CHUNK_LINE = 4096

_LEADING_HEX = re.compile(rb"[0-9A-Fa-f]+")
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
# What may follow the size on its line: extensions, and (as h11 and most
# servers allow) trailing whitespace.
_EXTENSIONS = re.compile(
    rb"(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*"
    rb"[ \t]*"
)
# RFC 9110 §5.5: a field line holds no control character but HTAB.
_FIELD_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class Refusal(NamedTuple):
    """Why a chunked body is refused: the status to answer with, and the reason in words."""

    status: int
    reason: str


class _Stage(enum.Enum):
    SIZE_LINE = enum.auto()  # a chunk-size line: size, extensions, CRLF
    DATA = enum.auto()  # chunk data, ``_left`` bytes still to come
    DATA_END = enum.auto()  # the CRLF after chunk data, ``_left`` bytes of it still to come
    TRAILERS = enum.auto()  # trailer field lines, up to an empty line
    DONE = enum.auto()  # the body has ended; what follows is not ours
    REFUSED = enum.auto()


# The stages as module constants, which the code below reads instead: on Python
# 3.11 reading an attribute of an Enum class goes through EnumType's ``__getattr__``
# hook (see trioserve.http1's _Input), and every chunk reads a few.
_STAGE_SIZE_LINE: Final = _Stage.SIZE_LINE
_STAGE_DATA: Final = _Stage.DATA
_STAGE_DATA_END: Final = _Stage.DATA_END
_STAGE_TRAILERS: Final = _Stage.TRAILERS
_STAGE_DONE: Final = _Stage.DONE
_STAGE_REFUSED: Final = _Stage.REFUSED


class ChunkedScan:
    """Follows one chunked request body through its framing (see module docstring).

    Args:
      max_body_size: chunk data allowed in all, 0 for no limit (413 beyond).
      max_trailer_size: bytes allowed for the trailer section (431 beyond).
    """

    __slots__ = ("_announced", "_left", "_line", "_max_body", "_max_trailers", "_stage")

    def __init__(self, *, max_body_size: int = 0, max_trailer_size: int = 64 * 1024) -> None:
        self._max_body = max_body_size
        self._max_trailers = max_trailer_size
        self._stage = _STAGE_SIZE_LINE
        self._line = b""  # the part of the current line received so far
        self._left = 0  # DATA, DATA_END: bytes still to come; TRAILERS: bytes so far
        self._announced = 0  # chunk data announced by the sizes read so far

    @property
    def done(self) -> bool:
        """Has the body ended (last chunk and trailer section read)?"""
        return self._stage is _STAGE_DONE

    def feed(self, data: bytes | bytearray) -> Refusal | None:
        """Scan the next bytes of the body; the refusal, the first time one is due.

        After a refusal, and once the body has ended, further bytes are ignored.
        """
        return self._scan(data, None)[0]

    def decode(self, data: bytes) -> tuple[Refusal | None, list[bytes], int]:
        """Scan ``data`` and take the chunk data out of it.

        Returns the refusal (if one is due), the chunk data found, in order, and
        how many bytes of ``data`` belong to the body: once it has ended (see
        :attr:`done`) the rest is the next request's.
        """
        pieces: list[bytes] = []
        refusal, consumed = self._scan(data, pieces)
        return refusal, pieces, consumed

    def _scan(
        self, data: bytes | bytearray, pieces: list[bytes] | None
    ) -> tuple[Refusal | None, int]:
        if self._stage is _STAGE_DONE or self._stage is _STAGE_REFUSED:
            return None, 0
        if type(data) is not bytes:
            data = bytes(data)  # one copy, so lines are found without copying the rest
        position = 0
        size = len(data)
        refusal = None
        while position < size and refusal is None:
            stage = self._stage
            if stage is _STAGE_DATA:
                step = min(self._left, size - position)
                if pieces is not None:
                    pieces.append(data[position : position + step])
                position += step
                self._left -= step
                if not self._left:
                    self._stage = _STAGE_DATA_END
                    self._left = 2
            elif stage is _STAGE_DATA_END:
                if data[position] != b"\r\n"[2 - self._left]:
                    refusal = Refusal(400, "chunk data not followed by CRLF")
                position += 1
                self._left -= 1
                if not self._left:
                    self._stage = _STAGE_SIZE_LINE
            elif stage is _STAGE_DONE:
                break
            else:
                end = data.find(b"\n", position)
                if end < 0:
                    self._line += data[position:]
                    position = size
                    refusal = self._check_partial_line()
                else:
                    line = self._line + data[position : end + 1]
                    self._line = b""
                    position = end + 1
                    refusal = self._end_of_line(line)
        if refusal is not None:
            self._stage = _STAGE_REFUSED
            self._line = b""
        return refusal, position

    # ---- internals ---------------------------------------------------------

    # A refusal's status must not depend on how the bytes were cut into reads, so a
    # whole line is checked in the order an unfinished one is: first what the bytes
    # so far already show (size, lengths), then what only the line's end can.

    def _check_partial_line(self) -> Refusal | None:
        """What an unfinished line already shows. More bytes can only make these worse:
        a size of too many digits or too large, a line or trailer section too long."""
        line = self._line
        if self._stage is _STAGE_TRAILERS:
            return self._check_trailer_size(line)
        return self._check_size(line, ended=False) or self._check_line_length(line)

    def _check_size(self, line: bytes, *, ended: bool = True) -> Refusal | None:
        """Too many digits: 400 at the seventeenth. Too large for the limit: 413, once
        the digits are complete (``ended``, or a byte after them), so that a size of
        too many digits is always a 400, however its bytes were cut into reads."""
        digits = _hex_digits(line)
        if digits > MAX_SIZE_DIGITS:
            return Refusal(400, "chunk size of more than 16 hex digits")
        complete = ended or digits < len(line)
        limit = self._max_body
        if complete and digits and limit and self._announced + int(line[:digits], 16) > limit:
            return Refusal(413, "chunk size beyond the request body limit")
        return None

    def _check_line_length(self, line: bytes) -> Refusal | None:
        if len(line) > MAX_CHUNK_LINE:
            return Refusal(400, "chunk extension too long")
        return None

    def _check_trailer_size(self, line: bytes) -> Refusal | None:
        if self._left + len(line) > self._max_trailers:
            return Refusal(431, "trailer section too large")
        return None

    def _end_of_line(self, line: bytes) -> Refusal | None:
        """A whole line, LF included."""
        ended = line[-2:] == b"\r\n"
        text = line[:-2] if ended else line[:-1]
        if self._stage is _STAGE_TRAILERS:
            refusal = self._check_trailer_size(line)
        else:
            refusal = self._check_size(text) or self._check_line_length(text)
        if refusal is not None:
            return refusal
        if not ended or b"\r" in text:
            return Refusal(400, "bare CR or LF in the chunked body framing")
        if self._stage is _STAGE_TRAILERS:
            return self._trailer_line(text)
        digits = _hex_digits(text)
        if not digits:
            return Refusal(400, "chunk size missing or not hex digits")
        if not _EXTENSIONS.fullmatch(text, digits):
            return Refusal(400, "malformed chunk size line")
        chunk = int(text[:digits], 16)
        self._announced += chunk
        if chunk:
            self._stage = _STAGE_DATA
            self._left = chunk
        else:
            self._stage = _STAGE_TRAILERS
            self._left = 0
        return None

    def _trailer_line(self, line: bytes) -> Refusal | None:
        if not line:
            self._stage = _STAGE_DONE
            return None
        self._left += len(line) + 2
        if line[:1] in (b" ", b"\t"):
            return Refusal(400, "obsolete line folding in the trailer section")
        if _FIELD_CONTROL.search(line):
            return Refusal(400, "control character in the trailer section")
        return None


def _hex_digits(line: bytes) -> int:
    """How many hex digits ``line`` starts with."""
    match = _LEADING_HEX.match(line)
    return match.end() if match else 0
