"""``--metrics-bind`` end to end: the command, real sockets, real clients, real scrapes.

Each test starts ``python -m trioserve tests.cli_targets:wait_for_fifo ... --metrics-bind
127.0.0.1:0`` (``-w 1`` or a supervisor with ``-w 2``), finds the metrics address in the
log line ``Serving metrics at http://127.0.0.1:PORT/metrics``, sends requests over
HTTP/1.1 (tests.test_cli's h11 client) and HTTP/2 (httpx with prior knowledge; curl,
including an h2c upgrade, where installed), and scrapes ``/metrics``; every scrape is
parsed by prometheus_client's own parser. Where Debian's prometheus package is
installed (.ci/run installs it), ``promtool check metrics`` lints a real scrape and a real
Prometheus server scrapes a supervisor. A request is held in flight by the app reading a
FIFO the test writes (tests.cli_targets), never by a sleep.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.test_cli import (
    ROOT,
    TIMEOUT,
    RunningCLI,
    assert_one_line_error,
    release_fifo,
    request,
    run_cli,
    serving,
)
from tests.test_interop import needs, run
from tests.test_workers import matches, ready_pids, supervising, wait_ready

TEST_TIMEOUT = 60  # seconds: the limit for any one test
APP = "tests.cli_targets:wait_for_fifo"


# ---------------------------------------------------------------------------
# Scraping
# ---------------------------------------------------------------------------


@dataclass
class Scrape:
    """One scrape of /metrics, parsed: every sample by name and labels."""

    text: str
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def total(self, name: str, **labels: str) -> float:
        """The sum over every sample of ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(v for (n, have), v in self.samples.items() if n == name and wanted <= have)


def parse(text: str) -> Scrape:
    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return Scrape(text, samples)


async def scrape(metrics: str) -> Scrape:
    """GET /metrics at ``metrics`` (``http://HOST:PORT``) over HTTP/1.1."""
    response = await request(metrics, "/metrics")
    assert response.status == 200, response
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.body.decode())


async def metrics_address(cli: RunningCLI) -> str:
    return (await cli.wait_for_line(r"Serving metrics at (http://[\d.]+:\d+)/metrics")).group(1)


async def scrape_until(metrics: str, condition: str, check: Callable[[Scrape], bool]) -> Scrape:
    """Scrape until ``check(scrape)`` holds (what is awaited happens in another process,
    which tells us nothing else); fails after TIMEOUT, naming ``condition``."""
    with trio.move_on_after(TIMEOUT):
        while not check(result := await scrape(metrics)):  # noqa: ASYNC110 - another process
            # Polling another process for a condition, bounded by TIMEOUT: a polling
            # interval, not a timing assumption.
            await trio.sleep(0.01)
        return result
    raise AssertionError(f"never true: {condition}\n{result.text}")


def requests_2xx(s: Scrape, protocol: str | None = None) -> float:
    labels = {"status": "2xx"} | ({"protocol": protocol} if protocol else {})
    return s.total("trioserve_requests_total", **labels)


async def get_http2(url: str, target: str = "/") -> httpx.Response:
    """One GET over HTTP/2 with prior knowledge, on a connection of its own."""
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(http1=False, http2=True) as client:
            response = await client.get(url + target)
    assert response.http_version == "HTTP/2"
    return response


@asynccontextmanager
async def one_process(*args: str) -> AsyncIterator[tuple[RunningCLI, str]]:
    async with serving(APP, "-b", "127.0.0.1:0", "--metrics-bind", "127.0.0.1:0", *args) as cli:
        yield cli, await metrics_address(cli)


@asynccontextmanager
async def two_workers(*args: str, ready: int = 2) -> AsyncIterator[tuple[RunningCLI, str]]:
    async with supervising(
        APP, "-w", "2", "-b", "127.0.0.1:0", "--metrics-bind", "127.0.0.1:0", *args,
        cwd=ROOT, ready=ready,
    ) as cli:  # fmt: skip
        yield cli, await metrics_address(cli)


# ---------------------------------------------------------------------------
# One process
# ---------------------------------------------------------------------------


