"""What the app saw: :class:`AppProbe` wraps an app and records each invocation."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from ..wsgi import StartResponse, WSGIApp


@dataclass(eq=False)
class AppRecord:
    """What one app invocation saw and did, filled in from its worker thread."""

    environ: dict[str, Any]
    body_read: bytearray = field(default_factory=bytearray)
    bytes_written: int = 0
    cancelled: bool = False  # trio.Cancelled reached the app (reset, disconnect, shutdown)
    close_calls: int = 0  # how often the iterable's close() was called (PEP 3333: once)
    exception: BaseException | None = None  # what the app raised, if anything
    thread: str = ""
    finished: trio.Event = field(default_factory=trio.Event)

    @property
    def closed(self) -> bool:
        """The iterable's close() was called."""
        return self.close_calls > 0

    @property
    def path(self) -> str:
        return str(self.environ.get("PATH_INFO", ""))


class AppProbe:
    """Wrap a WSGI app to record what each invocation saw (an :class:`AppRecord`).

    The wrapper is transparent: list responses stay lists (the server's
    one-hop fast path still applies), streamed ones keep their ``close()``.
    """

    def __init__(self, app: WSGIApp) -> None:
        self.app = app
        self.records: list[AppRecord] = []
        self._lock = threading.Lock()
        self._token: trio.lowlevel.TrioToken | None = None
        self._added = trio.Event()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        record = AppRecord(environ=environ, thread=threading.current_thread().name)
        with self._lock:
            self.records.append(record)
        trio.from_thread.run_sync(self._notify_added)
        environ["wsgi.input"] = _RecordingInput(environ["wsgi.input"], record)

        def recording_start_response(*args: Any) -> Any:
            write = start_response(*args)

            def recording_write(data: bytes) -> None:
                try:
                    write(data)
                except trio.Cancelled:
                    record.cancelled = True
                    raise
                record.bytes_written += len(data)

            return recording_write

        try:
            result = self.app(environ, recording_start_response)
        except BaseException as exc:
            record.cancelled |= isinstance(exc, trio.Cancelled)
            record.exception = exc
            self._finish(record)
            raise
        if isinstance(result, list | tuple):
            record.bytes_written += sum(len(chunk) for chunk in result)
            self._finish(record)
            return result
        return _RecordingIterable(result, record, self)

    def _notify_added(self) -> None:
        self._added.set()
        self._added = trio.Event()

    def _finish(self, record: AppRecord) -> None:
        if not record.cancelled:
            try:
                trio.from_thread.check_cancelled()
            except trio.Cancelled:
                record.cancelled = True
        trio.from_thread.run_sync(record.finished.set)

    async def wait_started(self, count: int = 1) -> AppRecord:
        """Wait until ``count`` requests have reached the app; return the last of them."""
        while len(self.records) < count:
            await self._added.wait()
        return self.records[count - 1]

    async def wait_finished(self, index: int = -1, *, path: str | None = None) -> AppRecord:
        """Wait until a request has finished in the app, and return its record.

        The request is ``records[index]`` (default: the latest to start), or the
        first one for ``path`` (PATH_INFO) if given. "Finished" means the app
        returned a list, raised, or its iterable's close() was called.
        """
        if path is not None:
            while (record := self.find(path)) is None:
                await self._added.wait()
        else:
            if not self.records:
                await self.wait_started()
            record = self.records[index]
        await record.finished.wait()
        return record

    def find(self, path: str) -> AppRecord | None:
        """The first record whose PATH_INFO is ``path``, or None."""
        return next((record for record in self.records if record.path == path), None)


class _RecordingInput:
    def __init__(self, wrapped: Any, record: AppRecord) -> None:
        self._wrapped = wrapped
        self._record = record

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._wrapped, name)(*args)
        except trio.Cancelled:
            self._record.cancelled = True
            raise

    def read(self, *args: Any) -> bytes:
        data: bytes = self._call("read", *args)
        self._record.body_read += data
        return data

    def readline(self, *args: Any) -> bytes:
        data: bytes = self._call("readline", *args)
        self._record.body_read += data
        return data

    def readlines(self, *args: Any) -> list[bytes]:
        lines: list[bytes] = self._call("readlines", *args)
        for line in lines:
            self._record.body_read += line
        return lines

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")


class _RecordingIterable:
    def __init__(self, wrapped: Iterable[bytes], record: AppRecord, probe: AppProbe) -> None:
        self._wrapped = wrapped
        self._record = record
        self._probe = probe

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._wrapped:
                self._record.bytes_written += len(chunk)
                yield chunk
        except BaseException as exc:
            self._record.cancelled |= isinstance(exc, trio.Cancelled)
            if not isinstance(exc, GeneratorExit):
                self._record.exception = exc
            raise

    def close(self) -> None:
        try:
            close = getattr(self._wrapped, "close", None)
            if close is not None:
                close()
        finally:
            self._record.close_calls += 1
            self._probe._finish(self._record)
