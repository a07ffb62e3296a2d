#!/usr/bin/env python3
"""Side-by-side benchmark of trioserve against its peers (issue 6). See bench/README.md.

    python bench/run.py                      # every scenario, 3 repeats, 10 s each
    python bench/run.py --quick              # 3 s runs, 1 repeat: a smoke test of the harness
    python bench/run.py --only 1,2 --repeat 5 --duration 20
    python bench/run.py --list               # the scenarios and their servers

The first run creates bench/.venv with the peers and trioserve (editable, from
this checkout) and re-runs itself inside it; later runs reuse it. Each server runs
as one process tree pinned to CPU 0 (``taskset -c 0``), the load generator to CPU 1.
Results: a table per scenario on stdout, and bench/results/<date>-<host>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV = BENCH / ".venv"
VENV_BIN = VENV / "bin"
VENV_PY = VENV_BIN / "python"
CERTS = BENCH / ".certs"
WORK = BENCH / ".work"  # scratch: server logs, the sparse upload file, the POST body
RESULTS = BENCH / "results"

# The peers, pinned so that results from different days compare.
PEERS = [
    "gunicorn[http2]==27.0.1",
    "waitress==3.0.2",
    "hypercorn[trio]==0.18.0",
    "granian==2.8.7",
    "trustme>=1.1",
]
VERSIONED = [
    "trioserve",
    "trio",
    "h11",
    "httptools",
    "h2",
    "gunicorn",
    "waitress",
    "hypercorn",
    "granian",
]

SERVER_CPUS = "0"
CLIENT_CPUS = "1"

# Server settings: each server's defaults, except where a scenario needs more
# (long keep-alive and high connection limits for the idle scenario, no body
# limit for the upload) and:
# - gunicorn gthread: 16 threads. gthread serves each HTTP/2 connection on one
#   thread for the connection's lifetime, so it needs at least as many threads as
#   the 10 connections of the h2load -c10 shape; 16 leaves headroom.
# - trioserve: its default 40 threads; waitress: its default 4 threads;
#   granian: its defaults (1 worker, 1 runtime thread, default blocking threads).
GUNICORN_THREADS = 16
IDLE_KEEP_ALIVE = 300  # seconds; longer than the idle scenario takes
IDLE_WARM = 100  # connections opened before the RSS baseline of the idle scenario
IDLE_COUNT = 1000  # connections measured
DEFAULT_STREAM_MIB = 200
DEFAULT_UPLOAD_MIB = 1024
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0

ALL_SERVERS = [
    "trioserve",
    "waitress",
    "gunicorn",
    "hypercorn-trio",
    "hypercorn-asyncio",
    "granian",
    "canned",
    "canned-shaped",
]
# --baseline REF: trioserve at commit REF, run beside the checkout as one more peer.
BASELINE = "baseline"
H2_SERVERS = ["trioserve", "gunicorn", "hypercorn-trio", "hypercorn-asyncio", "granian"]
TRANSFER_SERVERS = [
    "trioserve",
    "waitress",
    "gunicorn",
    "hypercorn-trio",
    "hypercorn-asyncio",
    "granian",
]


# --------------------------------------------------------------------------- bootstrap


def in_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def ensure_venv(reinstall: bool) -> None:
    """Create bench/.venv with the peers and trioserve (editable) once; reuse it later."""
    stamp = VENV / ".bench-installed"
    # pyproject.toml is in the stamp: a dependency trioserve gains (httptools did)
    # must reach the venv, or the bench measures a fallback without saying so.
    pyproject = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    wanted = json.dumps({"peers": PEERS, "trioserve": str(ROOT), "pyproject": pyproject})
    if not VENV_PY.exists():
        print(f"bench: creating {VENV.relative_to(ROOT)}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    if reinstall or not stamp.exists() or stamp.read_text() != wanted:
        print("bench: installing the peers and trioserve into bench/.venv", flush=True)
        pip = [str(VENV_PY), "-m", "pip", "--disable-pip-version-check", "install", "-q"]
        subprocess.run([*pip, *PEERS, "-e", str(ROOT)], check=True)
        stamp.write_text(wanted)


def ensure_certs() -> dict[str, Path]:
    """A trustme CA and a cert for 127.0.0.1/localhost in bench/.certs (key in PKCS#8)."""
    paths = {"ca": CERTS / "ca.pem", "cert": CERTS / "cert.pem", "key": CERTS / "key.pem"}
    if all(path.exists() for path in paths.values()):
        return paths
    import trustme
    from cryptography.hazmat.primitives import serialization

    CERTS.mkdir(exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost", "::1")
    ca.cert_pem.write_to_path(str(paths["ca"]))
    paths["cert"].write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    paths["key"].write_bytes(
        key.private_bytes(  # granian reads PKCS#8 keys only
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


# --------------------------------------------------------------------------- errors


class BenchError(Exception):
    """A measurement or a server failed; the message goes into the table."""


class NotApplicable(Exception):
    """The server cannot do this scenario (e.g. waitress and HTTP/2)."""


# --------------------------------------------------------------------------- servers


@dataclass
class Ctx:
    args: argparse.Namespace
    certs: dict[str, Path]
    stream_bytes: int
    upload_bytes: int
    upload_file: Path | None = None
    post_file: Path | None = None
    baseline: Path | None = None  # --baseline: a checkout of trioserve at another commit
    _trioserve_help: str | None = None

    def trioserve_help(self) -> str:
        if self._trioserve_help is None:
            try:
                out = subprocess.run(
                    [str(VENV_BIN / "trioserve"), "--help"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                self._trioserve_help = out.stdout
            except (OSError, subprocess.TimeoutExpired):
                self._trioserve_help = ""
        return self._trioserve_help


def venv_bin(name: str) -> str:
    path = VENV_BIN / name
    if not path.exists():
        raise BenchError(f"{name} is not installed in bench/.venv")
    return str(path)


def server_command(
    ctx: Ctx, server: str, app: str, port: int, mode: str, purpose: str, workers: int
) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment for one server; raises NotApplicable or BenchError.

    mode: h1 (cleartext HTTP/1.1), h2c (cleartext, HTTP/2 prior knowledge), tls (ALPN h2).
    purpose: hello, echo, stream, upload, idle.
    """
    address = f"127.0.0.1:{port}"
    cert, key = str(ctx.certs["cert"]), str(ctx.certs["key"])
    env: dict[str, str] = {}
    if server in ("trioserve", BASELINE):
        argv = [venv_bin("trioserve"), f"bench.apps:{app}", "-b", address, "--log-level", "warning"]
        if server == BASELINE:
            # The same command, run from the baseline checkout (bench.apps included).
            assert ctx.baseline is not None
            argv[0:1] = [str(VENV_PY), "-m", "trioserve"]
            env["PYTHONPATH"] = str(ctx.baseline)
        if workers != 1:
            if "--workers" not in ctx.trioserve_help():
                raise NotApplicable("n/a (not implemented yet)")
            argv += ["--workers", str(workers)]
        if mode == "tls":
            argv += ["--certfile", cert, "--keyfile", key]
        if purpose == "idle":
            argv += ["--keep-alive-timeout", str(IDLE_KEEP_ALIVE)]
        if purpose == "upload":
            argv += ["--max-request-body-size", "0"]
        return argv, env
    if server == "waitress":
        if mode != "h1":
            raise NotApplicable("n/a (no HTTP/2)")
        if workers != 1:
            raise NotApplicable("n/a (single process, no workers)")
        argv = [venv_bin("waitress-serve"), f"--listen={address}"]
        if purpose == "idle":
            # poll(): with select() waitress cannot use file descriptors past 1023.
            argv += ["--connection-limit=2000", f"--channel-timeout={IDLE_KEEP_ALIVE}"]
            argv += ["--asyncore-use-poll"]
        if purpose == "upload":
            argv += [f"--max-request-body-size={2**40}"]
        return [*argv, f"bench.apps:{app}"], env
    if server == "gunicorn":
        argv = [
            venv_bin("gunicorn"),
            "-k",
            "gthread",
            "-w",
            str(workers),
            "--threads",
            str(GUNICORN_THREADS),
            "-b",
            address,
            "--log-level",
            "warning",
            "--no-control-socket",
        ]
        if mode == "h2c":
            # "both": prior knowledge and Upgrade; unlike "prior-knowledge" alone it
            # still answers HTTP/1.1 (the readiness probe is HTTP/1.1).
            argv += ["--http-protocols", "h2,h1", "--http2-cleartext", "both"]
        if mode == "tls":
            argv += ["--http-protocols", "h2,h1", "--certfile", cert, "--keyfile", key]
        if purpose == "idle":
            argv += ["--keep-alive", str(IDLE_KEEP_ALIVE), "--worker-connections", "2000"]
        return [*argv, f"bench.apps:{app}"], env
    if server in ("hypercorn-trio", "hypercorn-asyncio"):
        worker = server.split("-")[1]
        # -w 0: serve in this one process (-w 1 would add a supervisor process).
        argv = [
            venv_bin("hypercorn"),
            "-k",
            worker,
            "-w",
            "0" if workers == 1 else str(workers),
            "-b",
            address,
            "--log-level",
            "warning",
            "-c",
            str(BENCH / "hypercorn.toml"),  # see the comments there
        ]
        env["BENCH_WSGI_MAX_BODY_SIZE"] = str(2**32)
        if mode == "tls":
            argv += ["--certfile", cert, "--keyfile", key]
        if purpose == "idle":
            argv += ["--keep-alive", str(IDLE_KEEP_ALIVE)]
        module = "bench.hypercorn_shim" if worker == "trio" else "bench.apps"
        return [*argv, f"{module}:{app}"], env
    if server == "granian":
        argv = [
            venv_bin("granian"),
            "--interface",
            "wsgi",
            "--workers",
            str(workers),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--http",
            "auto",  # HTTP/1.1 and h2c prior knowledge on one port; ALPN over TLS
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        if mode == "tls":
            argv += ["--ssl-certificate", cert, "--ssl-keyfile", key]
        if purpose == "idle":
            # granian serves at most --backpressure connections at once (default:
            # backlog / workers = 1024); connection 1025 waits for a slot.
            argv += ["--backpressure", "2048", "--http1-header-read-timeout", "60000"]
        return [*argv, f"bench.apps:{app}"], env
    if server in ("canned", "canned-shaped"):
        if mode != "h1" or app != "hello":
            raise NotApplicable("n/a (answers bodiless HTTP/1.1 requests only)")
        if workers != 1:
            raise NotApplicable("n/a")
        argv = [str(VENV_PY), str(BENCH / "canned.py"), "-b", address]
        return [*argv, "--shaped"] if server == "canned-shaped" else argv, env
    raise BenchError(f"unknown server {server}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_nofile() -> None:
    """preexec_fn: let the server hold the idle scenario's connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else max(soft, min(hard, 65536))
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(child) for child in f.read().split()]
    return found


def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo += children(current)
    return pids


def start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def status_kib(pid: int, field_name: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class ServerProcess:
    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log: Path, cpus: str, cwd: Path
    ):
        self.name = name
        self.cwd = cwd
        self.argv = ["taskset", "-c", cpus, *argv]
        self.env = {**os.environ, **env}
        # A baseline checkout's path (--baseline) goes first, so its trioserve wins.
        self.env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [env.get("PYTHONPATH"), str(ROOT), os.environ.get("PYTHONPATH")])
        )
        self.env.pop("VIRTUAL_ENV", None)
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.known: dict[int, str | None] = {}  # every pid of the tree seen, with start time

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C on the harness does not reach it directly
                preexec_fn=raise_nofile,
            )

    def pids(self) -> list[int]:
        pids = tree(self.pid)
        for pid in pids:
            if pid not in self.known:
                self.known[pid] = start_time(pid)
        return pids

    def rss_kib(self) -> int:
        return sum(status_kib(pid, "VmRSS") for pid in self.pids())

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        lines = [line.strip() for line in lines if line.strip() and not line.startswith("===")]
        return lines[-1][:200] if lines else ""

    def wait_ready(self, port: int, tls: bool) -> None:
        """Poll a TCP connect, then one HTTP/1.1 request, until the server answers."""
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        last_error = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"exited with status {self.proc.returncode} at start-up: {self.log_tail()}"
                )
            try:
                probe(port, tls)
            except (OSError, BenchError) as exc:
                last_error = str(exc) or type(exc).__name__
                time.sleep(0.02)
                continue
            self.pids()
            return
        raise BenchError(f"not ready after {READY_TIMEOUT:.0f}s ({last_error}): {self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM the server, SIGKILL after STOP_TIMEOUT; then any straggler of its tree."""
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            self.pids()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # Children that outlived their parent: only those we saw, and only if the pid
        # still names the same process (same start time).
        deadline = time.monotonic() + STOP_TIMEOUT
        for pid, started in self.known.items():
            if pid == self.proc.pid or started is None:
                continue
            while start_time(pid) == started and time.monotonic() < deadline:
                time.sleep(0.05)
            if start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def probe(port: int, tls: bool) -> None:
    """One HTTP/1.1 GET (small stream size, so it suits every app)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        sock: socket.socket = raw
        if tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.set_alpn_protocols(["http/1.1"])
            sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        sock.sendall(b"GET /?size=1024 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        status = data.split(b"\r\n", 1)[0]
        if not status.startswith(b"HTTP/1.1 200"):
            raise BenchError(f"probe answered {status[:60]!r}")


@contextlib.contextmanager
def running(
    ctx: Ctx,
    server: str,
    variant: Variant,
    label: str,
    workers: int = 1,
    cpus: str = SERVER_CPUS,
) -> Iterator[ServerProcess]:
    port = free_port()
    argv, env = server_command(
        ctx, server, variant.app, port, variant.mode, variant.purpose, workers
    )
    if variant.app == "stream":
        env["BENCH_STREAM_BYTES"] = str(ctx.stream_bytes)
    log = WORK / "logs" / f"{server}.log"
    # The baseline runs in its own checkout: ``-m`` puts the working directory
    # first on sys.path (ahead of PYTHONPATH), in -w workers too.
    cwd = ctx.baseline if server == BASELINE and ctx.baseline is not None else ROOT
    proc = ServerProcess(server, argv, env, log, cpus, cwd)
    proc.start()
    try:
        proc.wait_ready(port, variant.mode == "tls")
        proc.port = port  # type: ignore[attr-defined]
        proc.label = label  # type: ignore[attr-defined]
        yield proc
    finally:
        proc.stop()


# --------------------------------------------------------------------------- load generators


def client(argv: list[str], timeout: float, cpus: str = CLIENT_CPUS) -> str:
    """Run a load generator pinned to the client CPU; its stdout (BenchError on failure)."""
    try:
        out = subprocess.run(
            ["taskset", "-c", cpus, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{argv[0]} timed out after {timeout:.0f}s") from exc
    except FileNotFoundError as exc:
        raise BenchError(f"{argv[0]} is not installed") from exc
    if out.returncode != 0:
        message = (out.stderr.strip() or out.stdout.strip()).splitlines()
        raise BenchError(f"{argv[0]} exited {out.returncode}: {message[-1] if message else ''}")
    return out.stdout


UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def wrk(
    url: str, duration: float, *, script: Path | None = None, cpus: str = CLIENT_CPUS
) -> dict[str, Any]:
    argv = ["wrk", "-t1", "-c50", f"-d{max(1, round(duration))}s", "--latency"]
    if script is not None:
        argv += ["-s", str(script)]
    out = client([*argv, url], timeout=duration + 60, cpus=cpus)
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if match is None or total is None:
        raise BenchError(f"could not parse wrk output: {out.strip()[-200:]}")
    result: dict[str, Any] = {"req_s": float(match.group(1)), "requests": int(total.group(1))}
    for pct in ("50", "75", "90", "99"):
        lat = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        if lat:
            result[f"p{pct}_ms"] = float(lat.group(1)) * UNITS_MS[lat.group(2)]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["socket_errors"] = sum(map(int, errors.groups())) if errors else 0
    if result["requests"] == 0:
        raise BenchError("no request completed")
    if result["non_2xx"] > result["requests"] // 2:
        raise BenchError(f"{result['non_2xx']} of {result['requests']} responses not 2xx")
    return result


def h2load(
    url: str, clients: int, streams: int, duration: float, warmup: float, *, data: Path | None
) -> dict[str, Any]:
    argv = ["h2load", f"-c{clients}", f"-m{streams}", "-t1", "-D", f"{duration:g}"]
    argv += ["--warm-up-time", f"{warmup:g}"]
    if data is not None:
        argv += ["-d", str(data)]
    out = client([*argv, url], timeout=duration + warmup + 60)
    rate = re.search(r"finished in [^,]+, ([\d.]+) req/s", out)
    counts = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        out,
    )
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if rate is None or counts is None:
        raise BenchError(f"could not parse h2load output: {out.strip()[-200:]}")
    done, succeeded, failed, errored = (int(counts.group(i)) for i in (3, 4, 5, 6))
    ok_2xx = int(codes.group(1)) if codes else succeeded
    protocol = re.search(r"Application protocol: (\S+)", out)
    if protocol and protocol.group(1) != "h2" and protocol.group(1) != "h2c":
        raise BenchError(f"negotiated {protocol.group(1)}, not HTTP/2")
    if ok_2xx == 0:
        reason = "no request succeeded"
        if "No protocol negotiated" in out:
            reason = "no HTTP/2 over ALPN"
        raise BenchError(f"{reason} ({failed} failed, {errored} errored)")
    if ok_2xx < done // 2:
        raise BenchError(f"only {ok_2xx} of {done} responses were 2xx")
    return {
        "req_s": float(rate.group(1)),
        "requests": done,
        "succeeded_2xx": ok_2xx,
        "failed": failed,
        "errored": errored,
    }


def curl_flags(ctx: Ctx, mode: str) -> list[str]:
    if mode == "h1":
        return ["--http1.1"]
    if mode == "h2c":
        return ["--http2-prior-knowledge"]
    return ["--http2", "--cacert", str(ctx.certs["ca"])]


def expected_version(mode: str) -> str:
    return "1.1" if mode == "h1" else "2"


class RssSampler:
    """Sum of VmRSS over the server's process tree, every 50 ms, in a thread."""

    def __init__(self, proc: ServerProcess, interval: float = 0.05):
        self.proc = proc
        self.interval = interval
        self.baseline = proc.rss_kib()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.rss_kib())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.rss_kib())

    def growth_mib(self) -> float:
        return (self.peak - self.baseline) / 1024


