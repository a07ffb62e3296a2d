"""Static files: a PEP 3333 app that serves the files under one directory.

``trioserve --root DIR`` serves ``StaticFiles(DIR)``; as a plain WSGI app it can
also be mounted under another app (a dispatcher that moves the mount point
into ``SCRIPT_NAME`` and leaves the rest in ``PATH_INFO``, as werkzeug's
``DispatcherMiddleware`` does)::

    from trioserve.static import StaticFiles
    app = DispatcherMiddleware(flask_app, {"/static": StaticFiles("site/static")})

Security: never a file outside the root
=======================================

Every request path goes through these steps, in this order, and any step that
fails ends the request before a file is opened:

1. ``PATH_INFO`` arrives percent-decoded and latin-1 decoded (PEP 3333). It is
   re-encoded to latin-1 and decoded as UTF-8, so ``%20``, spaces and UTF-8
   names work; bytes that are not UTF-8 give 404.
2. Refused with 403, whatever exists on disk: a NUL byte, a backslash (a path
   separator on Windows, and never needed in a URL), or a ``..`` segment.
   ``%2e%2e`` and ``..%2f`` arrive already decoded as ``..`` and ``../``, so
   they are caught here too. A segment that is absolute or has a drive
   (``os.path.isabs``, ``os.path.splitdrive``) is refused the same way.
3. Empty segments are dropped (``//etc/passwd`` is ``etc/passwd`` *under the
   root*), and the remaining segments are joined onto the root one by one:
   an absolute path never reaches ``os.path.join``, which would otherwise
   discard the root.
4. The candidate is resolved with :func:`os.path.realpath`, which follows
   every symlink, and must be inside the (also resolved) root according to
   :func:`os.path.commonpath`; otherwise 403. So a symlink inside the root
   that points outside it (to a file or a directory) is refused, and one that
   points elsewhere inside the root is served. The ``index.html`` of a
   directory is resolved and checked the same way.
5. Only regular files are served: ``stat`` must say ``S_ISREG`` before the
   file is opened, and ``fstat`` on the opened descriptor must say it again.
   A FIFO (whose open would block), a device or a socket under the root is
   404. The file is opened with ``O_NOFOLLOW`` and ``O_NONBLOCK`` where the
   platform has them, so a last-moment swap of the file for a symlink or a
   FIFO fails instead of escaping or blocking.

Forbidden paths (steps 2 and 4) are 403 whether or not the target exists, so
the answer reveals nothing about files outside the root; missing files are 404.

The check and the open are still separate system calls: someone who can
rename directories or create symlinks under the root *while the server runs*
could race them (Python has no ``openat2(RESOLVE_BENEATH)``). Serve
directories that untrusted users cannot write to.

Each rule has tests with real attack paths in tests/test_static.py.

Redirects (a directory requested without its trailing slash) are built from
the cleaned segments, never from the raw path, so ``//evil.example`` cannot
turn into a protocol-relative ``Location``.

HTTP behaviour
==============

- ``GET`` and ``HEAD``; any other method gets 405 with ``Allow: GET, HEAD``.
- A directory serves its ``index.html`` (the ``index`` argument). A directory
  path without a trailing slash is redirected (301) to the slash form, so that
  relative links in the index page resolve against the directory. A directory
  without an index is 403 Forbidden, as nginx and Apache answer when listings
  are off: there are no listings.
- The query string is ignored for the lookup (and kept in redirects).
- ``Content-Type`` from the extension of the name asked for (the index's name
  for a directory), looked up in an explicit table (:data:`CONTENT_TYPES`, so
  the answer does not depend on the machine's ``/etc/mime.types``); anything
  else is ``application/octet-stream``. Types go out bare, as nginx and Apache
  send them unless told otherwise (and as test suites that compare the whole
  header expect); ``charset="utf-8"`` adds ``; charset=utf-8`` to ``text/*``
  types (``--static-charset``).
- ``Content-Length``, ``Last-Modified``, a strong ``ETag`` built from the size
  and the modification time in nanoseconds, ``Accept-Ranges: bytes``, and
  ``Cache-Control`` only if the ``cache_control`` argument is given.
- 304 Not Modified for ``If-None-Match`` (weak comparison; a list of tags and
  ``*`` work) or, only when there is no ``If-None-Match``,
  ``If-Modified-Since``.
- One byte range (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``) gives 206 with
  ``Content-Range``; a range that starts past the end gives 416 with
  ``Content-Range: bytes */SIZE``. A request for *several* ranges gets the
  whole file with 200 (allowed by RFC 9110 §14.2: a server may ignore Range),
  which spares us multipart/byteranges. A malformed Range is ignored the same
  way. ``If-Range`` (an ETag, compared strongly, or a date that must equal
  ``Last-Modified``) is honoured: when it does not match, the whole file is sent.
  Range applies to GET only (RFC 9110 §14.2); a HEAD gets the 200 head.
- The body goes through ``environ["wsgi.file_wrapper"]`` in blocks, so a large
  file streams in bounded memory. The object handed to it is a
  :class:`FileRange`: it reads exactly the bytes announced in
  ``Content-Length`` and exposes ``fileno()``, ``offset`` and ``length`` so a
  server can send it with ``os.sendfile``.
- Errors (403, 404, 405, 416) are short ``text/plain`` bodies.
"""

