"""trioserve.http2_fields against h2's own inbound validation, the reference.

h2's validator (``h2.utilities.validate_headers``) is what trioserve used to
run on every request; :func:`request_fields` replaced it on the hot path. The
two must accept and refuse the same field lists. Random lists are built from
fields near every rule's edge, so most lists break at most one or two rules.

One deliberate difference: h2 joins cookie fields (moving them last) *before*
it validates, so a pseudo-header field after a cookie slips through there.
RFC 9113 §8.3 forbids it, and trioserve validates first; the reference here
does the same (validate, then join).
"""

from __future__ import annotations

import h2.exceptions
import h2.utilities
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioserve import http2_fields
from trioserve.http2_fields import MalformedFields, request_fields, trailer_problem

Field = tuple[bytes, bytes]

# The pseudo-header fields of a GET, but for :authority (a host field can stand in).
GET_FIELDS: list[Field] = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")]

REQUEST_FLAGS = h2.utilities.HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)
TRAILER_FLAGS = REQUEST_FLAGS._replace(is_trailer=True)


def h2_verdict(
    fields: list[Field], flags: h2.utilities.HeaderValidationFlags
) -> list[Field] | None:
    """What h2 makes of ``fields``: the checked list with cookies joined, or None if refused."""
    try:
        checked = list(h2.utilities.validate_headers(fields, flags))
    except h2.exceptions.ProtocolError:
        return None
    return [tuple(f) for f in h2.utilities.normalize_inbound_headers(checked, flags)]  # type: ignore[misc]


def ours(fields: list[Field]) -> list[Field] | None:
    """:func:`request_fields`' verdict in the same form as :func:`h2_verdict`."""
    try:
        found = request_fields(fields)
    except MalformedFields:
        return None
    pseudo = [f for f in fields if f[0][:1] == b":"]
    # What was picked out must be what the fields said.
    named = dict(pseudo)
    assert (found.method, found.path, found.scheme, found.authority) == (
        named.get(b":method"),
        named.get(b":path"),
        named.get(b":scheme"),
        named.get(b":authority"),
    )
    return pseudo + found.headers


PSEUDO = st.sampled_from(
    [
        (b":method", b"GET"),
        (b":method", b"POST"),
        (b":method", b"CONNECT"),
        (b":scheme", b"https"),
        (b":authority", b"example.com"),
        (b":authority", b"other.example"),
        (b":path", b"/"),
        (b":path", b"/a?b=c"),
        (b":path", b""),
        (b":protocol", b"websocket"),
        (b":status", b"200"),
        (b":foo", b"bar"),
        (b":", b"x"),
    ]
)
NAMES = st.sampled_from(
    [
        b"accept",
        b"user-agent",
        b"host",
        b"cookie",
        b"te",
        b"content-length",
        b"expect",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"x-Upper",
        b"",
        b"a:b",
        b"a b",
        b"x-\x7f",
        b"x-\x00",
        b"x-\xff",
        b"~!#$%&'*+-.^_`|",
        b"@[]{}",
    ]
)
VALUES = st.sampled_from(
    [
        b"",
        b"ok",
        b"example.com",
        b"other.example",
        b"trailers",
        b"TRAILERS",
        b"gzip",
        b"100-continue",
        b"12",
        b" lead",
        b"trail\t",
        b"in side",
        b"a\rb",
        b"a\nb",
        b"a\x00b",
        b"\x7f\xff",
    ]
)


# Fields whose meaning depends on the others (or on each other).
RELATED = st.sampled_from(
    [
        (b"host", b"example.com"),
        (b"host", b"other.example"),
        (b"te", b"trailers"),
        (b"te", b"gzip"),
        (b"cookie", b"c=3"),
        (b"content-length", b"12"),
        (b"connection", b"close"),
    ]
)


@st.composite
def field_lists(draw: st.DrawFn) -> list[Field]:
    pseudo = draw(st.lists(PSEUDO, max_size=6))
    regular = draw(st.lists(st.one_of(RELATED, st.tuples(NAMES, VALUES)), max_size=6))
    # h2's validator leaves content-length alone (trioserve judges it: see the
    # refusals below), so only one valid value reaches the comparison.
    regular = [(n, b"12") if n == b"content-length" else (n, v) for n, v in regular]
    if draw(st.booleans()):
        return pseudo + regular
    return draw(st.permutations(pseudo + regular))


