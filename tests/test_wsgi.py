"""PEP 3333, rule by rule, with the app running in a real worker thread.

Every test serves its app through trioserve.testing's in-memory client, over
HTTP/1.1 and HTTP/2 where the rule is protocol-independent. Apps go through
wsgiref.validate.validator unless the test is about the server's reaction to
an app that breaks the rules (the validator would raise first).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any
from wsgiref.validate import validator

import pytest
import trio

import trioserve.wsgi
from trioserve.responses import HAS_FRAMING
from trioserve.testing import AppProbe, open_test_client

both_protocols = pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])


def app_returning(status: str = "200 OK", headers: list[tuple[str, str]] | None = None) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response(status, headers or [("Content-Type", "text/plain")])
        return [b"ok"]

    return validator(app)


# ---- the environ ------------------------------------------------------------


@both_protocols
async def test_environ_has_every_required_key_as_native_strings(http2: bool) -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.update(environ)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b""]

    async with open_test_client(validator(app), http2=http2, root_path="/mount") as client:
        response = await client.request(
            "POST",
            "/mount/a%20b/%C3%A9?x=1&y=%20",
            headers=[
                ("Content-Type", "text/plain"),
                ("Accept", "a/b"),
                ("Accept", "c/d"),
                ("Cookie", "a=1"),
                ("Cookie", "b=2"),
                ("X-Forwarded_For", "spoofed"),
                ("X-Custom", "v"),
            ],
            body=b"12345",
        )
    assert response.status == 200
    for key in (
        "REQUEST_METHOD",
        "SCRIPT_NAME",
        "PATH_INFO",
        "QUERY_STRING",
        "SERVER_NAME",
        "SERVER_PORT",
        "SERVER_PROTOCOL",
    ):
        assert type(seen[key]) is str, key
    assert seen["REQUEST_METHOD"] == "POST"
    assert seen["SCRIPT_NAME"] == "/mount"
    # Percent-decoded, then bytes as latin-1 (PEP 3333 "native strings").
    assert seen["PATH_INFO"] == "/a b/" + "é".encode().decode("latin-1")
    assert seen["QUERY_STRING"] == "x=1&y=%20"
    assert seen["SERVER_PORT"] == "80"
    assert seen["SERVER_PROTOCOL"] == ("HTTP/2" if http2 else "HTTP/1.1")
    assert seen["CONTENT_TYPE"] == "text/plain"
    assert seen["CONTENT_LENGTH"] == "5"
    assert seen["HTTP_ACCEPT"] == "a/b, c/d"
    assert seen["HTTP_COOKIE"] == "a=1; b=2"
    assert seen["HTTP_X_CUSTOM"] == "v"
    assert "HTTP_X_FORWARDED_FOR" not in seen  # header with "_" dropped: no spoofing
    assert seen["HTTP_HOST"] == "testserver"
    assert seen["REMOTE_ADDR"] == "127.0.0.1"
    assert seen["REMOTE_PORT"] == "50000"
    assert seen["wsgi.version"] == (1, 0)
    assert seen["wsgi.url_scheme"] == "http"
    assert seen["wsgi.multithread"] is True
    assert seen["wsgi.multiprocess"] is False
    assert seen["wsgi.run_once"] is False
    assert seen["wsgi.input_terminated"] is True
    assert seen["wsgi.file_wrapper"] is trioserve.wsgi.FileWrapper
    assert callable(seen["trioserve.check_cancelled"])


async def test_content_length_only_when_the_client_sent_one() -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.update(environ)
        seen["body"] = environ["wsgi.input"].read(100)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b""]

    async with open_test_client(validator(app), http2=True) as client:
        stream = await client.open_stream("POST", "/", end=False)
        await stream.send(b"abc", end=True)
        await stream.read_response()
    assert "CONTENT_LENGTH" not in seen
    assert seen["body"] == b"abc"


async def test_wsgi_errors_goes_to_logging(caplog: pytest.LogCaptureFixture) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.errors"].write("first line\nsecond ")
        environ["wsgi.errors"].write("line\n")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b""]

    with caplog.at_level(logging.ERROR, logger="trioserve.app"):
        async with open_test_client(validator(app)) as client:
            await client.get("/")
    messages = [r.getMessage() for r in caplog.records if r.name == "trioserve.app"]
    assert messages == ["first line", "second line"]


# ---- wsgi.input --------------------------------------------------------------

BODY = b"line one\nline two\n\nlast line without newline"


@both_protocols
@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("read", [BODY]),
        (
            "read_n",
            [b"line on", b"e\nline ", b"two\n\nla", b"st line", b" withou", b"t newli", b"ne"],
        ),
        ("readline", [b"line one\n", b"line two\n", b"\n", b"last line without newline"]),
        (
            "readline_hint",
            [
                b"line ",
                b"one\n",
                b"line ",
                b"two\n",
                b"\n",
                b"last ",
                b"line ",
                b"witho",
                b"ut ne",
                b"wline",
            ],
        ),
        ("readlines", [b"line one\n", b"line two\n", b"\n", b"last line without newline"]),
        ("readlines_hint", [b"line one\n", b"line two\n"]),
        ("iterate", [b"line one\n", b"line two\n", b"\n", b"last line without newline"]),
    ],
)
async def test_input_methods(http2: bool, method: str, expected: list[bytes]) -> None:
    """Every reading method, including the no-argument forms PEP 333's validator predates."""
    seen: list[bytes] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        stream = environ["wsgi.input"]
        if method == "read":
            seen.append(stream.read())
            assert stream.read() == b""
        elif method == "read_n":
            while chunk := stream.read(7):
                seen.append(chunk)
        elif method == "readline":
            while line := stream.readline():
                seen.append(line)
        elif method == "readline_hint":
            while line := stream.readline(5):
                seen.append(line)
        elif method == "readlines":
            seen.extend(stream.readlines())
        elif method == "readlines_hint":
            seen.extend(stream.readlines(12))
        else:
            seen.extend(stream)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b""]

    async with open_test_client(app, http2=http2) as client:
        # Send the body in small pieces so reads straddle chunk boundaries.
        stream = await client.open_stream(
            "POST", "/", headers=[("Content-Length", str(len(BODY)))], end=False
        )
        for i in range(0, len(BODY), 4):
            await stream.send(BODY[i : i + 4])
        await stream.end()
        response = await stream.read_response()
    assert response.status == 200
    assert seen == expected


