"""Benchmark results (bench/results/*.json) as the Performance page and its charts use them.

One set of result files feeds both: `docs/charts.py FILE...` draws the charts from them
and records the files, with their SHA-256, in `docs/images/bench/sources.json`
(:data:`MANIFEST`); the Sphinx extension builds the page's tables from the files that
manifest names and refuses to build if one has changed since the charts were drawn
(:func:`stale_sources`). So a figure on the page is never copied by hand, and the charts
and tables always show the same runs.

Several files merge in the order given: a (scenario, variant) measured in a later file
replaces the earlier one (a partial re-run updates only what it measured). Nothing here
imports Sphinx or matplotlib.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "docs" / "images" / "bench" / "sources.json"

# Servers in the order the tables show them; peers trioserve's ratios are given against.
SERVERS = [
    "trioserve",
    "gunicorn",
    "waitress",
    "hypercorn-trio",
    "hypercorn-asyncio",
    "granian",
    "canned",
    "canned-shaped",
]
RATIO_PEERS = ["gunicorn", "waitress", "hypercorn-trio"]
PEER_NAMES = {
    "gunicorn": "gunicorn (gthread)",
    "waitress": "waitress",
    "hypercorn-trio": "hypercorn (trio)",
    "hypercorn-asyncio": "hypercorn (asyncio)",
    "granian": "granian",
}

# (scenario, variant) -> the row's label; {stream} and {upload} are the run's sizes.
LABELS = {
    ("h1-hello", "wrk"): "HTTP/1.1 hello, `wrk -c50`",
    ("h2c-hello", "c10m10"): "h2c hello, `h2load -c10 -m10`",
    ("h2c-hello", "c1m100"): "h2c hello, `h2load -c1 -m100`",
    ("tls-hello", "c10m10"): "HTTP/2 + TLS hello, `-c10 -m10`",
    ("tls-hello", "c1m100"): "HTTP/2 + TLS hello, `-c1 -m100`",
    ("echo-1k", "h1"): "1 KiB POST echo, HTTP/1.1",
    ("echo-1k", "h2c"): "1 KiB POST echo, h2c",
    ("stream", "h1"): "{stream} streamed, HTTP/1.1",
    ("stream", "h2c"): "{stream} streamed, h2c",
    ("stream", "tls"): "{stream} streamed, HTTP/2 + TLS",
    ("upload", "h1"): "{upload} upload, HTTP/1.1",
    ("upload", "h2c"): "{upload} upload, h2c",
    ("idle", "h1"): "idle keep-alive connection (memory)",
    ("workers", "h1"): "`-w 2` over `-w 1`, HTTP/1.1 hello",
}


@dataclass
class Measurement:
    """One (scenario, variant) of one results file."""

    scenario: str
    variant: str
    label: str
    primary: str  # the main figure: req_s, mib_s, kib_per_conn or scaling
    higher_is_better: bool
    summary: dict[str, Any]  # server -> {"status", "median", "ratio"}
    source: str  # the results file, relative to the repository
    commit: str  # trioserve's commit in that run

    def ok(self, server: str) -> bool:
        entry = self.summary.get(server)
        return entry is not None and entry.get("status") == "ok"

    def median(self, server: str, key: str | None = None) -> float | None:
        if not self.ok(server):
            return None
        value = self.summary[server]["median"].get(key or self.primary)
        return None if value is None else float(value)

    def ratio(self, server: str) -> float | None:
        if not self.ok(server):
            return None
        value = self.summary[server].get("ratio")
        return None if value is None else float(value)

    def status(self, server: str) -> str:
        entry = self.summary.get(server)
        return "not run" if entry is None else str(entry.get("status"))


@dataclass
class Results:
    """Results files merged in order (a later file's measurement wins)."""

    files: list[dict[str, Any]] = field(default_factory=list)  # path, machine
    measurements: dict[tuple[str, str], Measurement] = field(default_factory=dict)

    def get(self, scenario: str, variant: str) -> Measurement | None:
        return self.measurements.get((scenario, variant))

    def ordered(self) -> list[Measurement]:
        known = [key for key in LABELS if key in self.measurements]
        rest = [key for key in self.measurements if key not in LABELS]
        return [self.measurements[key] for key in known + rest]


def relative(path: Path) -> str:
    path = path.resolve()
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def load(paths: list[Path]) -> Results:
    results = Results()
    for path in paths:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        machine = data["machine"]
        source = relative(Path(path))
        results.files.append({"path": source, "machine": machine})
        settings = machine.get("settings", {})
        sizes = {
            "stream": _mib(settings.get("stream_mib", 0)),
            "upload": _mib(settings.get("upload_mib", 0)),
        }
        for scenario, variants in data["results"].items():
            for variant, entry in variants.items():
                label = LABELS.get((scenario, variant), f"{scenario} {variant}: {entry['label']}")
                results.measurements[(scenario, variant)] = Measurement(
                    scenario=scenario,
                    variant=variant,
                    label=label.format(**sizes),
                    primary=entry["primary"],
                    higher_is_better=bool(entry["higher_is_better"]),
                    summary=entry["summary"],
                    source=source,
                    commit=str(machine.get("trioserve_commit", "?")),
                )
    return results


def _mib(value: float) -> str:
    value = float(value)
    if value >= 1024 and value % 1024 == 0:
        return f"{int(value // 1024)} GiB"
    return f"{value:g} MiB"


# ---- the manifest: which files the charts were drawn from ----------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_manifest(paths: list[Path], charts: list[str], manifest: Path = MANIFEST) -> None:
    entries = [{"path": relative(Path(p)), "sha256": sha256(Path(p))} for p in paths]
    document = {
        "about": "written by docs/charts.py: the results files the charts and the tables of"
        " docs/performance.md come from, in merge order",
        "results": entries,
        "charts": charts,
    }
    manifest.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


def read_manifest(manifest: Path = MANIFEST) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(manifest.read_text(encoding="utf-8"))
    return data


def manifest_paths(manifest: Path = MANIFEST) -> list[Path]:
    return [ROOT / entry["path"] for entry in read_manifest(manifest)["results"]]


def stale_sources(manifest: Path = MANIFEST) -> list[str]:
    """Problems that mean the charts no longer show the manifest's files (empty: none)."""
    data = read_manifest(manifest)
    problems = []
    for entry in data["results"]:
        path = ROOT / entry["path"]
        if not path.is_file():
            problems.append(f"{entry['path']} is missing")
        elif sha256(path) != entry["sha256"]:
            problems.append(f"{entry['path']} changed since the charts were drawn")
    for chart in data["charts"]:
        if not (manifest.parent / chart).is_file():
            problems.append(f"chart {chart} is missing")
    return problems


# ---- formatting ---------------------------------------------------------------------------


def number(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def figure(m: Measurement, server: str = "trioserve") -> str:
    """The main figure of `server` in `m`, with its unit (and RSS growth for transfers)."""
    if not m.ok(server):
        return m.status(server)
    value = m.median(server)
    assert value is not None
    if m.primary == "req_s":
        return f"{number(value)} req/s"
    if m.primary == "mib_s":
        text = f"{number(value)} MiB/s"
        rss = m.median(server, "rss_growth_mib")
        if rss is not None and m.scenario == "upload":
            text += f", RSS +{rss:.1f} MiB"
        return text
    if m.primary == "kib_per_conn":
        return f"{value:.1f} KiB each"
    if m.primary == "scaling":
        return f"{value:.2f}x"
    return f"{value:g} {m.primary}"


def ratio_text(m: Measurement, peer: str) -> str:
    if m.ok(peer):
        ratio = m.ratio(peer)
        return "" if ratio is None else f"{ratio:.2f}x"
    status = m.status(peer)
    return "n/a" if status.startswith("n/a") or status == "not run" else status


def summary_table(results: Results) -> tuple[list[str], list[list[str]]]:
    """trioserve's figure per scenario and its ratio to each peer."""
    header = ["scenario", "trioserve"] + [f"÷ {PEER_NAMES[peer]}" for peer in RATIO_PEERS]
    rows = []
    for m in results.ordered():
        rows.append([m.label, figure(m)] + [ratio_text(m, peer) for peer in RATIO_PEERS])
    return header, rows


# What the side-by-side table compares: (label, scenario, variant, key, format).
SIDE_BY_SIDE = [
    ("HTTP/1.1 hello, req/s", "h1-hello", "wrk", "req_s", "{:,.0f}"),
    ("h2c hello (`-c10 -m10`), req/s", "h2c-hello", "c10m10", "req_s", "{:,.0f}"),
    ("streamed response (HTTP/1.1), MiB/s", "stream", "h1", "mib_s", "{:,.0f}"),
    ("RSS growth while streaming (HTTP/1.1), MiB", "stream", "h1", "rss_growth_mib", "{:.1f}"),
    ("upload through `wsgi.input` (HTTP/1.1), MiB/s", "upload", "h1", "mib_s", "{:,.0f}"),
    ("RSS growth while uploading (HTTP/1.1), MiB", "upload", "h1", "rss_growth_mib", "{:,.1f}"),
    ("RSS per idle keep-alive connection, KiB", "idle", "h1", "kib_per_conn", "{:.1f}"),
]
SIDE_BY_SIDE_SERVERS = ["trioserve", "gunicorn", "waitress", "hypercorn-trio"]
SIDE_BY_SIDE_SERVERS += ["hypercorn-asyncio", "granian"]


def side_by_side_table(results: Results) -> tuple[list[str], list[list[str]]]:
    header = ["", "trioserve"] + [PEER_NAMES[s] for s in SIDE_BY_SIDE_SERVERS[1:]]
    rows = []
    for label, scenario, variant, key, fmt in SIDE_BY_SIDE:
        m = results.get(scenario, variant)
        if m is None:
            continue
        row = [label]
        for server in SIDE_BY_SIDE_SERVERS:
            value = m.median(server, key)
            row.append("n/a" if value is None else fmt.format(value))
        rows.append(row)
    return header, rows


# The per-request cost breakdown: HTTP/1.1 hello with the server on one CPU, so
# 1 / throughput is the CPU time one request costs the server.
COST_ROWS = [
    ("canned", "a trio server that answers precomputed bytes: no parsing, no WSGI"),
    (
        "canned-shaped",
        "the same answers through trioserve's task shape: a nursery, a reader, a sender and"
        " a request task per connection, each answer from a worker thread",
    ),
    (
        "trioserve",
        "the whole server: httptools, the WSGI environ, the response rules, logging hooks",
    ),
    ("waitress", "for comparison"),
    ("gunicorn", "for comparison (gthread worker)"),
]


def cost_table(results: Results) -> tuple[list[str], list[list[str]]]:
    header = ["server", "req/s", "µs of server CPU per request", "what it does per request"]
    rows = []
    m = results.get("h1-hello", "wrk")
    if m is None:
        return header, rows
    for server, what in COST_ROWS:
        value = m.median(server)
        if value:
            rows.append([server, number(value), number(1e6 / value), what])
    return header, rows


def cost_steps(results: Results) -> dict[str, float]:
    """µs per HTTP/1.1 hello request: the floor, the task shape, the rest (missing: {})."""
    m = results.get("h1-hello", "wrk")
    if m is None:
        return {}
    canned, shaped, full = (m.median(s) for s in ("canned", "canned-shaped", "trioserve"))
    if not (canned and shaped and full):
        return {}
    return {
        "trio server floor (canned)": 1e6 / canned,
        "task shape (canned-shaped minus canned)": 1e6 / shaped - 1e6 / canned,
        "parsing, WSGI and the rest (trioserve minus canned-shaped)": 1e6 / full - 1e6 / shaped,
    }


def idle_table(results: Results) -> tuple[list[str], list[list[str]]]:
    header = ["server", "KiB per idle connection"]
    m = results.get("idle", "h1")
    rows = []
    if m is not None:
        for server in ("canned", "canned-shaped", "trioserve"):
            value = m.median(server)
            if value is not None:
                rows.append([server, f"{value:.1f}"])
    return header, rows


def runs_table(results: Results) -> tuple[list[str], list[list[str]]]:
    """Which file each measurement comes from, and the machine it ran on."""
    header = ["results file", "date", "trioserve commit", "machine", "scenarios used"]
    used: dict[str, list[str]] = {}
    for m in results.ordered():
        used.setdefault(m.source, []).append(f"{m.scenario} {m.variant}")
    rows = []
    for entry in results.files:
        machine = entry["machine"]
        packages = machine.get("packages", {})
        peers = ", ".join(
            f"{name} {packages[name]}"
            for name in ("gunicorn", "waitress", "hypercorn", "granian")
            if name in packages
        )
        where = (
            f"{machine.get('cpu', '?')}, {machine.get('cpus', '?')} CPUs, Python"
            f" {machine.get('python', '?')}, trio {packages.get('trio', '?')},"
            f" h11 {packages.get('h11', '?')}, h2 {packages.get('h2', '?')}; {peers}"
        )
        scenarios = ", ".join(used.get(entry["path"], [])) or "none (all re-measured later)"
        rows.append(
            [
                f"`{entry['path']}`",
                str(machine.get("date", "?"))[:10],
                f"`{machine.get('trioserve_commit', '?')}`",
                where,
                scenarios,
            ]
        )
    return header, rows