@st.composite
def mostly_valid_requests(draw: st.DrawFn) -> list[Field]:
    """A well-formed GET with one or two fields changed, added or dropped."""
    fields: list[Field] = [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"example.com"),
        (b":path", b"/"),
        (b"accept", b"*/*"),
        (b"cookie", b"a=1"),
        (b"cookie", b"b=2"),
    ]
    for _ in range(draw(st.integers(1, 2))):
        action = draw(st.sampled_from(["add", "drop", "replace"]))
        where = draw(st.integers(0, len(fields) - 1))
        if action == "drop":
            del fields[where]
            continue
        field = draw(st.one_of(PSEUDO, RELATED, st.tuples(NAMES, VALUES)))
        if field[0] == b"content-length":
            field = (field[0], b"12")
        if action == "add":
            fields.insert(where, field)
        else:
            fields[where] = field
    return fields


@settings(max_examples=1500, deadline=None)
@given(st.one_of(field_lists(), mostly_valid_requests()))
def test_request_fields_agree_with_h2(fields: list[Field]) -> None:
    expected = h2_verdict(fields, REQUEST_FLAGS)
    assert ours(fields) == expected
    # Again, now that the fields that passed are remembered as clean.
    assert ours(fields) == expected


@settings(max_examples=500, deadline=None)
@given(st.one_of(field_lists(), st.lists(st.tuples(NAMES, VALUES), max_size=4)))
def test_trailer_problem_agrees_with_h2(fields: list[Field]) -> None:
    accepted = h2_verdict(fields, TRAILER_FLAGS) is not None
    assert (trailer_problem(fields) is None) == accepted


def test_a_well_formed_request_is_picked_apart() -> None:
    found = request_fields(
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/upload"),
            (b"host", b"example.com"),
            (b"cookie", b"a=1"),
            (b"content-length", b"5"),
            (b"expect", b"100-Continue"),
            (b"cookie", b"b=2"),
        ]
    )
    assert found == (
        b"POST",
        b"/upload",
        b"http",
        None,
        [
            (b"host", b"example.com"),
            (b"content-length", b"5"),
            (b"expect", b"100-Continue"),
            (b"cookie", b"a=1; b=2"),
        ],
        5,
        True,
    )


def test_plain_connect_has_no_path_or_scheme() -> None:
    found = request_fields([(b":method", b"CONNECT"), (b":authority", b"example.com:443")])
    assert (found.method, found.path, found.scheme) == (b"CONNECT", None, None)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        (
            [(b":method", b"GET"), (b"x-a", b"1"), (b":path", b"/")],
            "pseudo-header field after a regular one",
        ),
        (
            [(b":method", b"GET"), (b"cookie", b"a"), (b":path", b"/")],
            "pseudo-header field after a regular one",
        ),
        ([(b":path", b"/"), (b":scheme", b"https"), (b"host", b"a")], "no :method"),
        (
            [*GET_FIELDS, (b"host", b"a"), (b"host", b"a")],
            "more than one host field",
        ),
        (
            [*GET_FIELDS, (b":authority", b"a"), (b"host", b"b")],
            ":authority and host differ",
        ),
        (
            [*GET_FIELDS, (b"content-length", b"x")],
            "invalid content-length",
        ),
        (
            [*GET_FIELDS, (b"content-length", b"5"), (b"content-length", b"6")],
            "conflicting content-length fields",
        ),
        (
            [*GET_FIELDS, (b"content-length", b"1" * 19)],
            "content-length of more than 18 digits",
        ),
    ],
    ids=[
        "pseudo-after-regular",
        "pseudo-after-cookie",
        "no-method",
        "two-hosts",
        "authority-host-differ",
        "content-length",
        "conflicting-content-lengths",
        "content-length-19-digits",
    ],
)
def test_refusals_name_the_rule(fields: list[Field], problem: str) -> None:
    with pytest.raises(MalformedFields) as caught:
        request_fields(fields)
    assert str(caught.value) == problem


def test_clean_field_memory_is_bounded_and_holds_only_clean_fields(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clean: set[Field] = set()
    monkeypatch.setattr(http2_fields, "_clean", clean)
    for n in range(http2_fields._CLEAN_ENTRIES * 2):
        request_fields([*GET_FIELDS, (b"host", b"h%d" % n)])
        assert len(clean) <= http2_fields._CLEAN_ENTRIES
    with pytest.raises(MalformedFields):
        request_fields([*GET_FIELDS, (b"host", b"a"), (b"x-a", b"a\rb")])
    assert (b"x-a", b"a\rb") not in clean
    long_value = b"v" * http2_fields._CLEAN_FIELD_BYTES
    request_fields([*GET_FIELDS, (b"host", long_value)])
    assert (b"host", long_value) not in clean
