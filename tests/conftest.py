"""Shared fixtures. Tests run under pytest-trio's trio_mode (see pyproject.toml)."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import pytest
import trio.testing
import trustme


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_cert_files(
    tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, str, str]:
    """(certfile, keyfile, cafile) for 127.0.0.1 and localhost."""
    cert = tls_ca.issue_cert("127.0.0.1", "localhost", "::1")
    directory = tmp_path_factory.mktemp("tls")
    certfile, keyfile, cafile = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(certfile), append=True)
    cert.private_key_pem.write_to_path(str(keyfile))
    tls_ca.cert_pem.write_to_path(str(cafile))
    return str(certfile), str(keyfile), str(cafile)


@pytest.fixture
def client_ssl_context(tls_ca: trustme.CA) -> Iterator[ssl.SSLContext]:
    context = ssl.create_default_context()
    tls_ca.configure_trust(context)
    return context


@pytest.fixture
def patient_clock() -> trio.testing.MockClock:
    """A mock clock that jumps only after 0.1 s of real idleness.

    ``autojump_clock`` jumps as soon as every trio task waits, also while an app
    thread computes, so the time a request takes would include jumps to unrelated
    deadlines. Tests that time a good client's requests use this one instead.
    """
    return trio.testing.MockClock(autojump_threshold=0.1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--http1-parser",
        default="auto",
        choices=("auto", "h11", "httptools"),
        help="the HTTP/1.1 head parser servers in this run use where they are left to choose"
        " ('auto'): nox runs the suite with httptools and again with h11, the reference",
    )


def pytest_report_header(config: pytest.Config) -> str:
    return f"HTTP/1.1 head parser: {config.getoption('--http1-parser')}"


@pytest.fixture(autouse=True, scope="session")
def http1_parser(request: pytest.FixtureRequest) -> Iterator[str]:
    """The parser of this run (--http1-parser), for every server started in this process
    with --http1-parser auto (the default): trioserve.http1 reads "auto" as this one."""
    import trioserve.http1

    choice = request.config.getoption("--http1-parser")
    if choice == "auto":
        yield choice
        return
    original = trioserve.http1.head_parser
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            trioserve.http1,
            "head_parser",
            lambda wanted, size: original(choice if wanted == "auto" else wanted, size),
        )
        yield choice