def url(proc: ServerProcess, mode: str, path: str = "/") -> str:
    scheme = "https" if mode == "tls" else "http"
    return f"{scheme}://127.0.0.1:{proc.port}{path}"  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- measurements


def measure_wrk_hello(ctx: Ctx, proc: ServerProcess, variant: Variant) -> dict[str, Any]:
    target = url(proc, variant.mode)
    if ctx.args.warmup > 0:
        wrk(target, ctx.args.warmup)
    return wrk(target, ctx.args.duration)


def measure_wrk_echo(ctx: Ctx, proc: ServerProcess, variant: Variant) -> dict[str, Any]:
    target = url(proc, variant.mode)
    script = BENCH / "post-1k.lua"
    if ctx.args.warmup > 0:
        wrk(target, ctx.args.warmup, script=script)
    return wrk(target, ctx.args.duration, script=script)


def measure_h2load(clients: int, streams: int, post: bool = False) -> Measure:
    def measure(ctx: Ctx, proc: ServerProcess, variant: Variant) -> dict[str, Any]:
        return h2load(
            url(proc, variant.mode),
            clients,
            streams,
            ctx.args.duration,
            ctx.args.warmup,
            data=ctx.post_file if post else None,
        )

    return measure


# Scenario 5 times this many transfers per measurement (after one warm-up
# transfer when --warmup is on) and reports their median: one 200 MiB transfer
# lasts a tenth of a second on loopback, too short to stand alone.
DOWNLOADS_TIMED = 3