from __future__ import annotations

import email.utils
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import quote

__all__ = ["CONTENT_TYPES", "FileRange", "StaticFiles"]

Environ = dict[str, Any]
StartResponse = Callable[..., Callable[[bytes], None]]

DEFAULT_BLOCK_SIZE = 64 * 1024

#: Content-Type by lower-cased file extension. Explicit, so that responses do
#: not depend on the machine's mime.types. Extend it with ``content_types=``.
CONTENT_TYPES: Mapping[str, str] = {
    ".html": "text/html",
    ".htm": "text/html",
    ".css": "text/css",
    ".js": "text/javascript",  # RFC 9239
    ".mjs": "text/javascript",
    ".json": "application/json",  # RFC 8259: always UTF-8, no charset parameter
    ".map": "application/json",
    ".txt": "text/plain",
    ".md": "text/markdown",
    ".csv": "text/csv",
    ".xml": "application/xml",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".gif": "image/gif",
    ".svg": "image/svg+xml",
    ".webp": "image/webp",
    ".avif": "image/avif",
    ".ico": "image/vnd.microsoft.icon",
    ".swf": "application/x-shockwave-flash",
    ".wasm": "application/wasm",
    ".pdf": "application/pdf",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".otf": "font/otf",
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
    ".wav": "audio/wav",
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".zip": "application/zip",
    ".gz": "application/gzip",
}
DEFAULT_CONTENT_TYPE = "application/octet-stream"

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
_OPEN_FLAGS |= getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)


class FileRange:
    """A read-only view of ``length`` bytes of an open file, starting at ``offset``.

    ``read(n)`` never goes past ``offset + length``, even if the file grows
    meanwhile, so the body always matches the ``Content-Length`` announced. If
    the file shrinks, ``read`` returns ``b""`` early and the server sees a short
    response (which it aborts rather than pass on).

    For a server that wants ``os.sendfile``: ``fileno()`` is the descriptor,
    and the bytes to send are ``length`` bytes from ``offset``
    (``os.sendfile(sock, f.fileno(), f.offset, f.length)``). The descriptor's
    own position also starts at ``offset``; ``position``/``remaining`` track
    what ``read`` has consumed. ``close()`` closes the descriptor.
    """

    def __init__(self, fd: int, offset: int = 0, length: int = 0, name: str = "") -> None:
        self.fd = fd
        self.name = name
        self.closed = False
        self.offset = self.length = self.position = 0
        if offset or length:
            self.select(offset, length)

    def select(self, offset: int, length: int) -> None:
        """Make this the ``length`` bytes from ``offset`` (and move the descriptor there)."""
        if offset < 0 or length < 0:
            raise ValueError("offset and length cannot be negative")
        self.offset = self.position = offset
        self.length = length
        os.lseek(self.fd, offset, os.SEEK_SET)

    @property
    def remaining(self) -> int:
        return self.offset + self.length - self.position

    def fileno(self) -> int:
        return self.fd

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read from a closed FileRange")
        remaining = self.remaining
        if size is None or size < 0 or size > remaining:
            size = remaining
        if size <= 0:
            return b""
        data = os.read(self.fd, size)
        self.position += len(data)
        return data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def __repr__(self) -> str:
        return f"<FileRange {self.name!r} offset={self.offset} length={self.length}>"


