"""Working behind proxies: whom to trust, forwarding headers, and the PROXY protocol.

Nothing here does I/O or imports trio.

Trust. ``--forwarded-allow-ips`` lists the peers (addresses, CIDRs, ``unix``
for unix-socket peers, ``*`` for everyone) allowed to speak for the client.
Forwarding headers from any other peer are removed from the environ, so an
app can never be fooled by a client that writes ``X-Forwarded-For`` itself.

Forwarding headers from a trusted peer (``Forwarded``, RFC 7239, wins over the
``X-Forwarded-*`` family) are read right to left: each proxy appends what it
saw, so the rightmost entries are the most trustworthy. The client is the
first address, from the right, that is not itself a trusted proxy; anything
left of it could have been made up by that client. Scheme, host and port are
taken from the same hop (``Forwarded``) or from the rightmost value
(``X-Forwarded-Proto/-Host/-Port``, which proxies normally overwrite).

PROXY protocol v1 (text) and v2 (binary), as sent by HAProxy and AWS NLB,
replace the connection's peer address before anything else is read;
:func:`parse_proxy_header` parses one from the first bytes of a connection.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from .config import ConfigError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

FORWARDING_KEYS = (
    "HTTP_FORWARDED",
    "HTTP_X_FORWARDED_FOR",
    "HTTP_X_FORWARDED_PROTO",
    "HTTP_X_FORWARDED_HOST",
    "HTTP_X_FORWARDED_PORT",
)


@dataclass(frozen=True)
class AllowList:
    """The peers trusted to forward client information."""

    networks: tuple[Network, ...] = ()
    unix: bool = False
    everyone: bool = False

    def trusts(self, address: str | None) -> bool:
        """Is ``address`` (None: a unix-socket peer) a trusted proxy?"""
        if self.everyone:
            return True
        if address is None:
            return self.unix
        ip = _parse_ip(address)
        return ip is not None and any(ip in network for network in self.networks)


def parse_allow_list(entries: Iterable[str]) -> AllowList:
    """Parse ``--forwarded-allow-ips`` entries. Raises ConfigError for a bad one."""
    networks: list[Network] = []
    unix = everyone = False
    for entry in entries:
        for item in entry.split(","):
            item = item.strip()
            if not item:
                continue
            if item == "*":
                everyone = True
            elif item == "unix":
                unix = True
            else:
                try:
                    networks.append(ipaddress.ip_network(item, strict=False))
                except ValueError:
                    raise ConfigError(
                        f"forwarded-allow-ips: {item!r} is not an address, a CIDR, 'unix' or '*'"
                    ) from None
    return AllowList(tuple(networks), unix, everyone)


def _parse_ip(text: str) -> Address | None:
    try:
        ip = ipaddress.ip_address(text.strip("[]").split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


# ---- forwarding headers ------------------------------------------------------------

# One RFC 7239 "forwarded-pair": token=token or token="quoted string".
_PAIR = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)\s*')


def _parse_forwarded(value: str) -> tuple[list[dict[str, str]], bool]:
    """The trustworthy tail of a Forwarded header: one dict per hop, rightmost last.

    Each proxy appends its own element, so a malformed element can only come
    from further left (the client, or a proxy we cannot vouch for): parsing
    stops there and only the well-formed elements to its right are returned,
    with True for "stopped at a malformed element".
    """
    elements: list[dict[str, str]] = []
    for element_text in reversed(value.split(",")):
        element: dict[str, str] = {}
        for pair in element_text.split(";"):
            if not pair.strip():
                continue
            match = _PAIR.fullmatch(pair)
            if match is None:
                elements.reverse()
                return elements, True
            key, raw = match.group(1).lower(), match.group(2)
            if raw.startswith('"'):
                raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
            element[key] = raw
        if not element:
            elements.reverse()
            return elements, True
        elements.append(element)
    elements.reverse()
    return elements, False


def _split_node(node: str) -> tuple[str, str | None]:
    """``"[2001:db8::1]:8080"`` -> ("2001:db8::1", "8080"); ``"192.0.2.1"`` -> (addr, None)."""
    node = node.strip()
    if node.startswith("["):
        host, _, rest = node[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") and rest[1:].isdigit() else None
    if node.count(":") == 1:
        host, _, port = node.partition(":")
        return host, port if port.isdigit() else None
    return node, None


def _pick_client(nodes: list[str], allow: AllowList) -> int:
    """Index of the client in a right-to-left chain of proxies (see the module docstring)."""
    for index in range(len(nodes) - 1, -1, -1):
        host, _ = _split_node(nodes[index])
        if index == 0 or not allow.trusts(host):
            return index
    return 0


def apply_forwarded(environ: MutableMapping[str, Any], allow: AllowList) -> None:
    """Rewrite REMOTE_ADDR, wsgi.url_scheme, HTTP_HOST, SERVER_NAME/PORT from a trusted
    proxy's forwarding headers; remove those headers when the peer is not trusted."""
    if not any(key in environ for key in FORWARDING_KEYS):
        return
    if not allow.trusts(environ.get("REMOTE_ADDR")):
        for key in FORWARDING_KEYS:
            environ.pop(key, None)
        return
    client: str | None = None
    port: str | None = None
    proto = host = forwarded_port = None
    forwarded = environ.get("HTTP_FORWARDED")
    if forwarded is not None:
        elements, truncated = _parse_forwarded(forwarded)
        nodes = [element.get("for", "") for element in elements]
        index = _pick_client(nodes, allow) if elements else -1
        if index < 0 or (truncated and allow.trusts(_split_node(nodes[index])[0])):
            # The client's hop is in the unparsable part, yet the proxy speaks
            # Forwarded (so an X-Forwarded-For beside it may be the client's
            # own). Believe nothing.
            return
        chosen = elements[index]
        if "for" in chosen:
            client, port = _split_node(chosen["for"])
        proto = chosen.get("proto")
        host = chosen.get("host")
    else:
        xff = environ.get("HTTP_X_FORWARDED_FOR")
        if xff:
            nodes = [node.strip() for node in xff.split(",") if node.strip()]
            if nodes:
                client, port = _split_node(nodes[_pick_client(nodes, allow)])
        proto = _last(environ.get("HTTP_X_FORWARDED_PROTO"))
        host = _last(environ.get("HTTP_X_FORWARDED_HOST"))
        forwarded_port = _last(environ.get("HTTP_X_FORWARDED_PORT"))
    if client is not None and _parse_ip(client) is not None:
        environ["REMOTE_ADDR"] = str(_parse_ip(client))
        if port is not None:
            environ["REMOTE_PORT"] = port
        else:
            environ.pop("REMOTE_PORT", None)
    if proto is not None and proto.lower() in ("http", "https"):
        environ["wsgi.url_scheme"] = proto.lower()
    if host:
        environ["HTTP_HOST"] = host
        name, host_port = _split_node(host)
        environ["SERVER_NAME"] = name
        environ["SERVER_PORT"] = host_port or (
            "443" if environ["wsgi.url_scheme"] == "https" else "80"
        )
    if forwarded_port is not None and forwarded_port.isdigit():
        environ["SERVER_PORT"] = forwarded_port


