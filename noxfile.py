"""Developer tasks: ``nox -s tests`` (the test suite), ``nox -s lint`` (ruff + mypy --strict)
and ``nox -s docs`` (the documentation site, warnings as errors, and its examples run).

``tests`` runs once per supported Python found on this machine (``tests-3.11``,
``tests-3.12``, ``tests-3.13``), so someone with only 3.12 gets the suite run on
3.12 rather than a skipped session. Only when none of them is installed does
nox fail, naming the interpreters it looked for. CI has all three.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import nox

SUPPORTED_PYTHONS = ("3.11", "3.12", "3.13")
# The supported versions this machine has (nox also uses its own interpreter for
# its own version); if it has none, all of them, so that nox reports each as
# missing and fails (error_on_missing_interpreters) instead of skipping the
# suite and exiting 0.
RUNNING = f"{sys.version_info.major}.{sys.version_info.minor}"


def _runs(program: str) -> bool:
    """Is ``program`` on PATH and does it start? (pyenv puts a shim for every version it
    has on PATH, and a shim of a version not selected fails when run.)"""
    path = shutil.which(program)
    if path is None:
        return False
    try:
        return subprocess.run([path, "-c", ""], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


FOUND_PYTHONS = [
    version for version in SUPPORTED_PYTHONS if version == RUNNING or _runs(f"python{version}")
]

nox.options.sessions = ["tests", "tests-h11", "lint", "docs"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True


@nox.session(python=FOUND_PYTHONS or list(SUPPORTED_PYTHONS))
def tests(session: nox.Session) -> None:
    """Run the test suite (end-to-end tests use curl/nghttp/h2load when installed)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(name="tests-h11", python=None)
def tests_h11(session: nox.Session) -> None:
    """The suite again, with h11 reading HTTP/1.1 request heads (the reference) where
    the default run uses httptools: any difference between the two is a bug."""
    session.install("-e", ".[test]")
    session.run("pytest", "--http1-parser=h11", *session.posargs)


# lint and soak run on the Python nox itself runs on: whichever the machine has.
@nox.session(python=None)
def lint(session: nox.Session) -> None:
    """ruff (lint + format check) and mypy --strict on the package."""
    # The optional runtime extras too: mypy checks the modules that import them.
    session.install("-e", ".[lint,reload,metrics]")
    session.run("ruff", "check", "trioserve", "tests", "examples", "docs", "noxfile.py")
    session.run("ruff", "format", "--check", "trioserve", "tests", "examples", "docs", "noxfile.py")
    session.run("mypy", "--strict", "trioserve")


@nox.session(python=None)
def docs(session: nox.Session) -> None:
    """Build the site into docs/_build/html with every warning an error (``-W``), broken
    internal references included (``-n``), then run the examples its pages show
    (tests/test_docs.py). ``nox -s docs -- -k options`` passes arguments to pytest."""
    session.install("-e", ".[docs,test]")
    session.run(
        *("sphinx-build", "-W", "--keep-going", "-n", "-E", "-q"),
        *("-b", "html", "docs", "docs/_build/html"),
    )
    session.run("pytest", "tests/test_docs.py", *session.posargs)


@nox.session(python=None)
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
    session.run(sys.executable, "bench/run.py", *session.posargs, external=True)
