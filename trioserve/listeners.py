"""Turning ``--bind`` addresses into listening sockets.

Address forms:

* ``HOST:PORT`` / ``[IPv6]:PORT`` / ``:PORT`` (all interfaces) / ``PORT``: TCP;
  port 0 picks a free port (the bound port is reported back).
* ``unix:PATH``: a unix-domain socket; a stale socket file is replaced.
* ``fd://N``: an already-bound, listening socket inherited as descriptor N.

And systemd socket activation (:func:`systemd_listeners`): sockets passed as
descriptors 3, 4, ... with ``LISTEN_FDS``/``LISTEN_PID`` in the environment.

Binding happens before the server reports itself started, so errors such as
"address already in use" surface as one :class:`BindError` with a clear message.
:func:`bind_listeners` opens every ``--bind`` address of a :class:`Config`; the
server (one process) and the supervisor of ``-w N`` both use it.

A unix socket file this process created is removed again when its server stops
(:func:`remove_socket_files`), but only if the path still holds that very
socket: a newer server that took the path over keeps its socket.
"""

from __future__ import annotations

import errno
import os
import socket as stdlib_socket
import stat
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from .config import ConfigError

if TYPE_CHECKING:
    from .config import Config


class BindError(ConfigError):
    """A ``--bind`` address could not be parsed or bound.

    A malformed address is a bad option (exit status 2); one that cannot be
    bound (:func:`bind_failure`) makes the trioserve command exit with 1.
    """


def bind_failure(message: str) -> BindError:
    """A BindError for an address that is well formed but cannot be bound or used."""
    error = BindError(message)
    error.exit_status = 1
    return error


@dataclass(frozen=True)
class BindAddress:
    """A parsed ``--bind`` value."""

    kind: str  # "tcp", "unix" or "fd"
    host: str | None = None
    port: int = 0
    path: str = ""
    fd: int = -1

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "fd":
            return f"fd://{self.fd}"
        host = self.host or "*"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def parse_bind(text: str) -> BindAddress:
    """Parse one ``--bind`` value (see the module docstring for the forms)."""
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise BindError(f"bind address {text!r} has no path")
        return BindAddress("unix", path=path)
    if text.startswith("fd://"):
        try:
            return BindAddress("fd", fd=int(text[len("fd://") :]))
        except ValueError:
            raise BindError(f"bind address {text!r}: descriptor must be a number") from None
    if "://" in text:
        scheme = text.partition("://")[0]
        raise BindError(
            f"bind address {text!r}: give HOST:PORT without {scheme}://"
            " (the scheme follows from --certfile)"
        )
    host: str | None
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise BindError(f"bind address {text!r}: expected [IPv6]:PORT")
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    else:
        host, port_text = None, text
    try:
        port = int(port_text)
    except ValueError:
        raise BindError(f"bind address {text!r}: port must be a number") from None
    if not 0 <= port <= 65535:
        raise BindError(f"bind address {text!r}: port out of range")
    if host and any(char in host for char in "/[] "):
        raise BindError(f"bind address {text!r}: {host!r} is not a host name or IP address")
    return BindAddress("tcp", host=host or None, port=port)


def format_sockname(sock: trio.socket.SocketType) -> str:
    """A socket's local address as a bind-style string (``127.0.0.1:8000``, ``unix:/p``)."""
    name = sock.getsockname()
    if sock.family == stdlib_socket.AF_UNIX:
        return f"unix:{name}"
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if sock.family == stdlib_socket.AF_INET6 else f"{host}:{port}"


async def open_listeners(
    address: BindAddress, backlog: int, *, unix_mode: str | None = None
) -> list[trio.SocketListener]:
    """Bind and listen on ``address``.

    Raises:
      BindError: with a one-line reason (in use, permission, bad descriptor...).
    """
    try:
        if address.kind == "tcp":
            return await trio.open_tcp_listeners(address.port, host=address.host, backlog=backlog)
        if address.kind == "unix":
            listener = await _open_unix_listener(address.path, backlog)
            if unix_mode is not None:
                os.chmod(address.path, int(unix_mode, 8))
            return [listener]
        return [_adopt_fd(address.fd)]
    except OSError as exc:
        raise bind_failure(f"cannot bind {address}: {_reason(exc, address)}") from None