def _last(value: str | None) -> str | None:
    if not value:
        return None
    return value.rsplit(",", 1)[-1].strip() or None


# ---- the PROXY protocol ---------------------------------------------------------------

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest valid v1 line, CRLF included (the spec's own figure)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX = 16 + 65535


class ProxyHeaderError(ValueError):
    """The connection did not start with a valid PROXY protocol header."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed PROXY header: how long it was and whom it names as the client."""

    length: int
    client: tuple[str, int] | None  # None: LOCAL (health check) or UNKNOWN family


def parse_proxy_header(data: bytes) -> ProxyHeader | int:
    """Parse a PROXY v1/v2 header at the start of ``data``.

    Returns the header, or the total number of bytes needed when ``data`` is
    too short to decide (call again with at least that many). Raises
    :class:`ProxyHeaderError` if the bytes cannot be a PROXY header.
    """
    if data.startswith(V2_SIGNATURE[: len(data)]) and len(data) < 16:
        return 16
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if data.startswith(V1_PREFIX[: len(data)]) and len(data) < len(V1_PREFIX):
        return len(V1_PREFIX)
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    raise ProxyHeaderError("no PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | int:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 line too long")
        return len(data) + 1
    parts = data[:end].decode("ascii", "replace").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(end + 2, None)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 line")
    source, source_port = parts[2], parts[4]
    ip = _parse_ip(source)
    if ip is None or ip.version != (4 if parts[1] == "TCP4" else 6):
        raise ProxyHeaderError("bad source address in PROXY v1 line")
    if not source_port.isdigit() or not 0 <= int(source_port) <= 65535:
        raise ProxyHeaderError("bad source port in PROXY v1 line")
    return ProxyHeader(end + 2, (str(ip), int(source_port)))


def _parse_v2(data: bytes) -> ProxyHeader | int:
    version_command, family = data[12], data[13]
    total = 16 + int.from_bytes(data[14:16], "big")
    if version_command >> 4 != 2:
        raise ProxyHeaderError("unsupported PROXY protocol version")
    if len(data) < total:
        return total
    command = version_command & 0x0F
    if command == 0x0:  # LOCAL: the proxy's own connection (health checks)
        return ProxyHeader(total, None)
    if command != 0x1:
        raise ProxyHeaderError("unknown PROXY v2 command")
    body = data[16:total]
    if family == 0x11 and len(body) >= 12:  # TCP over IPv4
        address = ipaddress.IPv4Address(body[0:4])
        return ProxyHeader(total, (str(address), int.from_bytes(body[8:10], "big")))
    if family == 0x21 and len(body) >= 36:  # TCP over IPv6
        address6 = ipaddress.IPv6Address(body[0:16])
        mapped = address6.ipv4_mapped
        return ProxyHeader(total, (str(mapped or address6), int.from_bytes(body[32:34], "big")))
    return ProxyHeader(total, None)  # UNSPEC, UDP or unix: no usable client address