@both_protocols
async def test_input_streams_before_the_body_is_complete(http2: bool) -> None:
    """The app reads the first part of the body while the client still holds the rest."""
    first_read = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        first = environ["wsgi.input"].read(5)
        trio.from_thread.run_sync(first_read.set, trio_token=token)
        rest = environ["wsgi.input"].read(5)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [first, b"|", rest]

    async with open_test_client(validator(app), http2=http2) as client:
        stream = await client.open_stream(
            "POST", "/", headers=[("Content-Length", "10")], end=False
        )
        await stream.send(b"hello")
        await first_read.wait()  # would hang if the server buffered the whole body first
        await stream.send(b"world", end=True)
        response = await stream.read_response()
    assert response.body == b"hello|world"


async def test_input_eof_exactly_at_content_length() -> None:
    """Bytes after the body (the next pipelined request) never leak into wsgi.input."""
    bodies: list[bytes] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        bodies.append(environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]) + 10))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    async with open_test_client(validator(app)) as client:
        await client.stream.send_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nde"
        )
        data = b""
        while data.count(b"HTTP/1.1 200") < 2:
            data += await client.stream.receive_some()
    assert bodies == [b"abc", b"de"]


async def test_absolute_form_request_gives_path_info_and_host() -> None:
    """``GET http://host/path``: PATH_INFO is the path, HTTP_HOST the target's host."""
    seen: list[tuple[str, str, str]] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append((environ["PATH_INFO"], environ["QUERY_STRING"], environ["HTTP_HOST"]))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    async with open_test_client(validator(app)) as client:
        await client.stream.send_all(
            b"GET http://example.com:8080/a%20b?q=1 HTTP/1.1\r\nHost: spoofed\r\n\r\n"
        )
        data = b""
        while b"ok" not in data:
            data += await client.stream.receive_some()
    assert seen == [("/a b", "q=1", "example.com:8080")]


