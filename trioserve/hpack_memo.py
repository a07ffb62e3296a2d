"""HPACK coders that remember header blocks which left the dynamic table as it was.

HPACK is stateful: how a header list encodes, and what a block decodes to,
depends on the dynamic table both ends keep in step. But a block that neither
inserted nor evicted anything (every field indexed, or sent as a literal that
is not indexed) is a pure function of the table it met; while the table stays
exactly that, the same input gives the same output. Responses repeat their
headers (``:status``, ``content-type``, ``server``, ``date`` within a second)
and clients repeat theirs (an API client polling one URL, a load balancer's
health check, a load generator), so most blocks of a busy connection are of
that kind, and hpack's pure-Python coders were about 15% of an HTTP/2 hello
request's time on the trio thread (cProfile).

So each connection's coders keep a few such blocks, and forget them all the
moment anything changes the table: an insertion or eviction (seen as a new
first entry, or a new length), a size update (which :class:`SizeUpdatingEncoder`
never drops, unlike hpack's own encoder), or a change of the limits a decode is
checked against. A remembered block is therefore only ever replayed against the
very table it was computed with, and what goes on the wire, and what h2 sees, is
byte for byte what hpack itself would have produced (``tests/test_hpack_memo.py``
checks both against plain hpack coders, the encoder with that fix).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import hpack

__all__ = ["MemoDecoder", "MemoEncoder", "SizeUpdatingEncoder"]

# Blocks remembered per connection: enough for a handful of response shapes or
# request shapes at once, and a bound on what an idle HTTP/2 connection holds.
MEMO_ENTRIES = 16
# Longer blocks are not remembered: they are rare, and repeating ones are not
# where the cost is.
MEMO_BLOCK_BYTES = 1024

Fields = list[tuple[bytes, bytes]]


def _table_mark(table: hpack.table.HeaderTable) -> tuple[int, object, int]:
    """What changes whenever the table's contents or size do (see :func:`_unchanged`)."""
    entries = table.dynamic_entries
    return len(entries), entries[0] if entries else None, table.maxsize


def _unchanged(table: hpack.table.HeaderTable, mark: tuple[int, object, int]) -> bool:
    """Is the table as it was when ``mark`` was taken?

    Insertions go to the front of the deque as new tuple objects, so a block
    that inserted shows a different first entry *object* even when an
    eviction kept the length and the new entry is equal to the old one (the
    mark holds the old one, so the new one cannot reuse its identity); one
    that only evicted (an oversized entry clearing the table) shows a
    different length.
    """
    length, first, size = mark
    entries = table.dynamic_entries
    return (
        len(entries) == length
        and table.maxsize == size
        and (entries[0] if entries else None) is first
    )


def _remember(memo: dict[Any, Any], key: Any, value: Any) -> None:
    """Keep ``value`` under ``key``; at the bound, start afresh."""
    if len(memo) >= MEMO_ENTRIES:
        memo.clear()
    memo[key] = value


class SizeUpdatingEncoder(hpack.Encoder):
    """hpack's encoder, except that a table size update still to be sent stays so.

    hpack 4 works out whether one is due from the last size set alone, so
    setting the size it already has drops an update still pending. h2 sets it
    for every SETTINGS frame that names SETTINGS_HEADER_TABLE_SIZE, changed or
    not: a peer that sends the same smaller size twice before our next header
    block would then get no size update at its start, which RFC 7541 §4.2
    requires, and would keep entries this side has evicted.
    """

    @property
    def header_table_size(self) -> int:
        return self.header_table.maxsize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        table = self.header_table
        pending = table.resized
        table.maxsize = value
        if table.resized:
            self.table_size_changes.append(value)
        elif pending:
            table.resized = True  # (the change before this one still goes out)


class MemoEncoder(SizeUpdatingEncoder):
    """h2's HPACK encoder, with :meth:`encode_fields` for trioserve's response heads.

    h2's own calls (trailers, anything sent through ``send_headers``) go
    through :meth:`encode` as before and forget every remembered block, since
    they may change the table and their header tuples may carry
    never-index marks that plain tuples compare equal to.
    """

    def __init__(self) -> None:
        super().__init__()
        self._memo: dict[tuple[tuple[bytes, bytes], ...], bytes] = {}

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        self._memo.clear()
        block: bytes = super().encode(headers, huffman)
        return block

    def encode_fields(self, fields: Fields) -> bytes:
        """Encode a response head of plain ``(name, value)`` byte tuples."""
        memo = self._memo
        table = self.header_table
        if table.resized:
            # A size update must go out first, and it moves the table.
            memo.clear()
            fresh: bytes = super().encode(fields)
            return fresh
        key = tuple(fields)
        block = memo.get(key)
        if block is None:
            mark = _table_mark(table)
            block = super().encode(fields)
            if not _unchanged(table, mark):
                memo.clear()  # the table moved: every remembered block is stale
            elif len(block) <= MEMO_BLOCK_BYTES:
                _remember(memo, key, block)
        return block


class MemoDecoder(hpack.Decoder):
    """h2's HPACK decoder, replaying blocks that did not change the table."""

    def __init__(self, max_header_list_size: int) -> None:
        super().__init__(max_header_list_size)
        self._memo: dict[bytes, tuple[hpack.HeaderTuple, ...]] = {}
        self._limits = (self.max_header_list_size, self.max_allowed_table_size)

    def decode(self, data: bytes, raw: bool = False) -> Iterable[hpack.HeaderTuple]:
        memo = self._memo
        limits = (self.max_header_list_size, self.max_allowed_table_size)
        if limits != self._limits:
            # The same block may now be refused (or accepted): decode afresh.
            memo.clear()
            self._limits = limits
        cacheable = raw and type(data) is bytes and len(data) <= MEMO_BLOCK_BYTES
        if cacheable:
            remembered = memo.get(data)
            if remembered is not None:
                return list(remembered)
        mark = _table_mark(self.header_table)
        try:
            headers = super().decode(data, raw)
        except BaseException:
            memo.clear()  # it may have changed the table before it failed
            raise
        if not _unchanged(self.header_table, mark):
            memo.clear()  # the table moved: every remembered block is stale
        elif cacheable:
            _remember(memo, data, tuple(headers))
        return headers
