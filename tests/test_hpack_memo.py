"""trioserve.hpack_memo: remembered HPACK blocks are byte for byte what hpack produces.

The reference is a plain hpack coder fed the same operations in the same
order (the encoder as trioserve's base class fixes it: a size update it made due
is never dropped); any stale replay (a block reused after the table moved) shows as a
difference in bytes or in decoded headers.
"""

from __future__ import annotations

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioserve.hpack_memo import MEMO_ENTRIES, MemoDecoder, MemoEncoder, SizeUpdatingEncoder

# Few distinct names and values, so lists repeat, fields get indexed, and the
# table fills, evicts and shifts indexes under a small table size.
NAMES = [b":status", b"content-type", b"server", b"date", b"x-a", b"x-b"]
VALUES = [b"200", b"404", b"text/plain", b"trioserve", b"v" * 40, b"w" * 300, b"1"]
FIELD = st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES))
FIELDS = st.lists(FIELD, min_size=1, max_size=5)

# An operation: encode a response head, let h2 encode something itself
# (trailers), or change the table size as a peer's SETTINGS would.
OPERATION = st.one_of(
    st.tuples(st.just("head"), FIELDS),
    st.tuples(st.just("h2"), FIELDS),
    st.tuples(st.just("size"), st.sampled_from([0, 64, 256, 4096])),
)


def run_encoders(operations: list[tuple[str, object]]) -> tuple[list[bytes], list[bytes]]:
    memo, plain = MemoEncoder(), SizeUpdatingEncoder()
    got, want = [], []
    for kind, arg in operations:
        if kind == "size":
            memo.header_table_size = plain.header_table_size = arg
            continue
        fields = list(arg)  # type: ignore[call-overload]
        got.append(memo.encode_fields(fields) if kind == "head" else memo.encode(fields))
        want.append(plain.encode(fields))
    return got, want


@settings(max_examples=300, deadline=None)
@given(st.lists(OPERATION, max_size=30))
def test_encoded_blocks_match_plain_hpack(operations: list[tuple[str, object]]) -> None:
    got, want = run_encoders(operations)
    assert got == want


def test_a_head_repeated_after_the_table_moved_is_encoded_afresh() -> None:
    # The shape a stale replay would break: A is remembered while its fields
    # are indexed, then B's insertions shift those indexes.
    a = [(b":status", b"200"), (b"x-a", b"1")]
    b = [(b"x-b", b"v" * 40)]
    got, want = run_encoders([("head", a), ("head", a), ("head", b), ("head", a)])
    assert got == want
    assert got[1] != got[3]  # the same head, different bytes: the index moved


def test_a_repeated_head_is_replayed_without_encoding() -> None:
    encoder = MemoEncoder()
    head = [(b":status", b"200"), (b"server", b"trioserve")]
    encoder.encode_fields(head)  # inserts server: not remembered
    second = encoder.encode_fields(head)  # all indexed now: remembered

    def refuse(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("encoded again")

    encoder.add = refuse  # type: ignore[method-assign]
    assert encoder.encode_fields(head) == second


def test_a_pending_size_update_is_not_skipped_by_a_replay() -> None:
    encoder, reference = MemoEncoder(), hpack.Decoder()
    head = [(b":status", b"200")]
    encoder.encode_fields(head)
    encoder.encode_fields(head)
    encoder.header_table_size = 256
    block = encoder.encode_fields(head)
    assert block[0] & 0xE0 == 0x20  # starts with a dynamic table size update
    reference.decode(block)
    assert reference.header_table_size == 256


@pytest.mark.parametrize("first", [0, 256])
def test_the_same_size_set_again_keeps_its_size_update_due(first: int) -> None:
    """h2 sets the size for every SETTINGS frame that names it, changed or not: an
    equal second one must not cancel the update the first made due (hpack 4.2's
    own encoder drops it, and the peer keeps entries this side evicted)."""
    encoder, decoder = SizeUpdatingEncoder(), hpack.Decoder()
    decoder.decode(encoder.encode([(b"x-a", b"1"), (b"x-b", b"v" * 300)]))
    encoder.header_table_size = first
    encoder.header_table_size = first
    block = encoder.encode([(b"x-a", b"1")])
    assert block[0] & 0xE0 == 0x20  # starts with a dynamic table size update
    assert list(decoder.decode(block, raw=True)) == [(b"x-a", b"1")]
    assert decoder.header_table_size == first
    assert list(decoder.header_table.dynamic_entries) == list(encoder.header_table.dynamic_entries)


def blocks_from(operations: list[tuple[str, object]]) -> list[bytes]:
    """The header blocks a client's encoder sends for these operations: each
    header list twice in a row (a client repeating a request), so the second
    block is often all indexes and may be replayed; size changes go out at the
    start of the next block."""
    encoder = SizeUpdatingEncoder()  # (hpack's own can drop a size update: see below)
    out: list[bytes] = []
    for kind, arg in operations:
        if kind == "size":
            encoder.header_table_size = arg
        else:
            for _ in range(2):
                out.append(encoder.encode(list(arg), huffman=kind == "head"))  # type: ignore[call-overload]
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(OPERATION, max_size=30))
def test_decoded_blocks_match_plain_hpack(operations: list[tuple[str, object]]) -> None:
    memo, plain = MemoDecoder(65536), hpack.Decoder()
    for block in blocks_from(operations):
        want = plain.decode(block, raw=True)
        assert memo.decode(block, raw=True) == want
        assert memo.header_table.dynamic_entries == plain.header_table.dynamic_entries