@both_protocols
async def test_options_asterisk_reaches_the_app_as_path_info_star(http2: bool) -> None:
    """``OPTIONS *`` is the one target without a leading slash that is let through
    (RFC 9112 §3.2.4, RFC 9113 §8.3.1). Not through the validator: PEP 3333's checker
    insists on a leading slash."""
    seen: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(environ["PATH_INFO"])
        start_response("204 No Content", [])
        return []

    async with open_test_client(app, http2=http2) as client:
        stream = await client.open_stream("OPTIONS", "*")
        response = await stream.read_response()
    assert (response.status, seen) == (204, ["*"])


@both_protocols
async def test_streamed_chunks_are_pushed_without_a_round_trip_each(
    http2: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A generator's chunks reach trio by push(): the app thread waits for trio only
    when its queued output backs up, not once per chunk (100 chunks of 1 KiB: none)."""
    waits: list[str] = []
    for name in ("run", "run_sync"):
        real = getattr(trio.from_thread, name)

        def counting(*args: Any, _real: Any = real, _name: str = name) -> Any:
            waits.append(_name)
            return _real(*args)

        monkeypatch.setattr(trio.from_thread, name, counting)
    chunks = [bytes([65 + i % 26]) * 1024 for i in range(100)]

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        yield from chunks

    async with open_test_client(validator(app), http2=http2) as client:
        response = await client.get("/")
    assert response.body == b"".join(chunks)
    assert waits == []


# ---- start_response, headers, write() -----------------------------------------


@both_protocols
async def test_headers_are_delayed_until_the_first_non_empty_chunk(http2: bool) -> None:
    """Until body data exists, the app may still change its mind (exc_info)."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b""  # nothing sent yet: headers must still be held back
        try:
            raise ValueError("changed my mind")
        except ValueError:
            start_response(
                "503 Service Unavailable", [("Content-Type", "text/plain")], sys.exc_info()
            )
        yield b"sorry"

    async with open_test_client(validator(app), http2=http2) as client:
        response = await client.get("/")
    assert response.status == 503
    assert response.body == b"sorry"


@both_protocols
async def test_empty_body_still_sends_headers(http2: bool) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Marker", "1")])
        yield from ()

    async with open_test_client(validator(app), http2=http2) as client:
        response = await client.get("/")
    assert response.status == 200
    assert response.header("X-Marker") == "1"
    assert response.body == b""


@both_protocols
async def test_exc_info_after_headers_reraises_and_aborts(
    http2: bool, caplog: pytest.LogCaptureFixture
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"partial"
        try:
            raise ValueError("boom")
        except ValueError:
            start_response(
                "500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info()
            )
        yield b"never"

    probe = AppProbe(validator(app))
    async with open_test_client(probe, http2=http2) as client:
        stream = await client.open_stream("GET", "/")
        response = await stream.read_response()
        record = await probe.wait_finished()
    assert response.status == 200
    assert b"never" not in response.body
    assert isinstance(record.exception, ValueError)  # start_response re-raised it
    assert record.closed
    if http2:
        assert stream.reset_code == 0x2  # INTERNAL_ERROR
    else:
        assert client.closed.is_set()  # the only way to abort an HTTP/1.1 response


async def test_second_start_response_without_exc_info_is_an_error() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"x"]

    async with open_test_client(app) as client:
        response = await client.get("/")
    assert response.status == 500


@both_protocols
async def test_write_callable(http2: bool) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"one ")
        write(b"two ")
        return [b"three"]

    async with open_test_client(validator(app), http2=http2) as client:
        response = await client.get("/")
    assert response.body == b"one two three"