async def test_one_process_counts_both_protocols_and_not_its_scrapes() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with one_process() as (cli, metrics):
            for _ in range(3):
                assert (await request(cli.url, "/")).status == 200
            for _ in range(2):
                assert (await get_http2(cli.url)).status_code == 200
            first = await scrape_until(
                metrics,
                "both clients' connections closed",
                lambda s: s.total("trioserve_open_connections") == 0,
            )
            second = await scrape(metrics)
    for s in (first, second):  # the scrapes themselves are not counted
        assert requests_2xx(s, "HTTP/1.1") == 3
        assert requests_2xx(s, "HTTP/2") == 2
        assert s.total("trioserve_requests_total") == 5
        assert s.total("trioserve_requests_failed_total") == 0
    assert first.value("trioserve_connections_total", protocol="HTTP/1.1") == 3
    assert first.value("trioserve_connections_total", protocol="HTTP/2") == 2
    assert first.value("trioserve_request_duration_seconds_count", protocol="HTTP/1.1") == 3
    assert first.value("trioserve_received_bytes_total", protocol="HTTP/2") > 0
    assert first.value("trioserve_sent_bytes_total", protocol="HTTP/1.1") > 0
    assert first.value("trioserve_workers") == 1
    assert first.value("trioserve_app_threads_limit") == 40
    assert first.value("trioserve_requests_in_flight") == 0


@needs("curl", "promtool")
async def test_curl_h2c_upgrade_and_prior_knowledge_and_promtool_lints_the_scrape() -> None:
    """An h2c upgrade counts as an HTTP/1.1 connection and an HTTP/2 one; its request is
    an HTTP/2 request. promtool checks names, units and types the way Prometheus wants."""
    with trio.fail_after(TEST_TIMEOUT):
        async with one_process() as (cli, metrics):
            for option in ("--http2", "--http2-prior-knowledge"):
                result = await run("curl", "-sS", "-o", "/dev/null", option, cli.url + "/")
                assert result.returncode == 0, result.stderr
            s = await scrape_until(
                metrics,
                "curl's connections closed",
                lambda s: s.total("trioserve_open_connections") == 0,
            )
            curled = await run("curl", "-sS", "--http2-prior-knowledge", metrics + "/metrics")
            assert curled.returncode == 0, curled.stderr
            lint = await trio.run_process(
                ["promtool", "check", "metrics"], stdin=curled.stdout, capture_stdout=True,
                capture_stderr=True, check=False,
            )  # fmt: skip
            missing = await run("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", metrics)
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, b"")
    assert parse(curled.stdout.decode()).samples == s.samples  # scraping over h2 counts nothing
    assert s.value("trioserve_connections_total", protocol="HTTP/1.1") == 1  # the upgraded one
    assert s.value("trioserve_connections_total", protocol="HTTP/2") == 2
    assert requests_2xx(s, "HTTP/2") == 2
    assert s.total("trioserve_requests_total") == 2
    assert missing.stdout == b"404"  # metrics live at /metrics only


# ---------------------------------------------------------------------------
# Workers: sums, recycling, a killed worker, gauges
# ---------------------------------------------------------------------------


async def curl_http2(url: str) -> None:
    """One GET over HTTP/2 with prior knowledge, by curl (nghttp2)."""
    result = await run("curl", "-sS", "-o", "/dev/null", "--http2-prior-knowledge", url + "/")
    assert result.returncode == 0, result.stderr