class _FileIterator:
    """A stand-in for ``wsgi.file_wrapper`` when the server provides none."""

    def __init__(self, filelike: FileRange, block_size: int) -> None:
        self.filelike = filelike
        self.block_size = block_size

    def __iter__(self) -> Iterator[bytes]:
        while block := self.filelike.read(self.block_size):
            yield block

    def close(self) -> None:
        self.filelike.close()


class _Refused(Exception):
    """The request path is refused before the filesystem is consulted."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


class StaticFiles:
    """A WSGI app serving the files under ``root`` (see the module docstring).

    Args:
      root: the directory to serve. It is resolved (symlinks followed) once,
        here; it must exist and be a directory (``NotADirectoryError``).
      index: the file a directory request serves. A directory requested
        without its trailing slash is redirected (301) to the slash form, so
        that the index page's relative links resolve inside the directory.
      cache_control: the ``Cache-Control`` value for files (200, 206 and
        304), e.g. ``"public, max-age=3600"``; None sends none.
      block_size: bytes per block handed to ``wsgi.file_wrapper``.
      content_types: extra or overriding entries for :data:`CONTENT_TYPES`
        (lower-case extensions with their dot, e.g. ``{".mjs": ...}``).
      charset: added as ``; charset=...`` to ``text/*`` types that have no
        parameters yet (e.g. ``"utf-8"``); None sends the bare types.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        index: str = "index.html",
        cache_control: str | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        content_types: Mapping[str, str] | None = None,
        charset: str | None = None,
    ) -> None:
        real = os.path.realpath(os.fspath(root))
        if not os.path.isdir(real):
            raise NotADirectoryError(f"static root is not a directory: {os.fspath(root)!r}")
        if not index or "/" in index or "\\" in index or index in (".", ".."):
            raise ValueError(f"index must be a plain file name, not {index!r}")
        if block_size < 1:
            raise ValueError("block_size must be positive")
        self.root = real
        self.index = index
        self.cache_control = cache_control
        self.block_size = block_size
        self.content_types: dict[str, str] = dict(CONTENT_TYPES)
        if content_types:
            self.content_types.update({ext.lower(): kind for ext, kind in content_types.items()})
        if charset:
            for ext, kind in self.content_types.items():
                if kind.startswith("text/") and ";" not in kind:
                    self.content_types[ext] = f"{kind}; charset={charset}"

    # ---- the WSGI entry point ---------------------------------------------------

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return _error(start_response, "405 Method Not Allowed", head, [("Allow", "GET, HEAD")])
        path_info: str = environ.get("PATH_INFO", "")
        try:
            segments = _segments(path_info)
        except _Refused as refused:
            return _error(start_response, refused.status, head)
        try:
            path = self._resolve(segments)
            # The type comes from the name asked for, not from a symlink's target.
            name = segments[-1] if segments else ""
            mode = os.stat(path).st_mode
            if stat.S_ISDIR(mode):
                name = self.index
                path = self._resolve([*segments, self.index])
                try:
                    mode = os.stat(path).st_mode
                except FileNotFoundError:
                    # No index and no listings: forbidden, as nginx and Apache say.
                    raise _Refused("403 Forbidden") from None
                if stat.S_ISREG(mode) and not path_info.endswith("/"):
                    return self._redirect(environ, segments, start_response, head)
            elif path_info.endswith("/"):
                raise NotADirectoryError(path)  # "file.txt/" names no file
            if not stat.S_ISREG(mode):  # a FIFO would block open(); devices, sockets...
                raise FileNotFoundError(path)
            fd = os.open(path, _OPEN_FLAGS)
        except _Refused as refused:
            return _error(start_response, refused.status, head)
        except PermissionError:
            return _error(start_response, "403 Forbidden", head)
        except (OSError, ValueError):  # missing, ELOOP, ENAMETOOLONG, not a directory...
            return _error(start_response, "404 Not Found", head)
        # From here on ``body`` owns the descriptor; closing it twice is harmless
        # (never os.close() a number that another thread may have reused).
        body = FileRange(fd, 0, 0, path)
        try:
            return self._serve(environ, start_response, body, self.content_type(name), head)
        except BaseException:
            body.close()
            raise

    # ---- lookup -----------------------------------------------------------------

    def _resolve(self, segments: list[str]) -> str:
        """The real path for ``segments`` under the root; _Refused if it lies outside."""
        candidate = self.root
        for segment in segments:
            candidate = os.path.join(candidate, segment)
        real = os.path.realpath(candidate)
        if os.path.commonpath([self.root, real]) != self.root:
            raise _Refused("403 Forbidden")
        return real

    def _redirect(
        self,
        environ: Environ,
        segments: list[str],
        start_response: StartResponse,
        head: bool,
    ) -> Iterable[bytes]:
        # From the cleaned segments (never the raw path): no "//host" can come out.
        parts = [part for part in _native_bytes(environ.get("SCRIPT_NAME", "")).split(b"/") if part]
        parts += [segment.encode("utf-8", "surrogatepass") for segment in segments]
        location = "/" + "".join(quote(part, safe=_PCHAR) + "/" for part in parts)
        query = environ.get("QUERY_STRING", "")
        if query:
            location += "?" + query
        body = f"Moved permanently to {location}\n".encode("latin-1", "replace")
        start_response(
            "301 Moved Permanently",
            [
                ("Location", location),
                ("Content-Type", "text/plain; charset=utf-8"),  # our own ASCII text
                ("Content-Length", str(len(body))),
            ],
        )
        return [] if head else [body]

    def content_type(self, path: str) -> str:
        """The Content-Type for a file named ``path``, by its extension."""
        return self.content_types.get(os.path.splitext(path)[1].lower(), DEFAULT_CONTENT_TYPE)

    # ---- the response -----------------------------------------------------------

    def _serve(
        self,
        environ: Environ,
        start_response: StartResponse,
        body: FileRange,
        content_type: str,
        head: bool,
    ) -> Iterable[bytes]:
        info = os.fstat(body.fileno())
        if not stat.S_ISREG(info.st_mode):  # swapped for a FIFO or device since the stat
            body.close()
            return _error(start_response, "404 Not Found", head)
        size = info.st_size
        etag = f'"{size:x}-{info.st_mtime_ns:x}"'
        mtime = int(info.st_mtime)
        last_modified = email.utils.formatdate(mtime, usegmt=True)
        validators = [("Last-Modified", last_modified), ("ETag", etag)]
        if self.cache_control is not None:
            validators.append(("Cache-Control", self.cache_control))

        if _not_modified(environ, etag, mtime):
            body.close()
            start_response("304 Not Modified", validators)
            return []

        offset, length = 0, size
        status = "200 OK"
        extra: list[tuple[str, str]] = []
        if not head and _if_range_matches(environ.get("HTTP_IF_RANGE"), etag, last_modified):
            wanted = _parse_range(environ.get("HTTP_RANGE"), size)
            if isinstance(wanted, _Unsatisfiable):
                body.close()
                return _error(
                    start_response,
                    "416 Range Not Satisfiable",
                    head,
                    [("Content-Range", f"bytes */{size}")],
                )
            if wanted is not None:
                start, end = wanted
                offset, length = start, end - start + 1
                status = "206 Partial Content"
                extra.append(("Content-Range", f"bytes {start}-{end}/{size}"))

        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(length)),
            *validators,
            ("Accept-Ranges", "bytes"),
            *extra,
        ]
        if head:
            body.close()
            start_response(status, headers)
            return []
        body.select(offset, length)
        start_response(status, headers)
        file_wrapper = environ.get("wsgi.file_wrapper")
        if file_wrapper is None:
            return _FileIterator(body, self.block_size)
        result: Iterable[bytes] = file_wrapper(body, self.block_size)
        return result