def measure_download(ctx: Ctx, proc: ServerProcess, variant: Variant) -> dict[str, Any]:
    size = ctx.stream_bytes
    argv = ["curl", "-s", "-S", "-o", "/dev/null", "--max-time", str(ctx.args.transfer_timeout)]
    argv += ["-w", "%{speed_download} %{size_download} %{http_code} %{http_version}"]
    argv += curl_flags(ctx, variant.mode)
    argv.append(url(proc, variant.mode, f"/?size={size}"))

    def transfer() -> float:
        out = client(argv, ctx.args.transfer_timeout + 30)
        speed, got, code, version = out.split()
        if code != "200" or int(got) != size or version != expected_version(variant.mode):
            raise BenchError(f"HTTP/{version} {code}, {got} of {size} bytes")
        return float(speed) / 2**20

    if ctx.args.warmup > 0:
        transfer()
    with RssSampler(proc) as rss:
        speeds = [transfer() for _ in range(DOWNLOADS_TIMED)]
    return {
        "mib_s": statistics.median(speeds),
        "mib_s_each": speeds,
        "rss_growth_mib": rss.growth_mib(),
        "rss_start_mib": rss.baseline / 1024,
    }


def measure_upload(ctx: Ctx, proc: ServerProcess, variant: Variant) -> dict[str, Any]:
    assert ctx.upload_file is not None
    size = ctx.upload_bytes
    argv = ["curl", "-s", "-S", "-o", "-", "--max-time", str(ctx.args.transfer_timeout)]
    argv += ["-X", "POST", "-T", str(ctx.upload_file), "-H", "Expect:"]
    argv += ["-H", "Content-Type: application/octet-stream"]
    argv += ["-w", "\n%{speed_upload} %{size_upload} %{http_code} %{http_version}"]
    argv += curl_flags(ctx, variant.mode)
    with RssSampler(proc) as rss:
        out = client([*argv, url(proc, variant.mode)], ctx.args.transfer_timeout + 30)
    body, _, tail = out.rpartition("\n")
    speed, _sent, code, version = tail.split()
    if code != "200" or body.strip() != str(size) or version != expected_version(variant.mode):
        raise BenchError(f"HTTP/{version} {code}, app read {body.strip()[:40]!r} of {size} bytes")
    return {
        "mib_s": float(speed) / 2**20,
        "rss_growth_mib": rss.growth_mib(),
        "rss_start_mib": rss.baseline / 1024,
    }