def bad_then_good(status: str, headers: list[tuple[str, str]]) -> Any:
    """An app that answers /bad with ``status`` and ``headers``, anything else with 200.

    Not wrapped in validator(): /bad breaks PEP 3333 on purpose (the validator
    would raise before trioserve's own check could be seen).
    """

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/bad":
            start_response(status, headers)
            return [b"12345"]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"fine"]

    return app


async def refused_then_served(
    app: Any, http2: bool, caplog: pytest.LogCaptureFixture
) -> tuple[Any, logging.LogRecord]:
    """GET /bad, then GET /good on the same connection; the 500 and its one log line."""
    async with open_test_client(app, http2=http2) as client:
        bad = await client.get("/bad")
        good = await client.get("/good")  # the connection is still usable
        assert not client.closed.is_set()
    assert bad.status == 500
    assert bad.complete
    assert bad.body == b"500 Internal Server Error\n"
    assert bad.header("Connection") is None  # keep-alive goes on (HTTP/1.1)
    assert (good.status, good.body) == (200, b"fine")
    errors = [r for r in caplog.records if r.name == "trioserve.error"]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].exc_info is None  # one line, no traceback
    assert errors[0].getMessage().startswith("500 for GET /bad: ")
    return bad, errors[0]


@both_protocols
@pytest.mark.parametrize(
    "status",
    [
        "200 OK\r\nX-Injected: 1",
        "200 OK\nX-Injected: 1",
        "200 O\rK",
        "200 OK\x00",
        "200 OK\x1b[2J",
        "101 Switching Protocols",
        "103 Early Hints",
        "099 Too Low",
        "600 Too High",
        "2000 OK",
        "20 OK",
        "200OK",
        " 200 OK",
        "not a status",
        "\u0662\u0660\u0660 OK",  # Arabic-Indic digits: str.isdigit() says yes
        "200 \u2603",  # not latin-1
    ],
    ids=[
        "crlf-header-injection",
        "lf-header-injection",
        "bare-cr",
        "nul",
        "escape",
        "101",
        "103",
        "099",
        "600",
        "four-digits",
        "two-digits",
        "no-space",
        "leading-space",
        "words",
        "non-ascii-digits",
        "not-latin-1",
    ],
)
async def test_invalid_status_is_a_500_with_one_log_line_and_the_connection_goes_on(
    http2: bool, status: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = bad_then_good(status, [("Content-Type", "text/plain")])
    bad, record = await refused_then_served(app, http2, caplog)
    assert bad.header("X-Injected") is None
    assert repr(status) in record.getMessage()  # the app's value, escaped


@both_protocols
@pytest.mark.parametrize(
    ("headers", "named"),
    [
        ([("Content-Length", "5"), ("Content-Length", "6")], "'5' and '6'"),
        ([("Content-Length", "5"), ("Content-Length", "5")], "'5' and '5'"),
        ([("Content-Length", "5, 5")], "'5, 5'"),
        ([("Content-Length", "-5")], "'-5'"),
        ([("Content-Length", "five")], "'five'"),
        ([("Transfer-Encoding", "gzip")], "'gzip'"),
        ([("Content-Length", "5"), ("Transfer-Encoding", "chunked")], "both"),
    ],
    ids=["two-lengths", "same-length-twice", "list", "negative", "words", "gzip", "cl-and-te"],
)
async def test_invalid_framing_headers_are_a_500_before_anything_is_sent(
    http2: bool, headers: list[tuple[str, str]], named: str, caplog: pytest.LogCaptureFixture
) -> None:
    _, record = await refused_then_served(bad_then_good("200 OK", headers), http2, caplog)
    assert named in record.getMessage()


@both_protocols
async def test_a_status_that_is_not_str_is_a_500_with_its_traceback(
    http2: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong type is a bug in the app's code: TypeError, logged with its traceback."""
    app = bad_then_good(200, [])  # type: ignore[arg-type]
    async with open_test_client(app, http2=http2) as client:
        response = await client.get("/bad")
    assert response.status == 500
    errors = [r for r in caplog.records if r.name == "trioserve.error"]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert errors[0].exc_info[0] is TypeError


@both_protocols
async def test_start_response_refuses_a_bad_head_while_the_app_can_still_answer(
    http2: bool,
) -> None:
    """PEP 3333: errors in the head are raised by start_response, so the app may
    catch them and answer otherwise (here with exc_info, as PEP 3333 shows)."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        try:
            start_response("200 OK\r\nSet-Cookie: x=1", [("Content-Type", "text/plain")])
        except ValueError:
            start_response(
                "503 Service Unavailable", [("Content-Type", "text/plain")], sys.exc_info()
            )
            return [b"busy"]
        return [b"not reached"]

    async with open_test_client(app, http2=http2) as client:  # breaks PEP 3333 on purpose
        response = await client.get("/")
    assert (response.status, response.body) == (503, b"busy")
    assert response.header("Set-Cookie") is None


@both_protocols
@pytest.mark.parametrize(
    "header",
    [("X-Bad", "a\r\nInjected: yes"), ("Bad Name", "v"), ("X-Bytes", b"v"), ["X-List", "v"]],
)
async def test_invalid_headers_are_a_500_never_sent(http2: bool, header: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [header])
        return [b"x"]

    async with open_test_client(app, http2=http2) as client:
        response = await client.get("/")
    assert response.status == 500
    assert response.header("Injected") is None


# ---- close() and errors ----------------------------------------------------------


class ClosingBody:
    def __init__(self, chunks: list[bytes], fail_at: int | None = None) -> None:
        self.chunks = chunks
        self.fail_at = fail_at
        self.closed = 0

    def __iter__(self) -> Iterator[bytes]:
        for i, chunk in enumerate(self.chunks):
            if i == self.fail_at:
                raise RuntimeError("the app broke mid-body")
            yield chunk

    def close(self) -> None:
        self.closed += 1


@both_protocols
async def test_close_called_once_on_success(http2: bool) -> None:
    body = ClosingBody([b"a", b"b"])

    def app(environ: dict[str, Any], start_response: Any) -> ClosingBody:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return body

    async with open_test_client(validator(app), http2=http2) as client:
        response = await client.get("/")
    assert response.body == b"ab"
    assert body.closed == 1


@both_protocols
async def test_close_called_when_the_iterable_raises(
    http2: bool, caplog: pytest.LogCaptureFixture
) -> None:
    body = ClosingBody([b"a", b"b"], fail_at=1)

    def app(environ: dict[str, Any], start_response: Any) -> ClosingBody:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return body

    async with open_test_client(app, http2=http2) as client:
        stream = await client.open_stream("GET", "/")
        response = await stream.read_response()
    assert body.closed == 1
    if http2:
        # The stream is reset. Whether the chunk pushed just before the failure
        # made it out first depends on whether the sender ran in between.
        assert stream.reset_code == 0x2  # INTERNAL_ERROR
        assert response.body in (b"", b"a")
    else:
        assert response.body == b"a"  # then the connection closes: no complete response
        assert not response.complete
    errors = [
        r for r in caplog.records if r.levelno >= logging.ERROR and r.name == "trioserve.error"
    ]
    assert len(errors) == 2  # the traceback once, the abort once
    assert errors[0].exc_info is not None


@both_protocols
async def test_exception_before_headers_is_a_500_logged_once(
    http2: bool, caplog: pytest.LogCaptureFixture
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise KeyError("database is down")

    async with open_test_client(app, http2=http2) as client:
        response = await client.get("/path")
        assert response.status == 500
        assert b"database" not in response.body  # no internals on the wire
        assert len(response.body) < 100
        again = await client.get("/path")  # the connection survives
        assert again.status == 500
    errors = [r for r in caplog.records if r.name == "trioserve.error"]
    assert len(errors) == 2  # once per request
    assert errors[0].exc_info is not None
    assert errors[0].exc_info[0] is KeyError
    assert "GET /path" in errors[0].getMessage()


@both_protocols
async def test_generator_exception_before_any_data_is_a_500(http2: bool) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        raise RuntimeError("nope")
        yield b""  # pragma: no cover

    async with open_test_client(app, http2=http2) as client:
        response = await client.get("/")
    assert response.status == 500


# ---- Content-Length mismatches -------------------------------------------------


@both_protocols
@pytest.mark.parametrize("streamed", [False, True], ids=["list", "generator"])
@pytest.mark.parametrize(
    ("declared", "chunks"),
    [("5", [b"y" * 138]), ("5", [b"yyy", b"yyy"]), ("100", [b"12345"]), ("3", [b"12", b"345"])],
    ids=["138-for-5", "6-for-5", "5-for-100", "5-for-3"],
)
async def test_response_not_matching_its_content_length_never_ends_cleanly(
    http2: bool,
    streamed: bool,
    declared: str,
    chunks: list[bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing past the declared length is sent; the response is reset (HTTP/2
    RST_STREAM INTERNAL_ERROR) or its connection closed (HTTP/1.1), logged once.
    Not validated: a body that contradicts its Content-Length breaks PEP 3333."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", declared)])
        return iter(chunks) if streamed else list(chunks)

    async with open_test_client(app, http2=http2) as client:
        stream = await client.open_stream("GET", "/")
        response = await stream.read_response()
        if not http2:
            await client.closed.wait()
    assert not response.complete
    assert len(response.body) <= int(declared)
    assert b"".join(chunks).startswith(response.body)
    if http2:
        assert stream.reset_code == 0x2  # INTERNAL_ERROR
    aborts = [r for r in caplog.records if r.name == "trioserve.error"]
    assert len(aborts) == 1
    assert "Content-Length" in aborts[0].getMessage()


@both_protocols
@pytest.mark.parametrize(
    ("method", "status", "headers"),
    [
        ("HEAD", "200 OK", [("Content-Length", "1000")]),
        ("GET", "204 No Content", []),
        # No Content-Length with this 304: the h2 client library would take one
        # as the length of a body to come (it exempts only HEAD).
        ("GET", "304 Not Modified", [("ETag", '"v1"')]),
    ],
    ids=["head", "204", "304"],
)
async def test_bodiless_responses_send_no_body_and_keep_the_connection(
    http2: bool, method: str, status: str, headers: list[tuple[str, str]]
) -> None:
    """A streamed body for HEAD/204/304 is dropped, never counted against the
    Content-Length (which may describe what a GET would get). Not validated: the
    validator refuses a body for 204/304, which is the point here."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response(status, headers)
        yield b"body bytes"
        yield b" nobody sees"

    async with open_test_client(app, http2=http2) as client:
        response = await client.request(method, "/")
        again = await client.request(method, "/")
    for answer in (response, again):
        assert (answer.status, answer.body, answer.complete) == (int(status[:3]), b"", True)
        assert answer.header("Content-Length") == dict(headers).get("Content-Length")


@pytest.mark.parametrize(("declared", "chunks"), [("10", [b"12345"]), ("3", [b"12", b"345"])])
async def test_content_length_mismatch_ends_the_connection(
    declared: str, chunks: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", declared)])
        yield from chunks

    async with open_test_client(app) as client:
        await client.stream.send_all(
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        data = b""
        while chunk := await client.stream.receive_some():
            data += chunk
    # The first response is cut off and the connection closed: the next
    # response can never be mistaken for the surplus bytes.
    assert data.count(b"HTTP/1.1") == 1
    assert any("Aborting" in r.getMessage() for r in caplog.records)


# ---- the fast path ----------------------------------------------------------------


async def test_list_response_costs_one_thread_hop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A list body crosses back to trio in the thread's return value: no per-chunk hop.

    (Not wrapped in validator(): it turns every body into an iterator, which
    is exactly what this test must not have.)
    """
    calls = {"to_thread": 0, "from_thread": 0}
    real_to_thread = trio.to_thread.run_sync
    real_run, real_run_sync = trio.from_thread.run, trio.from_thread.run_sync

    async def counting_to_thread(*args: Any, **kwargs: Any) -> Any:
        calls["to_thread"] += 1
        return await real_to_thread(*args, **kwargs)

    def counting_run(*args: Any, **kwargs: Any) -> Any:
        calls["from_thread"] += 1
        return real_run(*args, **kwargs)

    def counting_run_sync(*args: Any, **kwargs: Any) -> Any:
        calls["from_thread"] += 1
        return real_run_sync(*args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting_to_thread)
    monkeypatch.setattr(trio.from_thread, "run", counting_run)
    monkeypatch.setattr(trio.from_thread, "run_sync", counting_run_sync)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read(100)  # the small body arrived with the head: no hop either
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"a" * 1000, b"b" * 1000]

    async with open_test_client(app) as client:
        response = await client.post("/", b"small body")
    assert response.body == b"a" * 1000 + b"b" * 1000
    assert response.header("Content-Length") == "2000"  # computed from the list
    assert calls == {"to_thread": 1, "from_thread": 0}


@both_protocols
async def test_file_wrapper_streams_a_file(http2: bool, tmp_path: Any) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 1000)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](open(path, "rb"), 4096)

    probe = AppProbe(validator(app))
    async with open_test_client(probe, http2=http2) as client:
        response = await client.get("/")
        record = await probe.wait_finished()
    assert response.body == path.read_bytes()
    assert record.closed
    assert record.environ["wsgi.file_wrapper"] is trioserve.wsgi.FileWrapper


# ---- the start_response memo ------------------------------------------------------------


def test_a_repeated_head_is_encoded_once_and_handed_out_as_a_fresh_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    memo: dict[Any, Any] = {}
    monkeypatch.setattr(trioserve.wsgi, "_head_memo", memo)
    headers = [("Content-Type", "text/plain"), ("Content-Length", " 13 ")]
    first = trioserve.wsgi._encode_head("200 OK", headers)
    assert len(memo) == 1
    first.headers.append((b"Date", b"today"))  # what the connection does to a head
    second = trioserve.wsgi._encode_head("200 OK", list(headers))
    assert len(memo) == 1
    assert second.headers == [(b"Content-Type", b"text/plain"), (b"Content-Length", b"13")]
    assert (second.status, second.reason, second.content_length) == (200, b"OK", 13)
    assert second.headers is not first.headers
    # What the trio side looks for, found once with the head: a Content-Length,
    # and neither Date nor Server (the Date appended above is not the app's).
    assert second.traits == first.traits == HAS_FRAMING


class _Name(str):
    pass


@pytest.mark.parametrize(
    ("status", "headers", "error"),
    [
        (_Name("200 OK"), [("A", "b")], TypeError),
        ("200 OK", [(_Name("A"), "b")], TypeError),
        ("200 OK", [["A", "b"]], TypeError),
        ("200 OK", [("A", "b\nc")], trioserve.wsgi.InvalidResponse),
        ("200 OK", [("Content-Length", "x")], trioserve.wsgi.InvalidResponse),
    ],
    ids=["str-subclass-status", "str-subclass-name", "list-item", "newline", "bad-length"],
)
def test_the_memo_never_lets_a_refused_head_through(
    status: str,
    headers: list[tuple[str, str]],
    error: type[Exception],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A head equal to a remembered good one, but of the wrong types, is still
    refused; a refused head is not remembered, so it is refused every time."""
    memo: dict[Any, Any] = {}
    monkeypatch.setattr(trioserve.wsgi, "_head_memo", memo)
    trioserve.wsgi._encode_head("200 OK", [("A", "b")])
    for _ in range(2):
        with pytest.raises(error):
            trioserve.wsgi._encode_head(status, headers)
    assert len(memo) == 1


def test_the_head_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    memo: dict[Any, Any] = {}
    monkeypatch.setattr(trioserve.wsgi, "_head_memo", memo)
    for n in range(trioserve.wsgi._HEAD_MEMO_ENTRIES * 3):
        trioserve.wsgi._encode_head("200 OK", [("ETag", f'"{n}"')])
        assert len(memo) <= trioserve.wsgi._HEAD_MEMO_ENTRIES


def test_connections_to_one_address_share_their_environ_entries_but_not_the_client() -> None:
    """An idle connection holds no environ template of its own; each request's
    environ still names its own client (and a TLS connection its own TLS facts)."""
    from trioserve.events import RequestReceived
    from trioserve.wsgi import ConnectionInfo, InputStream, build_environ

    first = ConnectionInfo("http", "127.0.0.1", "8000", "10.0.0.1", "1111")
    second = ConnectionInfo("http", "127.0.0.1", "8000", "10.0.0.2", "2222")
    assert first.environ_base is second.environ_base
    tls = ConnectionInfo("https", "127.0.0.1", "8443", "10.0.0.3", "3333", tls={"HTTPS": "on"})
    assert tls.environ_base["HTTPS"] == "on"
    assert "HTTPS" not in ConnectionInfo("https", "127.0.0.1", "8443", None, None).environ_base
    request = RequestReceived(1, b"GET", b"/a?b=c", [(b"host", b"x")], "1.1", end_stream=True)
    environs = [
        build_environ(request, info, InputStream(None, eof=True))  # type: ignore[arg-type]
        for info in (first, second, tls)
    ]
    assert [(e["REMOTE_ADDR"], e["REMOTE_PORT"]) for e in environs] == [
        ("10.0.0.1", "1111"),
        ("10.0.0.2", "2222"),
        ("10.0.0.3", "3333"),
    ]
    assert environs[2]["HTTPS"] == "on"
    assert "HTTPS" not in environs[0]
    assert "REMOTE_ADDR" not in first.environ_base  # a copy was changed, never the shared one
    unix = ConnectionInfo("http", "localhost", "80", None, None)
    assert "REMOTE_ADDR" not in build_environ(request, unix, InputStream(None, eof=True))  # type: ignore[arg-type]


def test_environ_keys_of_header_names_are_kept_up_to_a_bound() -> None:
    """A header name's environ key is worked out once and kept, for at most
    _ENVIRON_KEYS_KEPT names (a client chooses them); past that each is worked
    out again, with the same result. Percent-escapes are decoded with or
    without the shortcut for paths that have none."""
    from trioserve.events import RequestReceived
    from trioserve.wsgi import ConnectionInfo, InputStream, build_environ

    kept = trioserve.wsgi._ENVIRON_KEYS
    info = ConnectionInfo("http", "127.0.0.1", "8000", "10.0.0.1", "1111")
    names = [f"x-name-{n}".encode() for n in range(trioserve.wsgi._ENVIRON_KEYS_KEPT + 50)]
    for target in (b"/plain", b"/caf%C3%A9"):
        headers = [(b"host", b"x"), *((name, b"v") for name in names)]
        request = RequestReceived(1, b"GET", target, headers, "1.1", end_stream=True)
        environ = build_environ(request, info, InputStream(None, eof=True))  # type: ignore[arg-type]
        assert all(environ[f"HTTP_X_NAME_{n}"] == "v" for n in range(len(names)))
        assert environ["HTTP_HOST"] == "x"
        assert kept[b"host"] == "HTTP_HOST"
        assert len(kept) <= trioserve.wsgi._ENVIRON_KEYS_KEPT
    assert environ["PATH_INFO"] == "/caf\xc3\xa9"  # bytes as latin-1, as PEP 3333 asks


def test_options_asterisk_reaches_the_app_with_path_info_asterisk() -> None:
    """``OPTIONS *`` asks about the server, not a path: PATH_INFO is "*" (as gunicorn
    and waitress give it), and REQUEST_URI keeps the target as sent."""
    from trioserve.events import RequestReceived
    from trioserve.wsgi import ConnectionInfo, InputStream, build_environ

    info = ConnectionInfo("http", "127.0.0.1", "8000", "10.0.0.1", "1111")
    request = RequestReceived(1, b"OPTIONS", b"*", [(b"host", b"x")], "1.1", end_stream=True)
    environ = build_environ(request, info, InputStream(None, eof=True))  # type: ignore[arg-type]
    assert (environ["PATH_INFO"], environ["REQUEST_URI"], environ["QUERY_STRING"]) == ("*", "*", "")