# ---- helpers ----------------------------------------------------------------------


# Characters RFC 3986 allows unescaped in a path segment (besides unreserved ones).
_PCHAR = "!$&'()*+,;=:@"


def _native_bytes(native: str) -> bytes:
    """The bytes behind a PEP 3333 native string (UTF-8 if it is not latin-1 text)."""
    try:
        return native.encode("latin-1")
    except UnicodeEncodeError:
        return native.encode("utf-8", "surrogatepass")


def _utf8_path(native: str) -> str:
    """PEP 3333's latin-1 "native string" back to the UTF-8 text the client meant.

    Bytes that are not UTF-8 are refused with 404 (no such file can be named).
    A string that is not latin-1 at all did not come from a PEP 3333 server
    but from a dispatcher that decoded it already: it is taken as it is.
    """
    try:
        raw = native.encode("latin-1")
    except UnicodeEncodeError:
        return native
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Refused("404 Not Found") from None


def _segments(path_info: str) -> list[str]:
    """The path's non-empty segments, or _Refused for anything that could escape the root."""
    path = _utf8_path(path_info)
    if "\x00" in path or "\\" in path:
        raise _Refused("403 Forbidden")
    segments = []
    for segment in path.split("/"):
        if not segment or segment == ".":
            continue
        if segment == ".." or os.path.isabs(segment) or os.path.splitdrive(segment)[0]:
            raise _Refused("403 Forbidden")
        segments.append(segment)
    return segments