def settled_rss(proc: ServerProcess, limit: float = 3.0) -> int:
    """RSS once two samples 100 ms apart agree within 0.5% (or after `limit` seconds)."""
    deadline = time.monotonic() + limit
    last = proc.rss_kib()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = proc.rss_kib()
        if abs(now - last) <= max(64, last // 200):
            return now
        last = now
    return last


def measure_idle(ctx: Ctx, proc: ServerProcess, variant: Variant) -> dict[str, Any]:
    argv = ["taskset", "-c", CLIENT_CPUS, str(VENV_PY), str(BENCH / "idle_client.py")]
    argv += [str(proc.port), str(IDLE_WARM), str(IDLE_COUNT)]  # type: ignore[attr-defined]
    idle = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=raise_nofile
    )
    assert idle.stdin is not None
    assert idle.stdout is not None
    timer = threading.Timer(120, idle.kill)  # bounded, whatever happens
    timer.start()

    def step() -> dict[str, Any]:
        line = idle.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise BenchError("idle client died")
        return dict(json.loads(line))

    def go_on() -> None:
        idle.stdin.write("\n")  # type: ignore[union-attr]
        idle.stdin.flush()  # type: ignore[union-attr]

    try:
        warm = step()
        if warm["open"] < IDLE_WARM:
            raise BenchError(
                f"warm-up: {warm['open']} of {IDLE_WARM} opened: {warm['first_error']}"
            )
        before = settled_rss(proc)
        go_on()
        opened = step()
        after = settled_rss(proc)
        go_on()
        done = step()
        if opened["open"] < IDLE_COUNT:
            raise BenchError(
                f"{opened['open']} of {IDLE_COUNT} opened: {opened['first_error'][:1]}"
            )
        if done["still_open"] < done["total"]:
            raise BenchError(f"server closed {done['total'] - done['still_open']} idle connections")
        return {
            "kib_per_conn": (after - before) / IDLE_COUNT,
            "rss_before_mib": before / 1024,
            "rss_after_mib": after / 1024,
            "open": opened["open"] + warm["open"],
        }
    finally:
        timer.cancel()
        with contextlib.suppress(OSError):
            idle.stdin.close()
        try:
            idle.wait(10)
        except subprocess.TimeoutExpired:
            idle.kill()
            idle.wait()


