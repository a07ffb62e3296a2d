"""Developer tasks: ``nox -s tests`` (the test suite) and ``nox -s lint`` (ruff + mypy --strict)."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """Run the test suite (end-to-end tests use curl/nghttp/h2load when installed)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff (lint + format check) and mypy --strict on the package."""
    session.install("-e", ".[lint]")
    session.run("ruff", "check", "trioserve", "tests", "examples", "noxfile.py")
    session.run("ruff", "format", "--check", "trioserve", "tests", "examples", "noxfile.py")
    session.run("mypy", "--strict", "trioserve")


@nox.session(python="3.11")
def soak(session: nox.Session) -> None:
    """Opt-in, longer hostile-client run (not in CI): the attack tests, the fuzzers with 50
    times the examples, then tests/test_soak.py (good and hostile clients against one
    server for TRIOSERVE_SOAK_SECONDS, default 120: memory flat, no thread leak; -s shows
    its numbers); loopback and in-memory only, bounded, about 15 minutes plus the soak."""
    session.install("-e", ".[test]")
    session.run("pytest", "tests/test_attacks.py", *session.posargs)
    session.run(
        "pytest",
        "tests/test_fuzz.py",
        "--timeout=1800",
        *session.posargs,
        env={"TRIOSERVE_FUZZ_SCALE": "50"},
    )
    session.run(
        "pytest",
        "tests/test_soak.py",
        "-s",
        "--timeout=900",
        *session.posargs,
        env={"TRIOSERVE_SOAK": "1"},
    )


@nox.session(python=False)
def bench(session: nox.Session) -> None:
    """Side-by-side benchmark against the peers (bench/run.py; not run by default, not in CI).

    ``nox -s bench -- --quick`` passes its arguments on; see bench/README.md.
    """
    import sys

    session.run(sys.executable, "bench/run.py", *session.posargs, external=True)
