"""Draw the Performance page's charts from benchmark results (bench/results/*.json).

    python docs/charts.py bench/results/2026-11-21-vm-2.json bench/results/2026-11-21-vm-3.json

Files merge in the order given: a scenario measured in a later file replaces the earlier
one (so a partial re-run, e.g. ``bench/run.py --only 5,6``, goes last). The charts go to
``docs/images/bench/*.svg``, and ``docs/images/bench/sources.json`` records the files and
their SHA-256. The page's tables are built from the files that manifest names, so after a
new run, this one command updates charts and tables together; ``sphinx-build -W`` (``nox
-s docs``) fails while a recorded file has changed since the charts were drawn.

Needs matplotlib (in the ``docs`` extra). The SVGs are deterministic for a given input and
matplotlib version (no date, fixed ids, text kept as text).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

import benchdata  # noqa: E402

OUT = benchdata.MANIFEST.parent

COLOURS = {
    "trioserve": "#2a6f97",
    "gunicorn": "#e07a5f",
    "waitress": "#81b29a",
    "hypercorn-trio": "#f2cc8f",
    "hypercorn-asyncio": "#c9ada7",
    "granian": "#8d99ae",
    "canned": "#bbbbbb",
    "canned-shaped": "#6d6875",
}


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "svg.hashsalt": "trioserve-bench",
            "svg.fonttype": "none",
            "font.size": 9,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )
    return plt


def _plain(label: str) -> str:
    return label.replace("`", "")


def _save(fig, name: str) -> str:  # type: ignore[no-untyped-def]
    fig.tight_layout()
    fig.savefig(OUT / name, format="svg", metadata={"Date": None, "Creator": None})
    return name


def set_output(directory: Path) -> None:
    """Write the charts and the manifest to ``directory`` instead (for tests)."""
    global OUT
    OUT = directory


def _grouped_bars(
    plt,  # type: ignore[no-untyped-def]
    results: benchdata.Results,
    keys: list[tuple[str, str]],
    servers: list[str],
    value: Callable[[benchdata.Measurement, str], float | None],
    xlabel: str,
    title: str,
    *,
    log: bool = False,
):
    measurements = [m for m in (results.get(*key) for key in keys) if m is not None]
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(measurements) * len(servers) / 3 + 1.2))
    height = 0.8 / len(servers)
    for i, server in enumerate(servers):
        ys, xs = [], []
        for row, m in enumerate(measurements):
            v = value(m, server)
            if v is not None:
                ys.append(row + (i - (len(servers) - 1) / 2) * height)
                xs.append(v)
        ax.barh(ys, xs, height=height, label=server, color=COLOURS.get(server))
    ax.set_yticks(range(len(measurements)), [_plain(m.label) for m in measurements])
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title, loc="left")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return fig


def ratios_chart(plt, results: benchdata.Results) -> str:  # type: ignore[no-untyped-def]
    rows = [m for m in results.ordered() if m.primary in ("req_s", "mib_s")]
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(rows) * len(benchdata.RATIO_PEERS) / 2 + 1.2))
    height = 0.8 / len(benchdata.RATIO_PEERS)
    for i, peer in enumerate(benchdata.RATIO_PEERS):
        ys, xs = [], []
        for row, m in enumerate(rows):
            ratio = m.ratio(peer)
            if ratio is not None:
                ys.append(row + (i - (len(benchdata.RATIO_PEERS) - 1) / 2) * height)
                xs.append(ratio)
        ax.barh(ys, xs, height=height, label=benchdata.PEER_NAMES[peer], color=COLOURS[peer])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlim(0.2, 10)
    ax.set_xticks([0.25, 0.5, 1, 2, 4, 8], ["0.25x", "0.5x", "1x", "2x", "4x", "8x"])
    ax.set_xticks([], minor=True)
    ax.set_yticks(range(len(rows)), [_plain(m.label) for m in rows])
    ax.invert_yaxis()
    ax.set_xlabel("trioserve ÷ peer (throughput; right of 1x: trioserve is faster)")
    ax.set_title("trioserve's throughput relative to each peer, same runs", loc="left")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return _save(fig, "ratios.svg")


def requests_chart(plt, results: benchdata.Results) -> str:  # type: ignore[no-untyped-def]
    keys = [k for k in benchdata.LABELS if results.get(*k) and results.get(*k).primary == "req_s"]
    servers = ["trioserve", "gunicorn", "waitress", "hypercorn-trio", "hypercorn-asyncio"]
    fig = _grouped_bars(
        plt,
        results,
        keys,
        servers,
        lambda m, s: m.median(s),
        "requests per second (server on one CPU)",
        "Small requests (granian, tens of thousands per second, left out of scale)",
    )
    return _save(fig, "requests.svg")


def transfer_chart(plt, results: benchdata.Results) -> str:  # type: ignore[no-untyped-def]
    keys = [k for k in benchdata.LABELS if k[0] in ("stream", "upload") and results.get(*k)]
    servers = ["trioserve", "gunicorn", "waitress", "hypercorn-trio", "hypercorn-asyncio"]
    fig = _grouped_bars(
        plt,
        results,
        keys,
        servers,
        lambda m, s: m.median(s),
        "MiB per second",
        "Streamed responses and uploads",
    )
    return _save(fig, "transfer.svg")


def memory_chart(plt, results: benchdata.Results) -> str:  # type: ignore[no-untyped-def]
    keys = [k for k in benchdata.LABELS if k[0] in ("stream", "upload") and results.get(*k)]
    servers = ["trioserve", "gunicorn", "waitress", "hypercorn-trio", "granian"]
    fig = _grouped_bars(
        plt,
        results,
        keys,
        servers,
        lambda m, s: m.median(s, "rss_growth_mib"),
        "peak RSS growth during the transfer, MiB (log scale)",
        "Memory while streaming and uploading",
        log=True,
    )
    return _save(fig, "memory.svg")


def cost_chart(plt, results: benchdata.Results) -> str:  # type: ignore[no-untyped-def]
    steps = benchdata.cost_steps(results)
    m = results.get("h1-hello", "wrk")
    fig, ax = plt.subplots(figsize=(8, 3.4))
    left = 0.0
    shades = ["#bbbbbb", "#6d6875", "#2a6f97"]
    for (name, value), colour in zip(steps.items(), shades, strict=False):
        ax.barh([0], [value], left=[left], color=colour, label=f"{name}: {value:,.0f} µs")
        left += value
    peers = [("waitress", 1), ("gunicorn", 2)]
    for server, row in peers:
        rate = m.median(server) if m is not None else None
        if rate:
            cost = 1e6 / rate
            ax.barh([row], [cost], color=COLOURS[server], label=f"{server}: {cost:,.0f} µs")
    ax.set_yticks([0, 1, 2], ["trioserve", "waitress", "gunicorn"])
    ax.invert_yaxis()
    ax.set_xlabel("µs of server CPU per HTTP/1.1 hello request (1 ÷ throughput, one CPU)")
    ax.set_title("Where an HTTP/1.1 request's time goes", loc="left")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, fontsize=8, frameon=False)
    return _save(fig, "cost.svg")


CHARTS = [ratios_chart, requests_chart, transfer_chart, memory_chart, cost_chart]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="bench/results/*.json, in order")
    parser.add_argument(
        "--out", type=Path, default=OUT, help=f"where the charts go (default: {OUT})"
    )
    args = parser.parse_args(argv)
    set_output(args.out)
    plt = _plt()
    results = benchdata.load(args.results)
    OUT.mkdir(parents=True, exist_ok=True)
    names = []
    for chart in CHARTS:
        names.append(chart(plt, results))
        plt.close("all")
    manifest = OUT / benchdata.MANIFEST.name
    benchdata.write_manifest(args.results, names, manifest)
    for name in names:
        print(OUT / name)
    print(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
