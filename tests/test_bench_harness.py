"""bench/run.py's own bookkeeping: what else ran during a measurement.

Speed itself is never asserted in tests (bench/README.md); this checks only the
arithmetic the results' "what else ran" line rests on.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

RUN_PY = Path(__file__).resolve().parent.parent / "bench" / "run.py"


@pytest.fixture(scope="module")
def bench_run() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run_under_test", RUN_PY)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_others_cpu_leaves_out_the_harness_its_children_and_kernel_threads(
    bench_run: ModuleType,
) -> None:
    me = os.getpid()
    server, app_child, load_generator = 900_001, 900_002, 900_003
    kworker, other, newcomer, ended = 900_010, 900_020, 900_021, 900_022
    before = {
        me: (1, 1_000),
        server: (me, 50),
        2: (0, 5),
        kworker: (2, 10),
        other: (1, 200),
        ended: (1, 70),
    }
    after = {
        me: (1, 1_500),
        server: (me, 400),
        app_child: (server, 30),  # started during the run: a grandchild of the harness
        load_generator: (me, 300),
        2: (0, 6),
        kworker: (2, 90),
        other: (1, 260),  # 60 ticks meanwhile
        newcomer: (1, 5),  # started meanwhile: all of its 5
    }
    assert bench_run._others_cpu(before, after) == 65


def test_others_cpu_reads_this_machine(bench_run: ModuleType) -> None:
    now = bench_run._process_cpu()
    assert os.getpid() in now
    parent, ticks = now[os.getpid()]
    assert parent == os.getppid()
    assert ticks >= 0
    # Between two readings of the same moment, nobody else can have used anything.
    assert bench_run._others_cpu(now, now) == 0