def run_workers(ctx: Ctx, server: str, variant: Variant) -> dict[str, Any]:
    """Scenario 8: HTTP/1.1 hello with 1 then 2 workers, server on both CPUs."""
    for workers in (1, 2):  # raises NotApplicable before anything runs
        server_command(ctx, server, variant.app, 1, variant.mode, variant.purpose, workers)
    rates = {}
    for workers in (1, 2):
        with running(ctx, server, variant, f"w{workers}", workers=workers, cpus="0,1") as proc:
            target = url(proc, variant.mode)
            if ctx.args.warmup > 0:
                wrk(target, ctx.args.warmup, cpus="0,1")
            rates[workers] = wrk(target, ctx.args.duration, cpus="0,1")["req_s"]
    return {"w1_req_s": rates[1], "w2_req_s": rates[2], "scaling": rates[2] / rates[1]}


# --------------------------------------------------------------------------- scenarios

Measure = Callable[[Ctx, ServerProcess, "Variant"], dict[str, Any]]


@dataclass
class Variant:
    key: str
    label: str
    mode: str
    app: str
    purpose: str
    servers: list[str]
    measure: Measure | None
    metrics: list[tuple[str, str, str]]  # (key, column label, format)
    primary: str
    higher_is_better: bool = True
    run: Callable[[Ctx, str, Variant], dict[str, Any]] | None = None  # overrides the default


@dataclass
class Scenario:
    number: int
    key: str
    title: str
    variants: list[Variant] = field(default_factory=list)


REQ = ("req_s", "req/s", "{:,.0f}")
MIBS = ("mib_s", "MiB/s", "{:,.0f}")
RSS_GROWTH = ("rss_growth_mib", "peak RSS growth MiB", "{:,.1f}")


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    d = f"{args.duration:g}"
    lat = [REQ, ("p50_ms", "p50 ms", "{:.2f}"), ("p99_ms", "p99 ms", "{:.2f}")]
    result = [
        Scenario(
            1,
            "h1-hello",
            "HTTP/1.1 hello, keep-alive",
            [
                Variant(
                    "wrk",
                    f"wrk -t1 -c50 -d{d}s --latency",
                    "h1",
                    "hello",
                    "hello",
                    ALL_SERVERS,
                    measure_wrk_hello,
                    lat,
                    "req_s",
                )
            ],
        )
    ]
    for number, key, mode, title in (
        (2, "h2c-hello", "h2c", "h2c (prior knowledge) hello"),
        (3, "tls-hello", "tls", "HTTP/2 over TLS hello"),
    ):
        result.append(
            Scenario(
                number,
                key,
                title,
                [
                    Variant(
                        f"c{c}m{m}",
                        f"h2load -c{c} -m{m} -D {d} --warm-up-time {args.warmup:g}",
                        mode,
                        "hello",
                        "hello",
                        [*H2_SERVERS, "waitress"],
                        measure_h2load(c, m),
                        [REQ],
                        "req_s",
                    )
                    for c, m in ((10, 10), (1, 100))
                ],
            )
        )
    result.append(
        Scenario(
            4,
            "echo-1k",
            "1 KiB POST echo",
            [
                Variant(
                    "h1",
                    f"HTTP/1.1: wrk -t1 -c50 -d{d}s -s post-1k.lua",
                    "h1",
                    "echo",
                    "echo",
                    ALL_SERVERS[:-1],
                    measure_wrk_echo,
                    lat,
                    "req_s",
                ),
                Variant(
                    "h2c",
                    f"h2c: h2load -c10 -m10 -D {d} -d 1KiB",
                    "h2c",
                    "echo",
                    "echo",
                    [*H2_SERVERS, "waitress"],
                    measure_h2load(10, 10, post=True),
                    [REQ],
                    "req_s",
                ),
            ],
        )
    )
    mib = args.stream_mib
    result.append(
        Scenario(
            5,
            "stream",
            f"{mib} MiB streamed response (64 KiB chunks, no Content-Length), curl",
            [
                Variant(
                    mode,
                    label,
                    mode,
                    "stream",
                    "stream",
                    TRANSFER_SERVERS,
                    measure_download,
                    [MIBS, RSS_GROWTH],
                    "mib_s",
                )
                for mode, label in (
                    ("h1", "HTTP/1.1"),
                    ("h2c", "h2c (--http2-prior-knowledge)"),
                    ("tls", "HTTP/2 over TLS"),
                )
            ],
        )
    )
    result.append(
        Scenario(
            6,
            "upload",
            f"{args.upload_mib} MiB upload read through wsgi.input (curl -T, Content-Length)",
            [
                Variant(
                    mode,
                    label,
                    mode,
                    "sink",
                    "upload",
                    TRANSFER_SERVERS,
                    measure_upload,
                    [MIBS, RSS_GROWTH],
                    "mib_s",
                )
                for mode, label in (("h1", "HTTP/1.1"), ("h2c", "h2c (--http2-prior-knowledge)"))
            ],
        )
    )
    result.append(
        Scenario(
            7,
            "idle",
            f"{IDLE_COUNT:,} idle keep-alive connections (HTTP/1.1, after {IDLE_WARM} warm ones)",
            [
                Variant(
                    "h1",
                    "RSS growth per connection",
                    "h1",
                    "hello",
                    "idle",
                    ALL_SERVERS,
                    measure_idle,
                    [
                        ("kib_per_conn", "KiB per connection", "{:.1f}"),
                        ("rss_before_mib", "RSS before MiB", "{:.1f}"),
                        ("rss_after_mib", "RSS after MiB", "{:.1f}"),
                    ],
                    "kib_per_conn",
                    higher_is_better=False,
                )
            ],
        )
    )
    result.append(
        Scenario(
            8,
            "workers",
            "-w 2 over -w 1, HTTP/1.1 hello (server and wrk share both CPUs)",
            [
                Variant(
                    "h1",
                    f"wrk -t1 -c50 -d{d}s, 1 then 2 worker processes",
                    "h1",
                    "hello",
                    "hello",
                    ["trioserve", "gunicorn", "granian", "waitress"],
                    None,
                    [
                        ("w1_req_s", "1 worker req/s", "{:,.0f}"),
                        ("w2_req_s", "2 workers req/s", "{:,.0f}"),
                        ("scaling", "scaling (2 ÷ 1)", "{:.2f}x"),
                    ],
                    "scaling",
                    run=run_workers,
                )
            ],
        )
    )
    return result