def test_a_repeated_block_is_replayed_and_copied() -> None:
    decoder = MemoDecoder(65536)
    block = hpack.Encoder().encode([(b":method", b"GET"), (b":path", b"/")])  # static only
    first = decoder.decode(block, raw=True)

    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError("decoded again")

    decoder._decode_indexed = refuse  # type: ignore[method-assign]
    again = decoder.decode(block, raw=True)
    assert again == first
    again.append((b"x", b"y"))  # the caller's list is its own
    assert decoder.decode(block, raw=True) == first


def test_a_lower_header_list_limit_refuses_a_remembered_block() -> None:
    decoder = MemoDecoder(65536)
    block = hpack.Encoder().encode([(b":method", b"GET"), (b":path", b"/")])
    decoder.decode(block, raw=True)
    decoder.decode(block, raw=True)
    decoder.max_header_list_size = 10
    with pytest.raises(hpack.OversizedHeaderListError):
        decoder.decode(block, raw=True)


def test_a_failed_decode_forgets_what_it_remembered() -> None:
    decoder = MemoDecoder(65536)
    static = hpack.Encoder().encode([(b":method", b"GET")])
    decoder.decode(static, raw=True)
    assert decoder._memo
    with pytest.raises(hpack.HPACKDecodingError):
        decoder.decode(b"\x40\x01", raw=True)  # a literal cut short
    assert not decoder._memo


def test_the_memo_is_bounded() -> None:
    decoder = MemoDecoder(65536)
    for index in range(2, 2 + 3 * MEMO_ENTRIES):
        decoder.decode(bytes([0x80 | index]), raw=True)  # static table entries
        assert len(decoder._memo) <= MEMO_ENTRIES


def test_an_equal_entry_inserted_after_a_clear_is_a_change() -> None:
    """The table is cleared and refilled with entries equal to the old ones but in
    other places: the same indexed bytes now mean other fields. (Found by
    hypothesis: the memo once compared the first entry by value, not identity.)"""
    a = [(b":status", b"text/plain"), (b":status", b"trioserve"), (b"date", b"404")]
    b = [(b":status", b"text/plain"), (b"content-type", b"200"), (b"date", b"404")]
    operations = [("head", a), ("size", 0), ("size", 4096), ("head", b)]
    blocks = blocks_from(operations)
    assert blocks[1] == blocks[3]  # the same bytes, all indexes, meaning different fields
    memo, plain = MemoDecoder(65536), hpack.Decoder()
    for block in blocks:
        assert memo.decode(block, raw=True) == plain.decode(block, raw=True)
    got, want = run_encoders(operations)
    assert got == want