@needs("curl")
async def test_two_workers_are_summed_and_totals_never_go_backwards_across_recycling() -> None:
    """--max-requests 3: the 12 requests pass through at least 4 workers, each replaced
    after its third; every scrape between them sees the totals grow, never shrink.

    HTTP/2 by curl: a worker that reaches --max-requests during an HTTP/2 request stops
    gracefully with GOAWAY and a PING, and python-hyper's h2 (httpx) raises on a PING
    after GOAWAY (python-hyper/h2#1199), where nghttp2 answers it."""
    with trio.fail_after(TEST_TIMEOUT):
        async with two_workers("--max-requests", "3", "--max-requests-jitter", "0") as (
            cli,
            metrics,
        ):
            seen = []
            for number in range(12):
                if number % 2:
                    await curl_http2(cli.url)
                else:
                    assert (await request(cli.url, "/")).status == 200
                seen.append(requests_2xx(await scrape(metrics)))
            # A worker counts a request once its response has gone out, so the scrape
            # just after the last one may not see it yet: wait for it, bounded.
            last = await scrape_until(metrics, "all 12 counted", lambda s: requests_2xx(s) >= 12)
            seen.append(requests_2xx(last))
            await cli.wait_for_line(r"Worker \d+ exited \(exit status 0\)", nth=3)
            final = await scrape_until(
                metrics,
                "two workers serving again",
                lambda s: (
                    s.value("trioserve_workers") == 2
                    and s.value("trioserve_app_threads_limit") == 80
                ),
            )
    assert seen == sorted(seen)
    assert seen[-1] == 12
    assert requests_2xx(final, "HTTP/1.1") == 6
    assert requests_2xx(final, "HTTP/2") == 6
    assert final.value("trioserve_request_duration_seconds_count", protocol="HTTP/2") == 6
    assert final.total("trioserve_connections_total") == 12
    assert final.total("trioserve_requests_failed_total") == 0, final.text
    assert len(matches(cli, r"Served max-requests \(3\)")) >= 3


async def test_a_killed_worker_keeps_its_counts() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with two_workers() as (cli, metrics):
            for _ in range(6):
                assert (await request(cli.url, "/")).status == 200
            assert requests_2xx(await scrape(metrics)) == 6
            victim = ready_pids(cli)[0]
            os.kill(victim, signal.SIGKILL)
            await cli.wait_for_line(rf"Worker {victim} died")
            await wait_ready(cli, 3)
            after = await scrape(metrics)
            assert (await request(cli.url, "/")).status == 200
            later = await scrape(metrics)
    assert requests_2xx(after) == 6
    assert after.value("trioserve_workers") == 2
    assert after.value("trioserve_open_connections", protocol="HTTP/1.1") == 0
    assert requests_2xx(later) == 7


async def test_gauges_are_the_sum_over_the_live_workers(tmp_path: Path) -> None:
    """Two requests held in flight (wherever they landed) and --threads 3 per worker."""
    fifos = [tmp_path / "first.fifo", tmp_path / "second.fifo"]
    for fifo in fifos:
        os.mkfifo(fifo)
    with trio.fail_after(TEST_TIMEOUT):
        async with two_workers("--threads", "3") as (cli, metrics):
            results: list[int] = []

            async def held(fifo: Path) -> None:
                results.append((await request(cli.url, f"/?fifo={fifo}")).status)

            async with trio.open_nursery() as nursery:
                for fifo in fifos:
                    nursery.start_soon(held, fifo)
                await cli.wait_for_line("cli_targets: wait_for_fifo started", nth=2)
                during = await scrape(metrics)
                for fifo in fifos:
                    await release_fifo(fifo, b"the test")
            after = await scrape_until(
                metrics,
                "nothing in flight",
                lambda s: (
                    s.value("trioserve_requests_in_flight") == 0
                    and s.total("trioserve_open_connections") == 0
                ),
            )
    assert results == [200, 200]
    assert during.value("trioserve_requests_in_flight") == 2
    assert during.value("trioserve_app_threads_busy") == 2
    assert during.value("trioserve_app_threads_limit") == 6
    assert during.value("trioserve_open_connections", protocol="HTTP/1.1") == 2
    assert after.value("trioserve_app_threads_busy") == 0
    assert requests_2xx(after) == 2


