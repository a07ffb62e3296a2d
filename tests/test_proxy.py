"""Trust in proxies: the allow list, Forwarded / X-Forwarded-*, and the PROXY protocol.

Unit tests drive trioserve.proxy directly; end-to-end tests send the headers
(or a PROXY preamble) to a real server and look at the environ the app got.
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import pytest
import trio

from tests.apps import whoami
from trioserve import ConfigError, serve_wsgi
from trioserve.proxy import (
    AllowList,
    ProxyHeader,
    ProxyHeaderError,
    apply_forwarded,
    parse_allow_list,
    parse_proxy_header,
)
from trioserve.testing import open_test_client

LOOPBACK = parse_allow_list(["127.0.0.1", "::1", "unix"])


# ---- the allow list ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "address", "trusted"),
    [
        (["127.0.0.1"], "127.0.0.1", True),
        (["127.0.0.1"], "127.0.0.2", False),
        (["10.0.0.0/8"], "10.1.2.3", True),
        (["10.0.0.0/8"], "11.0.0.1", False),
        (["::1"], "::1", True),
        (["2001:db8::/32"], "2001:db8::5", True),
        (["127.0.0.1"], "::ffff:127.0.0.1", True),  # v4-mapped v6 is the same host
        (["10.0.0.1, 10.0.0.2"], "10.0.0.2", True),  # comma lists inside one entry
        (["unix"], None, True),
        (["127.0.0.1"], None, False),
        (["*"], "203.0.113.9", True),
        (["*"], None, True),
        ([], "127.0.0.1", False),
        (["127.0.0.1"], "not-an-ip", False),
    ],
)
def test_allow_list(entries: list[str], address: str | None, trusted: bool) -> None:
    assert parse_allow_list(entries).trusts(address) is trusted


@pytest.mark.parametrize("entry", ["localhost", "10.0.0.0/33", "1.2.3"])
def test_bad_allow_list_entry_is_a_config_error(entry: str) -> None:
    with pytest.raises(ConfigError, match="forwarded-allow-ips"):
        parse_allow_list([entry])


# ---- forwarding headers ------------------------------------------------------------------


def environ_for(peer: str | None, **headers: str) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "wsgi.url_scheme": "http",
        "SERVER_NAME": "10.0.0.5",
        "SERVER_PORT": "8000",
        "HTTP_HOST": "10.0.0.5:8000",
    }
    if peer is not None:
        environ["REMOTE_ADDR"] = peer
        environ["REMOTE_PORT"] = "50000"
    environ.update({"HTTP_" + name.upper(): value for name, value in headers.items()})
    return environ


def test_untrusted_peer_loses_its_forwarding_headers() -> None:
    environ = environ_for(
        "203.0.113.7",
        x_forwarded_for="1.2.3.4",
        x_forwarded_proto="https",
        x_forwarded_host="evil.example",
        x_forwarded_port="443",
        forwarded="for=1.2.3.4;proto=https",
    )
    apply_forwarded(environ, LOOPBACK)
    assert environ["REMOTE_ADDR"] == "203.0.113.7"
    assert environ["wsgi.url_scheme"] == "http"
    assert environ["HTTP_HOST"] == "10.0.0.5:8000"
    assert not any(key.startswith(("HTTP_X_FORWARDED", "HTTP_FORWARDED")) for key in environ)


def test_trusted_proxy_x_forwarded_headers() -> None:
    environ = environ_for(
        "127.0.0.1",
        x_forwarded_for="198.51.100.20",
        x_forwarded_proto="https",
        x_forwarded_host="app.example.com",
        x_forwarded_port="8443",
    )
    apply_forwarded(environ, LOOPBACK)
    assert environ["REMOTE_ADDR"] == "198.51.100.20"
    assert "REMOTE_PORT" not in environ  # the proxy's port is not the client's
    assert environ["wsgi.url_scheme"] == "https"
    assert environ["HTTP_HOST"] == "app.example.com"
    assert environ["SERVER_NAME"] == "app.example.com"
    assert environ["SERVER_PORT"] == "8443"


def test_client_cannot_spoof_through_an_appending_proxy() -> None:
    """The client sent X-Forwarded-For: 10.9.9.9 itself; the proxy appended the real address."""
    environ = environ_for("127.0.0.1", x_forwarded_for="10.9.9.9, 198.51.100.20")
    apply_forwarded(environ, LOOPBACK)
    assert environ["REMOTE_ADDR"] == "198.51.100.20"


def test_chain_of_trusted_proxies_is_walked_right_to_left() -> None:
    allow = parse_allow_list(["127.0.0.1", "10.0.0.0/8"])
    environ = environ_for("127.0.0.1", x_forwarded_for="198.51.100.20, 10.0.0.3, 10.0.0.2")
    apply_forwarded(environ, allow)
    assert environ["REMOTE_ADDR"] == "198.51.100.20"


def test_forwarded_header_wins_and_uses_the_clients_hop() -> None:
    environ = environ_for(
        "127.0.0.1",
        forwarded='for="[2001:db8:cafe::17]:4711";proto=https;host=app.example, for=127.0.0.1',
        x_forwarded_for="192.0.2.99",
    )
    apply_forwarded(environ, LOOPBACK)
    assert environ["REMOTE_ADDR"] == "2001:db8:cafe::17"
    assert environ["REMOTE_PORT"] == "4711"
    assert environ["wsgi.url_scheme"] == "https"
    assert environ["HTTP_HOST"] == "app.example"
    assert environ["SERVER_PORT"] == "443"


@pytest.mark.parametrize("value", ['for="unterminated', "for=1.2.3.4;;=x", "=nothing"])
def test_malformed_forwarded_header_changes_nothing(value: str) -> None:
    environ = environ_for("127.0.0.1", forwarded=value)
    apply_forwarded(environ, LOOPBACK)
    assert environ["REMOTE_ADDR"] == "127.0.0.1"
    assert environ["wsgi.url_scheme"] == "http"


def test_malformed_client_part_of_forwarded_does_not_hide_the_proxys_hop() -> None:
    """The client sent "Forwarded: oops" and its own X-Forwarded-For; the proxy appended."""
    environ = environ_for(
        "127.0.0.1",
        forwarded="oops, for=198.51.100.7;proto=https",
        x_forwarded_for="6.6.6.6",
    )
    apply_forwarded(environ, LOOPBACK)
    assert environ["REMOTE_ADDR"] == "198.51.100.7"
    assert environ["wsgi.url_scheme"] == "https"


def test_forwarded_whose_client_hop_is_unparsable_is_not_believed_at_all() -> None:
    """Only trusted hops parse; the client's is garbage: neither it nor X-Forwarded-For counts."""
    environ = environ_for("127.0.0.1", forwarded="oops, for=127.0.0.1", x_forwarded_for="6.6.6.6")
    apply_forwarded(environ, LOOPBACK)
    assert environ["REMOTE_ADDR"] == "127.0.0.1"