def _error(
    start_response: StartResponse,
    status: str,
    head: bool,
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    body = (status + "\n").encode("ascii")
    start_response(
        status,
        [
            ("Content-Type", "text/plain; charset=utf-8"),  # our own ASCII text
            ("Content-Length", str(len(body))),
            *(headers or ()),
        ],
    )
    return [] if head else [body]


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _http_date(value: str) -> int | None:
    """Seconds since the epoch for an HTTP-date, or None if it is not one."""
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:  # "-0000" or no zone: HTTP dates are GMT
        return None
    return int(parsed.timestamp())


def _entity_tags(value: str) -> list[str]:
    """The opaque tags of an If-None-Match list (weak ones without their ``W/``)."""
    tags = []
    for item in value.split(","):
        tag = item.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag:
            tags.append(tag)
    return tags


def _not_modified(environ: Environ, etag: str, mtime: int) -> bool:
    """RFC 9110 §13.2.2: If-None-Match first; If-Modified-Since only without it."""
    if_none_match = environ.get("HTTP_IF_NONE_MATCH")
    if if_none_match is not None:
        tags = _entity_tags(if_none_match)
        return "*" in tags or etag in tags  # weak comparison: W/ was stripped
    if_modified_since = environ.get("HTTP_IF_MODIFIED_SINCE")
    if if_modified_since is not None:
        since = _http_date(if_modified_since)
        return since is not None and mtime <= since
    return False


def _if_range_matches(value: str | None, etag: str, last_modified: str) -> bool:
    """RFC 9110 §13.1.5: may the Range be honoured? (True without If-Range.)"""
    if value is None:
        return True
    value = value.strip()
    if value.startswith(('"', "W/")):
        return value == etag  # strong comparison: a weak tag never matches
    since = _http_date(value)
    return since is not None and since == _http_date(last_modified)


_RANGE_SPEC = re.compile(r"[ \t]*(\d{0,30})-(\d{0,30})[ \t]*", re.ASCII)  # longer: ignored


class _Unsatisfiable:
    pass


_UNSATISFIABLE = _Unsatisfiable()


def _parse_range(value: str | None, size: int) -> tuple[int, int] | _Unsatisfiable | None:
    """One byte range as (first, last), _UNSATISFIABLE, or None to send the whole file.

    None for: no Range, a unit other than bytes, malformed syntax, or several
    ranges (we serve those with 200 rather than multipart/byteranges).
    """
    if value is None:
        return None
    unit, sep, spec = value.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    if "," in spec:
        return None
    match = _RANGE_SPEC.fullmatch(spec)
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not (first_text or last_text):
        return None
    if not first_text:  # bytes=-n: the last n bytes
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            return _UNSATISFIABLE
        return max(0, size - suffix), size - 1
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if last_text and last < first:
        return None  # invalid: RFC 9110 says ignore it
    if first >= size:
        return _UNSATISFIABLE
    return first, min(last, size - 1)