@needs("prometheus")
async def test_prometheus_scrapes_the_supervisor(tmp_path: Path) -> None:
    """Debian's Prometheus server scrapes /metrics once a second; its query API then
    answers with our sum. It stops with the test (its process is ours, killed by pid)."""
    with trio.fail_after(TEST_TIMEOUT):
        async with two_workers() as (cli, metrics):
            for _ in range(5):
                assert (await request(cli.url, "/")).status == 200
            async with prometheus_scraping(metrics.removeprefix("http://"), tmp_path) as api:
                value = await query_until(api, 'sum(trioserve_requests_total{status="2xx"})', "5")
                up = await query_until(api, 'up{job="trioserve"}', "1")
    assert (value, up) == ("5", "1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def prometheus_scraping(target: str, workdir: Path) -> AsyncIterator[str]:
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: trioserve\n    static_configs:\n"
        f'      - targets: ["{target}"]\n'
    )
    listen = f"127.0.0.1:{free_port()}"
    process = await trio.lowlevel.open_process(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={listen}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://{listen}"
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


async def query_until(api: str, query: str, expected: str) -> str:
    """Ask Prometheus ``query`` until its one result is ``expected`` (it first has to start
    and scrape); the last value seen otherwise, after TIMEOUT."""
    value = ""
    with trio.move_on_after(TIMEOUT * 2):
        async with httpx.AsyncClient() as client:
            while value != expected:
                try:
                    answer = await client.get(f"{api}/api/v1/query", params={"query": query})
                    result = answer.json()["data"]["result"]
                    value = result[0]["value"][1] if result else ""
                except (httpx.TransportError, ValueError, KeyError):
                    pass  # not listening yet, or not ready (a text answer)
                if value != expected:
                    # Polling Prometheus (another process) for a condition, bounded by
                    # TIMEOUT * 2: a polling interval, not a timing assumption.
                    await trio.sleep(0.01)
    return value


# ---------------------------------------------------------------------------
# Bad values: one line, before anything is served
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["--metrics-bind", "nine-one-hundred"], "--metrics-bind: bind address 'nine-one-hundred'"),
        (["--metrics-bind", "fd://3"], "--metrics-bind fd://3: give HOST:PORT or unix:PATH"),
        (
            ["-b", "127.0.0.1:8123", "--metrics-bind", "127.0.0.1:8123"],
            "--metrics-bind 127.0.0.1:8123 is also where the app listens (--bind 127.0.0.1:8123)",
        ),
        (
            ["-b", ":8124", "--metrics-bind", "127.0.0.1:8124"],
            "is also where the app listens (--bind :8124)",
        ),
    ],
    ids=["unparsable", "descriptor", "same-address", "inside-a-wildcard"],
)
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_bad_metrics_bind_is_one_line_and_exit_2(
    args: list[str], mentions: str, workers: str
) -> None:
    result = await run_cli(APP, "-w", workers, *args)
    assert mentions in assert_one_line_error(result, 2)


async def test_metrics_bind_without_prometheus_client_is_refused(tmp_path: Path) -> None:
    """An installation without the metrics extra: a package that fails to import hides
    the real one (PYTHONPATH comes before site-packages)."""
    shadow = tmp_path / "prometheus_client"
    shadow.mkdir()
    (shadow / "__init__.py").write_text('raise ImportError("not installed (a test)")\n')
    result = await run_cli(APP, "--metrics-bind", "127.0.0.1:0", PYTHONPATH=str(tmp_path))
    line = assert_one_line_error(result, 2)
    assert line.endswith("--metrics-bind needs the prometheus_client package:"
                         " pip install 'trioserve[metrics]'")  # fmt: skip


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_metrics_address_in_use_is_one_line_and_exit_1(workers: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await run_cli(
            APP, "-w", workers, "-b", "127.0.0.1:0", "--metrics-bind", f"127.0.0.1:{port}"
        )
    line = assert_one_line_error(result, 1)
    assert f"--metrics-bind: cannot bind 127.0.0.1:{port}: address already in use" in line


async def test_metrics_port_serves_nothing_but_metrics() -> None:
    """The app is never reachable on the metrics listener, nor metrics on the app's."""
    with trio.fail_after(TEST_TIMEOUT):
        async with one_process() as (cli, metrics):
            app_on_metrics = await request(metrics, "/?fifo=")
            metrics_on_app = await request(cli.url, "/metrics")
    assert app_on_metrics.status == 404
    assert metrics_on_app.body == b"no fifo, no wait"