def test_unusual_scheme_and_obfuscated_for_are_ignored() -> None:
    environ = environ_for("127.0.0.1", forwarded="for=_hidden;proto=gopher")
    apply_forwarded(environ, LOOPBACK)
    assert environ["REMOTE_ADDR"] == "127.0.0.1"
    assert environ["wsgi.url_scheme"] == "http"


def test_unix_socket_peer_is_trusted_by_default() -> None:
    environ = environ_for(None, x_forwarded_for="198.51.100.20", x_forwarded_proto="https")
    apply_forwarded(environ, LOOPBACK)
    assert environ["REMOTE_ADDR"] == "198.51.100.20"
    assert environ["wsgi.url_scheme"] == "https"


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
async def test_forwarding_applied_end_to_end(http2: bool) -> None:
    headers = [("X-Forwarded-For", "198.51.100.20"), ("X-Forwarded-Proto", "https")]
    async with open_test_client(whoami, http2=http2, client_addr=("127.0.0.1", 1234)) as client:
        trusted = json.loads((await client.get("/", headers=headers)).body)
    async with open_test_client(whoami, http2=http2, client_addr=("203.0.113.7", 1234)) as client:
        untrusted = json.loads((await client.get("/", headers=headers)).body)
    assert trusted["REMOTE_ADDR"] == "198.51.100.20"
    assert trusted["wsgi.url_scheme"] == "https"
    assert untrusted["REMOTE_ADDR"] == "203.0.113.7"
    assert untrusted["wsgi.url_scheme"] == "http"


# ---- the PROXY protocol ----------------------------------------------------------------------

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIG + bytes([0x20 | command, family]) + len(body).to_bytes(2, "big") + body


