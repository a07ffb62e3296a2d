"""Configuration: one frozen dataclass, the single source of every option.

Each field carries its command-line help in its metadata; :mod:`trioserve.cli`
builds the argument parser from these fields, so a flag and its config field
cannot drift apart, and a ``--config`` TOML file sets the same fields by name
(:mod:`trioserve.configfile`). Embedders pass a :class:`Config` (or keyword
overrides) to :func:`trioserve.serve_wsgi`.

Every default has its reason next to it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

COMMON_LOG_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s'


class ConfigError(ValueError):
    """An option has an invalid value. The message is one line, fit for a terminal.

    ``exit_status`` is what the trioserve command exits with when this ends it:
    2 for a bad option; subclasses for what fails only when used (binding an
    address, reading a TLS file) say 1.
    """

    exit_status = 2


def _option(default: Any, help: str, *, flags: tuple[str, ...] = (), metavar: str = "") -> Any:
    metadata = {"help": help, "flags": flags, "metavar": metavar}
    if isinstance(default, list | tuple):
        return field(default_factory=lambda: tuple(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything that can be configured. Create with keywords; change with ``replace()``."""

    bind: tuple[str, ...] = _option(
        # Loopback by default: exposing a server is a decision, not an accident.
        ("127.0.0.1:8000",),
        "address to listen on: HOST:PORT, [IPv6]:PORT, unix:PATH or fd://N; repeatable",
        flags=("-b", "--bind"),
        metavar="ADDRESS",
    )
    threads: int = _option(
        # Same as trio's default thread limiter: enough for apps that block on
        # I/O (databases, HTTP calls); CPU-bound apps gain nothing past a few.
        40,
        "worker threads for running the app (concurrent app calls per process)",
    )
    app_thread_scheduling: str = _option(
        # batch serves 5-14% more small requests on a busy core (every
        # protocol); an app thread woken by its own I/O then waits for the
        # running thread too. The command's threads are its own; an embedding
        # program's are not, so serve_wsgi leaves them alone unless asked
        # (trioserve/app_threads.py has the measurements).
        "auto",
        "how the kernel schedules the threads that run the app: batch (Linux's"
        " SCHED_BATCH: a thread handed a request does not preempt the event loop),"
        " normal (as they are), or auto: batch when the trioserve command serves,"
        " normal under serve_wsgi; ignored elsewhere than Linux",
        metavar="POLICY",
    )
    max_threads_per_connection: int = _option(
        # One HTTP/2 connection may run up to h2-max-concurrent-streams apps at
        # once; with a share, a single client (a zero-window attacker, say)
        # cannot hold every thread while others queue. Off by default: behind
        # a load balancer that multiplexes many users over one HTTP/2
        # connection, a share would cap the whole site's concurrency.
        0,
        "app threads one HTTP/2 connection may hold at once; 0 means no share (all of --threads)",
    )
    root_path: str = _option(
        "", "SCRIPT_NAME: the URL prefix the app is mounted under (e.g. /api)", metavar="PATH"
    )
    root: str | None = _option(
        # No default: serving a directory is a decision. Used by the trioserve
        # command only (serve_wsgi serves the app it is given).
        None,
        "serve the static files under DIR (trioserve.static.StaticFiles) instead of MODULE:ATTR",
        metavar="DIR",
    )
    static_charset: str | None = _option(
        # nginx and Apache send no charset unless configured, and clients that
        # compare Content-Type whole (test suites, some caches) expect none.
        None,
        "charset parameter added to the text/* Content-Types of --root files (e.g. utf-8);"
        " none: the bare type",
        metavar="CHARSET",
    )
    factory: bool = _option(False, "treat MODULE:ATTR as a factory: call it to get the app")
    # ---- logs ----------------------------------------------------------------------
    log_level: str = _option(
        "info", "error log level: debug, info, warning, error, critical", metavar="LEVEL"
    )
    error_log: str | None = _option(
        # stderr: what a service manager (systemd, Docker, Kubernetes) collects.
        None,
        "write the error log to FILE (appended; reopened if rotated away), or - for stderr",
        metavar="FILE",
    )
    access_log: str | None = _option(
        None, "write an access log line per request to FILE, or - for stdout", metavar="FILE"
    )
    access_log_format: str = _option(
        COMMON_LOG_FORMAT,
        "access log format: gunicorn-style %(atom)s fields (the default is the common log format)",
        metavar="FORMAT",
    )
    log_format: str = _option(
        # Text for people at a terminal; json is opted into by log shippers.
        "text",
        "text, or json: one JSON object per line (time, level, logger, message; access"
        " lines add their fields) for the error and access logs",
        metavar="FORMAT",
    )
    log_config: str | None = _option(
        None,
        "configure logging from FILE: a logging.config dictConfig in .json or .toml, or a"
        " fileConfig .ini; replaces --error-log, --access-log and --log-format",
        metavar="FILE",
    )
    # ---- metrics -------------------------------------------------------------------
    metrics_bind: str | None = _option(
        # Off: an open metrics port is a decision. On a listener of its own,
        # never the app's: the app's URL space, its proxies and its clients
        # never see it, and it can stay on loopback while the app does not.
        None,
        "serve Prometheus metrics at /metrics on ADDRESS (HOST:PORT or unix:PATH), counting"
        " every worker; needs prometheus_client (the metrics extra)",
        metavar="ADDRESS",
    )
    # ---- TLS ---------------------------------------------------------------------
    certfile: str | None = _option(
        None, "TLS certificate chain (PEM); enables HTTPS", metavar="FILE"
    )
    keyfile: str | None = _option(None, "TLS private key (PEM)", metavar="FILE")
    keyfile_password: str | None = _option(
        # OpenSSL's pass phrase syntax (openssl-passphrase-options(1)), so the
        # secret itself need not be on the command line: env: and file: keep it
        # out of ps and shell history, and workers get the source, not the secret.
        None,
        "password of an encrypted --keyfile: env:VAR (from an environment variable),"
        " file:PATH (first line of a file) or pass:TEXT (the password itself)",
        metavar="SOURCE",
    )
    ca_certs: str | None = _option(
        None,
        "CA certificates (PEM) that client certificates must chain to; with --cert-reqs",
        metavar="FILE",
    )
    cert_reqs: str = _option(
        # Client certificates are for the few deployments that ask for them.
        "none",
        "client certificates: none (not asked for), optional (verified if sent) or required",
        metavar="MODE",
    )
    ciphers: str | None = _option(
        # None: ECDHE/DHE with AES-GCM or ChaCha20 only, what RFC 9113 §9.2 lets
        # HTTP/2 use; TLS 1.3's suites are OpenSSL's and not affected.
        None,
        "OpenSSL cipher list for TLS 1.2 (e.g. ECDHE+AESGCM); none: the AEAD suites HTTP/2 allows",
        metavar="CIPHERS",
    )
    tls_min_version: str = _option(
        # HTTP/2 needs 1.2 or later (RFC 9113 §9.2); 1.3 alone shuts out some older clients.
        "1.2",
        "oldest TLS version accepted: 1.2 or 1.3",
        metavar="VERSION",
    )
    keep_alive_timeout: float = _option(
        # Long enough to reuse a connection between a page and its assets,
        # short enough that idle clients do not pin sockets (nginx 75 s, uvicorn 5 s).
        5.0,
        "seconds an idle keep-alive connection stays open",
        metavar="SECONDS",
    )
    graceful_timeout: float = _option(
        # Kubernetes' default termination grace period is 30 s.
        30.0,
        "seconds in-flight requests get to finish on shutdown before they are cancelled",
        metavar="SECONDS",
    )
    tls_handshake_timeout: float = _option(
        10.0, "seconds a client gets to finish the TLS handshake", metavar="SECONDS"
    )
    backlog: int = _option(
        # gunicorn's default; the kernel clamps it to net.core.somaxconn.
        2048,
        "listen() backlog: connections the kernel queues before they are accepted",
    )
    max_request_body_size: int = _option(
        # waitress uses the same 1 GiB: big uploads work, unbounded ones do not. 0 = no limit.
        1 * GiB,
        "largest request body accepted, in bytes (413 beyond); 0 means no limit",
        metavar="BYTES",
    )
    body_prebuffer: int = _option(
        # A client trickling its body (R.U.D.Y.) holds an app thread for as
        # long as it likes without ever stalling. Once half the threads are
        # busy, requests whose body is still arriving wait for it in trio (a
        # task, not a thread); with threads to spare, apps start at once and
        # can read a body as it streams in. Capped at 64 KiB (and at one
        # HTTP/2 stream window).
        64 * KiB,
        "when half the app threads are busy, a request waits (without a thread) until this"
        " much of its body, or all of it, has arrived; at most 64 KiB; 0 never waits",
        metavar="BYTES",
    )
    max_header_size: int = _option(
        # Request line plus headers. h11 uses 16 KiB, nginx 4 x 8 KiB; large
        # cookies are common enough to allow 64 KiB.
        64 * KiB,
        "largest request head (request line + headers) in bytes (431 beyond)",
        metavar="BYTES",
    )
    max_request_line_size: int = _option(
        # nginx and gunicorn allow about 8 KiB.
        8 * KiB,
        "longest request line (method, target, version) in bytes (414 beyond)",
        metavar="BYTES",
    )
    max_header_count: int = _option(
        100, "most header fields in one request (Apache's default; 431 beyond)"
    )
    h2_max_concurrent_streams: int = _option(
        # h2's own default and what most servers announce.
        100,
        "HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS; also caps live app calls per connection",
    )
    h2_initial_window_size: int = _option(
        # Request body bytes buffered per stream before the app reads them.
        # Larger than the 64 KiB protocol default so uploads are not
        # round-trip bound; the connection window is this times the stream limit.
        256 * KiB,
        "HTTP/2 receive window per stream, in bytes",
        metavar="BYTES",
    )
    h2_max_frame_size: int = _option(
        # The protocol minimum: small frames bound what one frame can make us buffer.
        16 * KiB,
        "largest HTTP/2 frame accepted, in bytes (16384..16777215)",
        metavar="BYTES",
    )
    h2_max_header_list_size: int = _option(
        64 * KiB,
        "HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE: largest decoded header block, in bytes",
        metavar="BYTES",
    )
    server_header: str = _option(
        "trioserve", 'value of the Server response header; "" to send none', metavar="TEXT"
    )
    # ---- processes -----------------------------------------------------------
    workers: int = _option(
        # One process needs no supervisor; more use more cores (the GIL).
        1,
        "worker processes; above 1 a supervisor binds the sockets once and runs N workers",
        flags=("-w", "--workers"),
    )
    max_requests: int = _option(
        # Off: recycling is a workaround for leaky apps, opted into.
        0,
        "gracefully restart a worker after it has served this many requests; 0 never",
    )
    max_requests_jitter: int = _option(
        0,
        "add a random 0..N to max-requests per worker, so workers do not restart together",
    )
    gc_threshold: int = _option(
        # Python's 700 makes the interpreter collect every few dozen requests:
        # a request's objects are young when a collection comes, so each one
        # scans the requests in flight and promotes them, and the promotions
        # bring full collections of the whole heap (docs/performance.md).
        7000,
        "a serving process's youngest-generation garbage-collector threshold (Python's"
        " default is 700, 2000 from 3.13), and what was loaded at startup is frozen"
        " (gc.freeze); 0 leaves the collector as Python set it",
        metavar="N",
    )
    reload: bool = _option(
        # Development only: watching files costs a little and restarts drop state.
        False,
        "restart the worker when a Python file under the --reload-dir directories changes"
        " (development)",
    )
    reload_dir: tuple[str, ...] = _option(
        (".",),
        "directory watched by --reload (its subdirectories too); repeatable",
        metavar="DIR",
    )
    pid: str | None = _option(
        None, "write the server's process id to FILE (removed on exit)", metavar="FILE"
    )
    chdir: str | None = _option(
        None,
        "change to DIR before anything else (app import, relative paths)",
        metavar="DIR",
    )
    user: str | None = _option(
        # Bind as root (port 443, a root-only key), serve as someone who cannot
        # do much: the app is imported only after the switch.
        None,
        "after binding, switch to this user (name or uid); needs root",
        metavar="USER",
    )
    group: str | None = _option(
        None,
        "after binding, switch to this group (name or gid); default with --user: the user's"
        " group; needs root",
        metavar="GROUP",
    )
    umask: str | None = _option(
        # None: keep the umask the server was started with.
        None,
        "file mode creation mask, in octal (e.g. 027), set before anything is created",
        metavar="MASK",
    )
    # ---- timeouts ----------------------------------------------------------------
    header_timeout: float = _option(
        # Slowloris defence: a real client sends its headers in one round trip.
        10.0,
        "seconds a client gets to send a complete request head once it started (408 beyond)",
        metavar="SECONDS",
    )
    body_timeout: float = _option(
        # nginx's client_body_timeout: the limit is on a pause, not on the upload.
        60.0,
        "seconds the app may wait for the next piece of a request body (408 or reset beyond)",
        metavar="SECONDS",
    )
    write_timeout: float = _option(
        # nginx's send_timeout: a client that stops reading is given up on.
        60.0,
        "seconds a client may take to accept the next piece of a response before it is dropped",
        metavar="SECONDS",
    )
    h2_idle_timeout: float = _option(
        # HTTP/2 connections are worth keeping longer than HTTP/1.1 ones: one per client.
        30.0,
        "seconds an HTTP/2 connection with no open stream stays open",
        metavar="SECONDS",
    )
    # ---- limits --------------------------------------------------------------------
    max_connections: int = _option(
        # Well below a typical 65536 descriptor limit; beyond it the kernel's
        # backlog queues new connections rather than trioserve accepting and
        # dropping them. 0 means no limit.
        4096,
        "connections served at once per worker process; more wait in the backlog; 0 no limit",
    )
    max_requests_in_flight: int = _option(
        # Off by default: queueing for a thread is usually better than refusing.
        0,
        "requests in progress per worker beyond which new ones get 503 at once; 0 no limit",
    )
    http1_parser: str = _option(
        # httptools (llhttp) reads a head in about a twentieth of h11's time;
        # h11 is the reference, and what runs where httptools is not installed.
        "auto",
        "what reads HTTP/1.1 request heads: httptools, h11, or auto (httptools when"
        " installed, else h11); the rest of HTTP/1.1 is trioserve's own either way",
        metavar="PARSER",
    )
    # ---- slow clients ----------------------------------------------------------------
    spill_after: float = _option(
        # A client taking a quarter of a second to accept the next piece is far
        # slower than the app: at that point the app thread is worth more than
        # the disk its response takes. Short enough that clients that stall or
        # trickle-read cannot hold the threads for long (Security and limits).
        0.25,
        "an app thread that has waited this long for a slow client writes the rest of its"
        " response to a temporary file and moves on; 0 never spills",
        metavar="SECONDS",
    )
    max_spill_per_response: int = _option(
        # waitress' outbuf_high_watermark: larger responses to slow clients
        # hold their thread again beyond it (back-pressure, never unbounded).
        16 * MiB,
        "bytes of one response kept on disk at once; beyond, its thread waits for the client",
        metavar="BYTES",
    )
    max_spill_total: int = _option(
        # Disk, not memory: 200 slow clients' worth of 10 MiB responses, or 128
        # full 16 MiB ones. 0 disables spilling.
        2 * GiB,
        "bytes all spilled responses may take on disk together; beyond, threads wait for clients",
        metavar="BYTES",
    )
    spill_dir: str | None = _option(
        None,
        "directory for spilled responses (their files are unlinked at once); default: $TMPDIR,"
        " else /var/tmp (disk, where /tmp may be memory), else the system's temporary directory",
        metavar="DIR",
    )
    # ---- proxies ---------------------------------------------------------------------
    forwarded_allow_ips: tuple[str, ...] = _option(
        # Only a proxy on this machine may speak for the client by default.
        ("127.0.0.1", "::1", "unix"),
        "peers (IP addresses or CIDRs; 'unix' for unix sockets; '*' for all) whose Forwarded,"
        " X-Forwarded-* and PROXY protocol headers are trusted; repeatable",
        metavar="CIDR",
    )
    proxy_protocol: bool = _option(
        False,
        "expect a PROXY protocol v1/v2 header (HAProxy, AWS NLB) on connections from trusted peers",
    )
    unix_socket_mode: str | None = _option(
        None,
        "permissions of unix:PATH sockets, in octal (e.g. 660); default: the process umask",
        metavar="MODE",
    )

    def __post_init__(self) -> None:
        bind: Any = self.bind  # a single string is accepted for convenience
        object.__setattr__(self, "bind", (bind,) if isinstance(bind, str) else tuple(bind))
        _check(bool(self.bind), "at least one bind address is needed")
        from .listeners import parse_bind  # here: listeners imports this module

        for address in self.bind:
            parse_bind(address)  # raises BindError (a ConfigError) for bad syntax
        _check(self.threads >= 1, f"threads must be at least 1, not {self.threads}")
        _check(
            self.log_level.lower() in ("debug", "info", "warning", "error", "critical"),
            f"unknown log level {self.log_level!r}",
        )
        for name in (
            "keep_alive_timeout",
            "graceful_timeout",
            "tls_handshake_timeout",
        ):
            value = getattr(self, name)
            _check(value > 0, f"{name.replace('_', '-')} must be positive, not {value}")
        _check(self.max_request_body_size >= 0, "max-request-body-size cannot be negative")
        _check(self.body_prebuffer >= 0, "body-prebuffer cannot be negative")
        _check(self.max_header_size >= 1024, "max-header-size must be at least 1024")
        _check(self.max_request_line_size >= 64, "max-request-line-size must be at least 64")
        _check(self.max_header_count >= 1, "max-header-count must be at least 1")
        _check(self.backlog >= 1, "backlog must be at least 1")
        _check(
            self.max_threads_per_connection >= 0, "max-threads-per-connection cannot be negative"
        )
        _check(self.workers >= 1, f"workers must be at least 1, not {self.workers}")
        _check(self.max_requests >= 0, "max-requests cannot be negative")
        _check(self.max_requests_jitter >= 0, "max-requests-jitter cannot be negative")
        _check(self.gc_threshold >= 0, "gc-threshold cannot be negative")
        for name in ("header_timeout", "body_timeout", "write_timeout", "h2_idle_timeout"):
            value = getattr(self, name)
            _check(value > 0, f"{name.replace('_', '-')} must be positive, not {value}")
        _check(self.max_connections >= 0, "max-connections cannot be negative")
        _check(self.max_requests_in_flight >= 0, "max-requests-in-flight cannot be negative")
        _check(
            self.app_thread_scheduling in ("auto", "batch", "normal"),
            "app-thread-scheduling must be auto, batch or normal,"
            f" not {self.app_thread_scheduling!r}",
        )
        _check(
            self.http1_parser in ("auto", "h11", "httptools"),
            f"http1-parser must be auto, h11 or httptools, not {self.http1_parser!r}",
        )
        if self.http1_parser == "httptools":
            from .http1_heads import httptools_available  # here: no import cycle at startup

            _check(
                httptools_available(),
                "--http1-parser httptools: httptools is not installed (pip install httptools)",
            )
        _check(self.spill_after >= 0, f"spill-after cannot be negative, not {self.spill_after}")
        _check(self.max_spill_per_response >= 1, "max-spill-per-response must be at least 1")
        _check(self.max_spill_total >= 0, "max-spill-total cannot be negative")

        for name in ("forwarded_allow_ips", "reload_dir"):
            items: Any = getattr(self, name)  # a single string is accepted here too
            object.__setattr__(self, name, (items,) if isinstance(items, str) else tuple(items))
        from .proxy import parse_allow_list  # here: proxy imports this module

        parse_allow_list(self.forwarded_allow_ips)  # raises ConfigError for a bad entry
        for name, example in (("unix_socket_mode", "660"), ("umask", "027")):
            text = getattr(self, name)
            _check(
                text is None or 0 <= _octal(text) <= 0o777,
                f"{name.replace('_', '-')} must be octal, e.g. {example}: {text!r}",
            )
        _check(
            1 <= self.h2_max_concurrent_streams <= 2**31 - 1,
            "h2-max-concurrent-streams must be between 1 and 2**31-1",
        )
        _check(
            1 <= self.h2_initial_window_size <= 2**31 - 1,
            "h2-initial-window-size must be between 1 and 2**31-1",
        )
        _check(
            2**14 <= self.h2_max_frame_size <= 2**24 - 1,
            "h2-max-frame-size must be between 16384 and 16777215",
        )
        _check(
            self.h2_max_header_list_size >= 1024, "h2-max-header-list-size must be at least 1024"
        )
        _check(
            (self.certfile is None) == (self.keyfile is None),
            "--certfile and --keyfile go together",
        )
        from .tls import check_tls_options  # here: tls imports this module

        check_tls_options(self)
        _check(
            self.log_format in ("text", "json"),
            f"log-format must be text or json, not {self.log_format!r}",
        )
        from .accesslog import check_format  # here: accesslog imports this module

        check_format(self.access_log_format)
        for name in ("error_log", "access_log", "log_format"):
            default = Config.__dataclass_fields__[name].default
            _check(
                self.log_config is None or getattr(self, name) == default,
                f"--log-config configures the logs: give no --{name.replace('_', '-')}"
                " (configure it in the file)",
            )
        _check(
            self.reload or self.reload_dir == (".",),
            "--reload-dir needs --reload",
        )
        if self.metrics_bind is not None:
            _check_metrics_bind(self.metrics_bind, self.bind)

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _check_metrics_bind(address: str, binds: tuple[str, ...]) -> None:
    """A metrics address is well formed, not one of the app's, and prometheus_client is there."""
    from .listeners import BindError, parse_bind

    try:
        metrics = parse_bind(address)
    except BindError as exc:
        raise ConfigError(f"--metrics-bind: {exc}") from None
    _check(metrics.kind != "fd", f"--metrics-bind {address}: give HOST:PORT or unix:PATH")
    for bind in binds:
        app = parse_bind(bind)
        if metrics.kind == app.kind == "unix":
            same = metrics.path == app.path
        elif metrics.kind == app.kind == "tcp":
            wildcard = {None, "0.0.0.0", "::"}
            same = (
                metrics.port == app.port != 0  # port 0: two different free ports
                and (metrics.host == app.host or {metrics.host, app.host} & wildcard != set())
            )
        else:
            same = False
        _check(
            not same,
            f"--metrics-bind {address} is also where the app listens (--bind {bind}):"
            " metrics need an address of their own",
        )
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--metrics-bind needs the prometheus_client package: pip install 'trioserve[metrics]'"
        ) from None


def _octal(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        return -1


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def options() -> list[dataclasses.Field[Any]]:
    """The configurable fields, in declaration order (used to build the CLI)."""
    return list(dataclasses.fields(Config))