# --------------------------------------------------------------------------- running


def _process_cpu() -> dict[int, tuple[int, int]]:
    """Every process now: pid -> (parent pid, CPU time used so far, in clock ticks)."""
    found: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        # After the command name: state, ppid (field 4), ... utime, stime (fields 14, 15).
        found[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return found


def _others_cpu(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> int:
    """CPU ticks that processes other than this harness's own used between two
    :func:`_process_cpu` readings.

    The harness's own are this process and its descendants (the servers and the
    load generators); kernel threads (children of kthreadd, pid 2) are left out
    too, since they carry the benchmark's own loopback traffic. A process that
    ended between the readings is not seen. Unlike the load average, which counts
    every runnable thread (a server with 40 app threads alone lifts it to
    about 10), this is what else competed for the two cores.
    """
    parents = {pid: ppid for pid, (ppid, _) in before.items()}
    parents.update((pid, ppid) for pid, (ppid, _) in after.items())
    me = os.getpid()

    def ours(pid: int) -> bool:
        for _ in range(64):  # (a bound: pids are reused, so a cycle is possible)
            if pid in (me, 2):
                return True
            parent = parents.get(pid)
            if parent is None or parent == 0:
                return False
            pid = parent
        return False

    return sum(
        ticks - before.get(pid, (0, 0))[1]
        for pid, (_, ticks) in after.items()
        if not ours(pid) and ticks > before.get(pid, (0, 0))[1]
    )


def _every_run(data: dict[str, Any], key: str) -> list[float]:
    """``key`` of every run that has it, of every scenario, variant and server, sorted."""
    return sorted(
        run[key]
        for scenario in data.values()
        for variant in scenario.values()
        for runs in variant["runs"].values()
        for run in runs
        if key in run
    )


def run_one(ctx: Ctx, scenario: Scenario, variant: Variant, server: str) -> dict[str, Any]:
    load = os.getloadavg()[0]
    cpu_before = _process_cpu()
    started = time.monotonic()
    try:
        if variant.run is not None:
            metrics = variant.run(ctx, server, variant)
        else:
            assert variant.measure is not None
            with running(ctx, server, variant, variant.key) as proc:
                metrics = variant.measure(ctx, proc, variant)
    except NotApplicable as exc:
        return {"na": str(exc)}
    except BenchError as exc:
        return {"error": str(exc)}
    except Exception as exc:  # a harness bug must not lose the other results
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}
    elapsed = time.monotonic() - started
    metrics["load1"] = load
    # What else ran meanwhile, in percent of one core.
    others = _others_cpu(cpu_before, _process_cpu())
    metrics["others_cpu_pct"] = round(100 * others / os.sysconf("SC_CLK_TCK") / elapsed, 1)
    metrics["seconds"] = round(elapsed, 2)
    return metrics


def summarize(variant: Variant, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians per server and trioserve's ratio to each peer (median of per-repeat ratios)."""
    summary: dict[str, Any] = {}
    base = runs.get("trioserve", [])
    for server, server_runs in runs.items():
        ok = [r for r in server_runs if "error" not in r and "na" not in r]
        entry: dict[str, Any] = {"ok_runs": len(ok), "runs": len(server_runs)}
        na = [r["na"] for r in server_runs if "na" in r]
        errors = [r["error"] for r in server_runs if "error" in r]
        if na:
            entry["status"] = na[0]
        elif not ok:
            entry["status"] = f"failed: {errors[0] if errors else 'not run'}"
        else:
            entry["status"] = "ok"
            entry["median"] = {
                key: statistics.median(r[key] for r in ok if key in r)
                for key, _, _ in variant.metrics
                if any(key in r for r in ok)
            }
            if errors:
                entry["errors"] = errors
        if server != "trioserve" and entry["status"] == "ok":
            ratios = [
                b[variant.primary] / p[variant.primary]
                for b, p in zip(base, server_runs, strict=False)
                if variant.primary in b and variant.primary in p and p[variant.primary]
            ]
            if ratios:
                entry["ratio_runs"] = ratios
                entry["ratio"] = statistics.median(ratios)
        summary[server] = entry
    return summary


def rotated(servers: list[str], repeat: int) -> list[str]:
    """``servers`` in the order repeat number ``repeat`` measures them: each repeat starts
    one server later, so no server is always first after another scenario (on this VM the
    first transfers after a change of work have come out slow: a 1 GiB upload measured
    first got 375-500 MiB/s in every repeat, the one after it 950-1,280)."""
    shift = repeat % len(servers) if servers else 0
    return servers[shift:] + servers[:shift]


def cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def render(scenario_list: list[Scenario], data: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for scenario in scenario_list:
        lines.append(f"### {scenario.number}. {scenario.title}")
        lines.append("")
        for variant in scenario.variants:
            summary = data[scenario.key][variant.key]["summary"]
            better = "higher" if variant.higher_is_better else "lower"
            primary_label = next(lbl for key, lbl, _ in variant.metrics if key == variant.primary)
            ratio_head = f"trioserve ÷ server ({primary_label}; {better} is better for trioserve)"
            lines.append(f"{variant.label}:")
            lines.append("")
            head = ["server", *(label for _, label, _ in variant.metrics), ratio_head]
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
            for server in variant.servers:
                entry = summary.get(server)
                if entry is None:
                    continue
                if entry["status"] != "ok":
                    cells = [cell(entry["status"])] + [""] * len(variant.metrics)
                else:
                    cells = []
                    for key, _, fmt in variant.metrics:
                        value = entry["median"].get(key)
                        cells.append("" if value is None else fmt.format(value))
                    if entry["ok_runs"] < entry["runs"]:
                        cells[0] += (
                            f" ({entry['runs'] - entry['ok_runs']} of {entry['runs']} failed)"
                        )
                    if server == "trioserve":
                        cells.append("")
                    elif "ratio" in entry:
                        cells.append(f"{entry['ratio']:.2f}x")
                    else:
                        cells.append("—")
                lines.append("| " + " | ".join([server, *cells]) + " |")
            lines.append("")
    return lines


def command_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "?"


def trioserve_commit() -> str:
    """HEAD of the checkout trioserve is installed from (editable); is trioserve/ modified?"""
    commit = command_version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "trioserve"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return commit + (" (trioserve/ modified)" if dirty else "")


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    from importlib import metadata

    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    packages = {}
    for name in VERSIONED:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = "not installed"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": packages,
        "tools": {
            "wrk": command_version(["wrk", "--version"]),
            "h2load": command_version(["h2load", "--version"]),
            "curl": command_version(["curl", "--version"]),
        },
        "trioserve_commit": trioserve_commit(),
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "repeat": args.repeat,
            "stream_mib": args.stream_mib,
            "upload_mib": args.upload_mib,
            "server_cpus": SERVER_CPUS,
            "client_cpus": CLIENT_CPUS,
            "gunicorn_threads": GUNICORN_THREADS,
        },
        "note": args.note,
    }


def write_results(
    args: argparse.Namespace, info: dict[str, Any], data: dict[str, Any], table: list[str]
) -> Path:
    RESULTS.mkdir(exist_ok=True)
    stem = f"{info['date'][:10]}-{info['host']}" + ("-quick" if args.quick else "")
    n, name = 1, stem
    while (RESULTS / f"{name}.json").exists() or (RESULTS / f"{name}.md").exists():
        n += 1
        name = f"{stem}-{n}"
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": info, "results": data}, indent=1))
    settings = info["settings"]
    head = [
        f"# trioserve benchmark, {info['date']} on {info['host']}",
        "",
        f"- machine: {info['cpu']}, {info['cpus']} CPUs, Linux {info['kernel']}, "
        f"Python {info['python']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in info["packages"].items()),
        f"- tools: {info['tools']['wrk']}; {info['tools']['h2load']}; "
        f"{info['tools']['curl'].split(' (')[0]}",
        f"- trioserve commit {info['trioserve_commit']}",
    ]
    if info.get("trioserve_commit_end", info["trioserve_commit"]) != info["trioserve_commit"]:
        head.append(
            f"- **warning**: the checkout changed during the run (now "
            f"{info['trioserve_commit_end']}); trioserve is installed editable, so later "
            "repeats may have run different code"
        )
    head += [
        f"- {settings['repeat']} repeat(s), {settings['duration_s']:g} s runs after "
        f"{settings['warmup_s']:g} s warm-up; server on CPU {SERVER_CPUS}, load generator on "
        f"CPU {CLIENT_CPUS}; values are medians, ratios are medians of per-repeat ratios",
        f"- load average (1 min) at start/end: {info.get('load_start')} / {info.get('load_end')}"
        + (f"; when each measurement started: {info['load_runs']}" if info.get("load_runs") else "")
        + " (it counts the servers' own threads)",
    ]
    if info.get("others_cpu"):
        head.append(
            "- CPU used by other processes than the harness, its servers and load "
            f"generators, during each measurement: {info['others_cpu']}"
        )
    if info.get("note"):
        head.append(f"- note: {info['note']}")
    if info.get("elapsed_s"):
        head.append(f"- wall time: {info['elapsed_s'] / 60:.1f} min")
    (RESULTS / f"{name}.md").write_text("\n".join([*head, "", *table]).rstrip() + "\n")
    return RESULTS / f"{name}.md"


def select(all_scenarios: list[Scenario], only: str | None) -> list[Scenario]:
    if not only:
        return all_scenarios
    wanted = {part.strip() for part in only.split(",") if part.strip()}
    chosen = [s for s in all_scenarios if str(s.number) in wanted or s.key in wanted]
    unknown = wanted - {str(s.number) for s in chosen} - {s.key for s in chosen}
    if unknown:
        sys.exit(f"bench: unknown scenario(s) {', '.join(sorted(unknown))} (see --list)")
    return chosen


def baseline_checkout(ref: str) -> Path:
    """A detached worktree of ``ref`` in bench/.work (made once per commit)."""
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", ref],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    path = WORK / f"baseline-{sha}"
    if not (path / "trioserve").is_dir():
        WORK.mkdir(exist_ok=True)
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(path), sha],
            check=True,
            capture_output=True,
        )
    return path


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 s warm-up, 1 repeat")
    parser.add_argument("--repeat", type=int, help="repeats per measurement (default 3)")
    parser.add_argument("--duration", type=float, help="seconds per wrk/h2load run (default 10)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds before each (default 2)")
    parser.add_argument("--only", help="comma-separated scenario numbers or keys (see --list)")
    parser.add_argument("--servers", help="comma-separated servers to run (default: all)")
    parser.add_argument("--stream-mib", type=int, default=DEFAULT_STREAM_MIB)
    parser.add_argument("--upload-mib", type=int, default=DEFAULT_UPLOAD_MIB)
    parser.add_argument("--transfer-timeout", type=int, default=300, help="curl --max-time")
    parser.add_argument("--note", default="", help="free text stored with the results")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--reinstall", action="store_true", help="reinstall bench/.venv")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also run trioserve at git commit REF (from a worktree in bench/.work) as a peer",
    )
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    return args