V2_TCP4 = v2(1, 0x11, bytes([192, 0, 2, 1, 10, 0, 0, 1]) + (56324).to_bytes(2, "big") + b"\x00\x50")
V2_TCP6 = v2(
    1,
    0x21,
    bytes.fromhex("20010db8000000000000000000000001")
    + bytes(16)
    + (4711).to_bytes(2, "big")
    + b"\x01\xbb",
)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"PROXY TCP4 192.0.2.1 10.0.0.1 56324 80\r\nGET", ProxyHeader(40, ("192.0.2.1", 56324))),
        (
            b"PROXY TCP6 2001:db8::1 2001:db8::2 4711 443\r\n",
            ProxyHeader(
                len(b"PROXY TCP6 2001:db8::1 2001:db8::2 4711 443\r\n"), ("2001:db8::1", 4711)
            ),
        ),
        (b"PROXY UNKNOWN\r\n", ProxyHeader(15, None)),
        (b"PROXY UNKNOWN ffff:f...f ffff:f...f 65535 65535\r\n", ProxyHeader(49, None)),
        (V2_TCP4 + b"GET /", ProxyHeader(28, ("192.0.2.1", 56324))),
        (V2_TCP6, ProxyHeader(52, ("2001:db8::1", 4711))),
        (v2(0, 0x00, b""), ProxyHeader(16, None)),  # LOCAL: a health check
        (v2(1, 0x11, bytes(12) + b"\x00\x01\x02tlv"), ProxyHeader(16 + 12 + 6, ("0.0.0.0", 0))),
    ],
)
def test_parse_proxy_header(data: bytes, expected: ProxyHeader) -> None:
    assert parse_proxy_header(data) == expected


@pytest.mark.parametrize(
    ("data", "needed"),
    [(b"", 16), (b"PRO", 6), (b"PROXY TCP4 1.2", 15), (V2_SIG, 16), (V2_TCP4[:20], 28)],
)
def test_parse_proxy_header_asks_for_more(data: bytes, needed: int) -> None:
    assert parse_proxy_header(data) == needed


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 999.0.2.1 10.0.0.1 1 80\r\n",
        b"PROXY TCP4 2001:db8::1 10.0.0.1 1 80\r\n",  # v6 address in a TCP4 line
        b"PROXY TCP4 192.0.2.1 10.0.0.1 99999 80\r\n",
        b"PROXY TCP9 a b c d\r\n",
        b"PROXY " + b"x" * 200,  # no CRLF within 107 bytes
        V2_SIG + b"\x31\x11\x00\x00",  # version 3
        V2_SIG + b"\x2f\x11\x00\x00",  # command 15
    ],
)
def test_parse_proxy_header_rejects_garbage(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(data)


async def exchange(port: int, payload: bytes, context: ssl.SSLContext | None = None) -> bytes:
    """Send ``payload`` (and, with ``context``, a TLS request after it) and read to EOF."""
    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
    request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    if context is None:
        await stream.send_all(payload + request)
    else:
        await stream.send_all(payload)
        stream = trio.SSLStream(stream, context, server_hostname="127.0.0.1")
        await stream.send_all(request)
    data = b""
    try:
        while chunk := await stream.receive_some():
            data += chunk
    except trio.BrokenResourceError:
        pass
    await trio.aclose_forcefully(stream)
    return data


def remote_addr(response: bytes) -> str:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), response[:100]
    return str(json.loads(body)["REMOTE_ADDR"])


@pytest.mark.parametrize("header", [b"PROXY TCP4 192.0.2.1 10.0.0.1 56324 80\r\n", V2_TCP4])
async def test_proxy_protocol_end_to_end(header: bytes, nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        server = await serve_wsgi(whoami, nursery, bind="127.0.0.1:0", proxy_protocol=True)
        assert remote_addr(await exchange(server.port, header)) == "192.0.2.1"
        # A health check (LOCAL) keeps the real peer.
        assert remote_addr(await exchange(server.port, v2(0, 0, b""))) == "127.0.0.1"
        # No header where one is required: refused, nothing served.
        assert await exchange(server.port, b"") == b""


async def test_proxy_protocol_before_tls(
    nursery: trio.Nursery,
    tls_cert_files: tuple[str, str, str],
    client_ssl_context: ssl.SSLContext,
) -> None:
    certfile, keyfile, _ = tls_cert_files
    with trio.fail_after(10):
        server = await serve_wsgi(
            whoami,
            nursery,
            bind="127.0.0.1:0",
            proxy_protocol=True,
            certfile=certfile,
            keyfile=keyfile,
        )
        response = await exchange(server.port, V2_TCP4, client_ssl_context)
        assert remote_addr(response) == "192.0.2.1"


async def test_proxy_protocol_only_from_trusted_peers(nursery: trio.Nursery) -> None:
    """From an untrusted peer the PROXY line is not special: it is a bad HTTP request."""
    with trio.fail_after(10):
        server = await serve_wsgi(
            whoami,
            nursery,
            bind="127.0.0.1:0",
            proxy_protocol=True,
            forwarded_allow_ips=["10.0.0.0/8"],
        )
        response = await exchange(server.port, b"PROXY TCP4 192.0.2.1 10.0.0.1 56324 80\r\n")
        assert response.startswith(b"HTTP/1.1 400 ")


def test_allow_list_dataclass_defaults_trust_nobody() -> None:
    assert not AllowList().trusts("127.0.0.1")
    assert not AllowList().trusts(None)