async def bind_listeners(config: Config) -> list[trio.SocketListener]:
    """Bind every ``--bind`` address of ``config`` (backlog, unix socket mode), in order.

    Raises:
      BindError: for the first address that cannot be bound; the ones already
        bound are closed (and their unix socket files removed) first.
    """
    bound: list[trio.SocketListener] = []
    try:
        for text in config.bind:
            address = parse_bind(text)
            bound.extend(
                await open_listeners(address, config.backlog, unix_mode=config.unix_socket_mode)
            )
    except BaseException:
        for listener in bound:
            listener.socket.close()
        remove_socket_files(bound)
        raise
    return bound


def _reason(exc: OSError, address: BindAddress) -> str:
    """Why binding failed, in words (a failed name lookup has a negative errno of its own)."""
    if isinstance(exc, stdlib_socket.gaierror):
        return f"cannot resolve host {address.host!r} ({exc.strerror or exc})"
    if exc.errno == errno.EADDRINUSE:
        return "address already in use"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "no interface of this machine has that address"
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return reason.lower()


# Unix socket files this process created: socket -> (path, device, inode) of the file.
_created_socket_files: weakref.WeakKeyDictionary[trio.socket.SocketType, tuple[str, int, int]] = (
    weakref.WeakKeyDictionary()
)


def remove_socket_files(listeners: Iterable[trio.SocketListener]) -> None:
    """Remove the unix socket files of ``listeners`` that this process created.

    Call it once the listeners are closed. A path that now holds another file
    (a newer server bound it meanwhile) is left alone; so are inherited sockets
    (``fd://N``, systemd's), which this process did not create.
    """
    for listener in listeners:
        created = _created_socket_files.pop(listener.socket, None)
        if created is None:
            continue
        path, device, inode = created
        try:
            info = os.stat(path)
            if (info.st_dev, info.st_ino) == (device, inode) and stat.S_ISSOCK(info.st_mode):
                os.unlink(path)
        except OSError:
            pass  # already gone, or not ours to remove


async def _open_unix_listener(path: str, backlog: int) -> trio.SocketListener:
    try:
        is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
    except FileNotFoundError:
        is_socket = False
    if is_socket:
        # A socket file is stale only if nobody answers on it: never take
        # over the socket of a server that is still running.
        probe = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        try:
            await probe.connect(path)
        except OSError:
            os.unlink(path)  # stale socket from an earlier run
        else:
            raise OSError(errno.EADDRINUSE, "address already in use")
        finally:
            probe.close()
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(backlog)
        info = os.stat(path)
    except BaseException:
        sock.close()
        raise
    _created_socket_files[sock] = (path, info.st_dev, info.st_ino)
    return trio.SocketListener(sock)


def _adopt_fd(fd: int) -> trio.SocketListener:
    raw = stdlib_socket.socket(fileno=fd)
    if raw.type != stdlib_socket.SOCK_STREAM:
        raw.detach()
        raise bind_failure(f"cannot bind fd://{fd}: not a stream socket")
    try:
        name = raw.getsockname()
        if raw.family in (stdlib_socket.AF_INET, stdlib_socket.AF_INET6) and name[1] == 0:
            # listen() would bind it to a random port on every interface.
            raw.detach()
            raise bind_failure(f"cannot bind fd://{fd}: the socket is not bound to an address")
        if not raw.getsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_ACCEPTCONN):
            raw.listen()
    except OSError:
        raw.detach()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(raw))


# First descriptor systemd passes (sd_listen_fds(3): SD_LISTEN_FDS_START).
SD_LISTEN_FDS_START = 3


def systemd_listeners() -> list[trio.SocketListener]:
    """Listening sockets passed by systemd socket activation, or [] if there are none.

    Only when ``LISTEN_PID`` names this very process (the variables may have
    been inherited by accident). The variables are then removed, as
    sd_listen_fds() does, so child processes do not claim the sockets again.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        raise bind_failure("socket activation: LISTEN_FDS is not a number") from None
    for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(variable, None)
    return [_adopt_fd(fd) for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)]