def main() -> int:
    args = parse_args()
    if args.list:
        for scenario in scenarios(args):
            print(f"{scenario.number} {scenario.key}: {scenario.title}")
            for variant in scenario.variants:
                print(f"    {variant.key}: {variant.label}: {', '.join(variant.servers)}")
        return 0
    if not in_venv():
        ensure_venv(args.reinstall)
        script = str(Path(__file__).resolve())
        os.execv(str(VENV_PY), [str(VENV_PY), script, *sys.argv[1:]])
    missing = [tool for tool in ("taskset", "wrk", "h2load", "curl") if not shutil.which(tool)]
    if missing:
        print(f"bench: warning: {', '.join(missing)} not found; scenarios needing it fail")
    if (os.cpu_count() or 1) < 2:
        print("bench: warning: fewer than 2 CPUs, the server and the load generator share one")

    chosen = select(scenarios(args), args.only)
    baseline = baseline_checkout(args.baseline) if args.baseline else None
    if baseline is not None:
        for scenario in chosen:
            for variant in scenario.variants:
                if "trioserve" in variant.servers:  # a new list: variants share theirs
                    at = variant.servers.index("trioserve") + 1
                    variant.servers = [*variant.servers[:at], BASELINE, *variant.servers[at:]]
    if args.servers:
        keep = {s.strip() for s in args.servers.split(",")} | {"trioserve", BASELINE}
        for scenario in chosen:
            for variant in scenario.variants:
                variant.servers = [s for s in variant.servers if s in keep]

    WORK.mkdir(exist_ok=True)
    ctx = Ctx(
        args=args,
        certs=ensure_certs(),
        stream_bytes=args.stream_mib * 2**20,
        upload_bytes=args.upload_mib * 2**20,
        baseline=baseline,
    )
    if baseline is not None:
        info_note = f"baseline: trioserve at {args.baseline} ({baseline.name})"
        args.note = f"{args.note}; {info_note}" if args.note else info_note
    ctx.post_file = WORK / "post-1k.bin"
    ctx.post_file.write_bytes(b"x" * 1024)
    if any(s.key == "upload" for s in chosen):
        ctx.upload_file = WORK / f"zeros-{args.upload_mib}MiB.bin"
        with open(ctx.upload_file, "wb") as f:  # sparse: costs no disk, reads as zeros
            f.truncate(ctx.upload_bytes)

    signal.signal(signal.SIGTERM, interrupt)  # stop the running server, keep the results
    info = machine_info(args)
    info["load_start"] = round(os.getloadavg()[0], 2)
    started = time.monotonic()
    data: dict[str, Any] = {
        s.key: {v.key: {"runs": {srv: [] for srv in v.servers}} for v in s.variants} for s in chosen
    }
    total = sum(len(v.servers) for s in chosen for v in s.variants) * args.repeat
    done = 0
    interrupted = False
    try:
        for rep in range(args.repeat):
            for scenario in chosen:
                for variant in scenario.variants:
                    for server in rotated(variant.servers, rep):
                        done += 1
                        print(
                            f"[{done}/{total}] repeat {rep + 1}: {scenario.number} "
                            f"{scenario.key}/{variant.key} {server} ... ",
                            end="",
                            flush=True,
                        )
                        result = run_one(ctx, scenario, variant, server)
                        data[scenario.key][variant.key]["runs"][server].append(result)
                        shown = {
                            k: round(v, 2) if isinstance(v, float) else v
                            for k, v in result.items()
                            if k in {key for key, _, _ in variant.metrics} | {"error", "na"}
                        }
                        print(shown, flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\nbench: interrupted; writing what was measured")
    info["load_end"] = round(os.getloadavg()[0], 2)
    info["trioserve_commit_end"] = trioserve_commit()
    loads = _every_run(data, "load1")
    if loads:
        info["load_runs"] = (
            f"min {loads[0]:.1f}, median {statistics.median(loads):.1f}, max {loads[-1]:.1f}"
        )
    others = _every_run(data, "others_cpu_pct")
    if others:
        info["others_cpu"] = (
            f"min {others[0]:.1f}%, median {statistics.median(others):.1f}%, "
            f"max {others[-1]:.1f}% of one core"
        )
    info["elapsed_s"] = round(time.monotonic() - started, 1)
    if interrupted:
        info["interrupted"] = True
    for scenario in chosen:
        for variant in scenario.variants:
            entry = data[scenario.key][variant.key]
            entry["label"] = variant.label
            entry["primary"] = variant.primary
            entry["higher_is_better"] = variant.higher_is_better
            entry["summary"] = summarize(variant, entry["runs"])
    table = render(chosen, data)
    print()
    print("\n".join(table))
    if not args.no_save:
        path = write_results(args, info, data, table)
        print(f"bench: results in {path.relative_to(ROOT)} and {path.with_suffix('.json').name}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
