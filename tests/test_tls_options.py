"""TLS options end to end: client certificates, versions, ciphers, key passwords, SIGHUP.

Every test runs ``python -m trioserve`` (tests/test_cli.py's helpers) and talks to it
with real clients: curl (HTTP/1.1 and HTTP/2 via ALPN) and ``openssl s_client`` (to
pick the TLS version and cipher, and to connect without SNI), plus a trio TLS
client for a connection held open across a reload. Certificates come from trustme:
one CA for the server and the good clients, another for a client nobody trusts.

The app, ``tests.cli_targets:tls_echo``, answers with the ``SSL_*`` variables it
was given, so each test reads what the app saw.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme
from cryptography.hazmat.primitives import serialization

from tests.test_cli import (
    TIMEOUT,
    HTTPClient,
    assert_one_line_error,
    connect,
    run_cli,
    serving,
)
from trioserve import tls

APP = "tests.cli_targets:tls_echo"

pytestmark = [
    pytest.mark.external,
    pytest.mark.skipif(
        shutil.which("curl") is None or shutil.which("openssl") is None,
        reason="needs curl and openssl (Debian: apt install curl openssl)",
    ),
]


@dataclass(frozen=True)
class PKI:
    """Files of one test's certificates."""

    directory: Path
    ca: trustme.CA

    def path(self, name: str) -> str:
        return str(self.directory / name)

    def read(self, name: str) -> str:
        return (self.directory / name).read_text()

    def server_flags(self, prefix: str = "server") -> list[str]:
        return ["--certfile", self.path(f"{prefix}.crt"), "--keyfile", self.path(f"{prefix}.key")]


def _write_cert(cert: trustme.LeafCert, directory: Path, name: str) -> None:
    cert.cert_chain_pems[0].write_to_path(str(directory / f"{name}.crt"))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(directory / f"{name}.crt"), append=True)
    cert.private_key_pem.write_to_path(str(directory / f"{name}.key"))


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    """server.crt/key, ca.pem, client.crt/key (a subject with RFC 2253 specials),
    other.crt/key (from a CA the server does not trust), other-ca.pem."""
    ca, other = trustme.CA(), trustme.CA()
    _write_cert(ca.issue_cert("127.0.0.1", "localhost"), tmp_path, "server")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client = ca.issue_cert(
        "client@example.org", common_name="Doe, John + Co", organization_name="Example"
    )
    _write_cert(client, tmp_path, "client")
    _write_cert(other.issue_cert("client@example.org", common_name="stranger"), tmp_path, "other")
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    return PKI(tmp_path, ca)


# ---- clients ------------------------------------------------------------------------------


async def run(*command: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(TIMEOUT):
        return await trio.run_process(
            list(command), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )


async def curl(
    url: str, pki: PKI, *flags: str, client: str | None = None, ca: str = "ca.pem"
) -> subprocess.CompletedProcess[bytes]:
    command = ["curl", "-sS", "--max-time", "10", "--cacert", pki.path(ca), *flags]
    if client is not None:
        command += ["--cert", pki.path(f"{client}.crt"), "--key", pki.path(f"{client}.key")]
    return await run(*command, url + "/")


def echoed(result: subprocess.CompletedProcess[bytes]) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    seen: dict[str, str] = json.loads(result.stdout)
    return seen


async def s_client(url: str, pki: PKI, *flags: str) -> subprocess.CompletedProcess[bytes]:
    """One HTTP/1.1 request through ``openssl s_client`` (which waits for the server's close)."""
    address = url.removeprefix("https://")
    request = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    return await run(
        "openssl", "s_client", "-connect", address, "-CAfile", pki.path("ca.pem"),
        "-verify_return_error", "-alpn", "http/1.1", "-quiet", "-ign_eof", *flags,
        stdin=request,
    )  # fmt: skip


def s_client_echo(result: subprocess.CompletedProcess[bytes]) -> dict[str, str]:
    head, separator, body = result.stdout.partition(b"\r\n\r\n")
    assert separator, (result.stdout, result.stderr)
    assert head.startswith(b"HTTP/1.1 200 "), (result.stdout, result.stderr)
    seen: dict[str, str] = json.loads(body)
    return seen


def openssl_name(pki: PKI, certificate: str, which: str) -> str:
    """``openssl x509 -nameopt RFC2253``'s subject or issuer of a certificate file."""
    output = subprocess.run(
        ["openssl", "x509", "-in", pki.path(certificate), "-noout", f"-{which}",
         "-nameopt", "RFC2253"],
        capture_output=True, check=True, text=True,
    ).stdout  # fmt: skip
    return output.strip().removeprefix(f"{which}=")


# ---- client certificates --------------------------------------------------------------------


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
async def test_verified_client_certificate_reaches_the_app(pki: PKI, http: str) -> None:
    flags = [*pki.server_flags(), "--ca-certs", pki.path("ca.pem"), "--cert-reqs", "required"]
    async with serving(APP, "-b", "127.0.0.1:0", *flags) as cli:
        seen = echoed(await curl(cli.url, pki, http, client="client"))
    assert seen["SERVER_PROTOCOL"] == ("HTTP/2" if http == "--http2" else "HTTP/1.1")
    assert seen["wsgi.url_scheme"] == "https"
    assert seen["SSL_CLIENT_VERIFY"] == "SUCCESS"
    # RFC 2253, as mod_ssl and openssl write it: most specific first, specials escaped.
    assert seen["SSL_CLIENT_S_DN"] == openssl_name(pki, "client.crt", "subject")
    assert seen["SSL_CLIENT_S_DN"].startswith("CN=Doe\\, John \\+ Co,OU=")
    assert seen["SSL_CLIENT_I_DN"] == openssl_name(pki, "client.crt", "issuer")
    assert seen["SSL_CLIENT_CERT"] == pki.read("client.crt")
    assert seen["SSL_PROTOCOL"] == "TLSv1.3"
    assert seen["SSL_CIPHER"].startswith("TLS_")


async def test_required_client_certificate_missing_or_untrusted_ends_the_handshake(
    pki: PKI,
) -> None:
    flags = [*pki.server_flags(), "--ca-certs", pki.path("ca.pem"), "--cert-reqs", "required"]
    async with serving(APP, "-b", "127.0.0.1:0", *flags) as cli:
        missing = await curl(cli.url, pki)
        untrusted = await curl(cli.url, pki, client="other")
        good = await curl(cli.url, pki, client="client")
    assert missing.returncode != 0
    assert missing.stdout == b""  # the app never answered
    assert untrusted.returncode != 0
    assert untrusted.stdout == b""
    assert echoed(good)["SSL_CLIENT_VERIFY"] == "SUCCESS"


async def test_optional_client_certificate(pki: PKI) -> None:
    flags = [*pki.server_flags(), "--ca-certs", pki.path("ca.pem"), "--cert-reqs", "optional"]
    async with serving(APP, "-b", "127.0.0.1:0", *flags) as cli:
        without = echoed(await curl(cli.url, pki, "--http2"))
        verified = echoed(await curl(cli.url, pki, "--http2", client="client"))
        untrusted = await curl(cli.url, pki, client="other")
    assert without["SSL_CLIENT_VERIFY"] == "NONE"
    assert "SSL_CLIENT_S_DN" not in without
    assert "SSL_CLIENT_CERT" not in without
    assert verified["SSL_CLIENT_VERIFY"] == "SUCCESS"
    # A certificate that does not verify is refused, never passed on as FAILED.
    assert untrusted.returncode != 0
    assert untrusted.stdout == b""


async def test_without_cert_reqs_the_server_asks_for_no_certificate(pki: PKI) -> None:
    async with serving(APP, "-b", "127.0.0.1:0", *pki.server_flags()) as cli:
        seen = echoed(await curl(cli.url, pki, client="client"))
    assert seen["SSL_CLIENT_VERIFY"] == "NONE"
    assert set(seen) == {
        "SSL_PROTOCOL", "SSL_CIPHER", "SSL_CLIENT_VERIFY", "SERVER_PROTOCOL", "wsgi.url_scheme"
    }  # fmt: skip


async def test_plain_http_has_no_ssl_variables() -> None:
    async with serving(APP, "-b", "127.0.0.1:0") as cli:
        result = await run("curl", "-sS", "--max-time", "10", cli.url + "/")
    assert json.loads(result.stdout) == {"SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http"}


# ---- versions and ciphers -----------------------------------------------------------------


async def test_tls_version_and_cipher_reach_the_app_over_tls_1_2(pki: PKI) -> None:
    async with serving(APP, "-b", "127.0.0.1:0", *pki.server_flags()) as cli:
        result = await s_client(cli.url, pki, "-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305")
    seen = s_client_echo(result)
    assert seen["SSL_PROTOCOL"] == "TLSv1.2"
    assert seen["SSL_CIPHER"] == "ECDHE-ECDSA-CHACHA20-POLY1305"


async def test_tls_min_version_1_3_refuses_tls_1_2(pki: PKI) -> None:
    async with serving(
        APP, "-b", "127.0.0.1:0", *pki.server_flags(), "--tls-min-version", "1.3"
    ) as cli:
        old = await s_client(cli.url, pki, "-tls1_2")
        new = await s_client(cli.url, pki, "-tls1_3")
    assert old.returncode != 0
    assert b"HTTP/1.1" not in old.stdout
    assert s_client_echo(new)["SSL_PROTOCOL"] == "TLSv1.3"


async def test_ciphers_limit_what_tls_1_2_clients_get(pki: PKI) -> None:
    flags = [*pki.server_flags(), "--ciphers", "ECDHE-ECDSA-AES128-GCM-SHA256"]
    async with serving(APP, "-b", "127.0.0.1:0", *flags) as cli:
        refused = await s_client(
            cli.url, pki, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384"
        )
        default = await s_client(cli.url, pki, "-tls1_2")
    assert refused.returncode != 0
    assert b"HTTP/1.1" not in refused.stdout
    assert s_client_echo(default)["SSL_CIPHER"] == "ECDHE-ECDSA-AES128-GCM-SHA256"


# ---- encrypted keys -------------------------------------------------------------------------


def encrypt_key(pki: PKI, password: bytes) -> str:
    key = serialization.load_pem_private_key(Path(pki.path("server.key")).read_bytes(), None)
    path = pki.directory / "encrypted.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        )
    )
    return str(path)


@pytest.mark.parametrize("source", ["env", "file", "pass"])
async def test_encrypted_key_with_its_password(pki: PKI, source: str) -> None:
    keyfile = encrypt_key(pki, b"s3cret pass")
    (pki.directory / "password.txt").write_text("s3cret pass\n")
    password = {
        "env": "env:TRIOSERVE_TEST_KEY_PASSWORD",
        "file": f"file:{pki.path('password.txt')}",
        "pass": "pass:s3cret pass",
    }[source]
    flags = ["--certfile", pki.path("server.crt"), "--keyfile", keyfile]
    os.environ["TRIOSERVE_TEST_KEY_PASSWORD"] = "s3cret pass"
    try:
        async with serving(APP, "-b", "127.0.0.1:0", *flags, "--keyfile-password", password) as cli:
            seen = echoed(await curl(cli.url, pki, "--http2"))
    finally:
        del os.environ["TRIOSERVE_TEST_KEY_PASSWORD"]
    assert seen["SERVER_PROTOCOL"] == "HTTP/2"


@pytest.mark.parametrize(
    ("password", "message"),
    [
        (None, "TLS key {keyfile} is encrypted: give its password with --keyfile-password"),
        (
            "env:TRIOSERVE_NO_SUCH_VARIABLE",
            "--keyfile-password env:TRIOSERVE_NO_SUCH_VARIABLE: the environment variable"
            " TRIOSERVE_NO_SUCH_VARIABLE is not set",
        ),
        (
            "file:{directory}/missing.txt",
            "--keyfile-password file:{directory}/missing.txt: cannot read it:"
            " No such file or directory",
        ),
    ],
    ids=["no-password", "unset-variable", "missing-file"],
)
async def test_encrypted_key_without_a_usable_password(
    pki: PKI, password: str | None, message: str
) -> None:
    keyfile = encrypt_key(pki, b"s3cret")
    flags = ["--certfile", pki.path("server.crt"), "--keyfile", keyfile]
    if password is not None:
        flags += ["--keyfile-password", password.format(directory=pki.directory)]
    result = await run_cli(APP, "-b", "127.0.0.1:0", *flags)
    line = assert_one_line_error(result, 1)
    assert line == "trioserve: error: " + message.format(keyfile=keyfile, directory=pki.directory)


async def test_wrong_key_password(pki: PKI) -> None:
    keyfile = encrypt_key(pki, b"s3cret")
    flags = ["--certfile", pki.path("server.crt"), "--keyfile", keyfile]
    result = await run_cli(APP, "-b", "127.0.0.1:0", *flags, "--keyfile-password", "pass:wrong")
    line = assert_one_line_error(result, 1)
    assert line.startswith(f"trioserve: error: cannot load TLS certificate {flags[1]!r}: ")
    assert line.endswith(" (wrong --keyfile-password?)")


# ---- bad options: one line, exit 2 ----------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cert-reqs", "maybe"], "cert-reqs must be none, optional or required, not 'maybe'"),
        (["--tls-min-version", "1.1"], "tls-min-version must be 1.2 or 1.3, not '1.1'"),
        (["--ciphers", "NO-SUCH"], "--ciphers 'NO-SUCH': OpenSSL knows no such cipher"),
        (
            ["--cert-reqs", "required"],
            "--cert-reqs required needs --ca-certs FILE: the CAs client certificates must chain to",
        ),
        (
            ["--ca-certs", "{ca}"],
            "--ca-certs is unused with --cert-reqs none: add --cert-reqs optional or required",
        ),
        (["--keyfile-password", "pw"], "keyfile-password must be env:VAR, file:PATH or pass:TEXT"),
    ],
    ids=["cert-reqs", "version", "ciphers", "reqs-without-ca", "ca-without-reqs", "password"],
)  # fmt: skip
async def test_bad_tls_options(pki: PKI, flags: list[str], message: str) -> None:
    flags = [flag.format(ca=pki.path("ca.pem")) for flag in flags]
    result = await run_cli(APP, "-b", "127.0.0.1:0", *pki.server_flags(), *flags)
    assert assert_one_line_error(result, 2) == "trioserve: error: " + message


@pytest.mark.parametrize(
    "flags",
    [
        ["--ca-certs", "ca.pem", "--cert-reqs", "optional"],
        ["--ciphers", "ECDHE+AESGCM"],
        ["--tls-min-version", "1.3"],
        ["--keyfile-password", "env:X"],
    ],
    ids=lambda flags: flags[0],
)
async def test_tls_options_without_a_certificate(flags: list[str]) -> None:
    result = await run_cli(APP, "-b", "127.0.0.1:0", *flags)
    line = assert_one_line_error(result, 2)
    assert line == f"trioserve: error: {flags[0]} needs --certfile and --keyfile (it is about TLS)"


async def test_unreadable_ca_file_is_named(pki: PKI) -> None:
    flags = [*pki.server_flags(), "--cert-reqs", "optional"]
    missing = pki.path("missing-ca.pem")
    result = await run_cli(APP, "-b", "127.0.0.1:0", *flags, "--ca-certs", missing)
    line = assert_one_line_error(result, 1)
    assert line == f"trioserve: error: cannot read TLS file {missing}: not found"


# ---- SIGHUP: new certificate files, connections kept ------------------------------------------


def replace_server_certificate(pki: PKI) -> None:
    """Overwrite server.crt/key with a certificate from another CA (written to new-ca.pem)."""
    new_ca = trustme.CA()
    _write_cert(new_ca.issue_cert("127.0.0.1", "localhost"), pki.directory, "server")
    new_ca.cert_pem.write_to_path(pki.path("new-ca.pem"))


def spoil(pki: PKI, name: str) -> None:
    Path(pki.path(name)).write_text("not PEM at all\n")


async def open_keep_alive(url: str, pki: PKI) -> HTTPClient:
    context = ssl.create_default_context(cafile=pki.path("ca.pem"))
    context.set_alpn_protocols(["http/1.1"])
    return HTTPClient(await connect(url, context))


async def get_on(client: HTTPClient) -> dict[str, str]:
    with trio.fail_after(TIMEOUT):
        await client.send_head("GET", "/", keep_alive=True)
        await client.send_body(b"", end=True)
        response = await client.read_response()
    assert response.status == 200
    seen: dict[str, str] = json.loads(response.body)
    return seen


async def test_sighup_reloads_certificates_and_keeps_open_connections(pki: PKI) -> None:
    async with serving(APP, "-b", "127.0.0.1:0", *pki.server_flags()) as cli:
        kept = await open_keep_alive(cli.url, pki)
        assert (await get_on(kept))["SSL_CLIENT_VERIFY"] == "NONE"
        replace_server_certificate(pki)
        cli.send_signal(signal.SIGHUP)
        await cli.wait_for_line("Received SIGHUP: TLS files read again; new connections use them")
        # New handshakes get the new certificate, with SNI (curl to "localhost") or
        # without it (openssl s_client -noservername; curl sends none to an IP address).
        host = cli.url.replace("127.0.0.1", "localhost")
        port = cli.url.rpartition(":")[2]
        with_sni = await curl(host, pki, "--http2", "--resolve", f"localhost:{port}:127.0.0.1",
                              ca="new-ca.pem")  # fmt: skip
        by_address = await curl(cli.url, pki, ca="new-ca.pem")
        old_ca = await curl(cli.url, pki)
        without_sni = await run(
            "openssl", "s_client", "-connect", cli.url.removeprefix("https://"),
            "-CAfile", pki.path("new-ca.pem"), "-verify_return_error", "-noservername",
            stdin=b"",
        )  # fmt: skip
        # The connection opened before the reload is still served.
        assert (await get_on(kept))["SSL_CLIENT_VERIFY"] == "NONE"
        await kept.aclose()
    assert echoed(with_sni)["SERVER_PROTOCOL"] == "HTTP/2"
    assert echoed(by_address)["wsgi.url_scheme"] == "https"
    assert old_ca.returncode != 0  # the old CA does not vouch for the new certificate
    assert without_sni.returncode == 0, without_sni.stdout + without_sni.stderr
    assert b"Verify return code: 0 (ok)" in without_sni.stdout


async def test_sighup_with_broken_files_keeps_the_current_certificate(pki: PKI) -> None:
    async with serving(APP, "-b", "127.0.0.1:0", *pki.server_flags()) as cli:
        spoil(pki, "server.key")
        cli.send_signal(signal.SIGHUP)
        await cli.wait_for_line(
            "Received SIGHUP: the TLS files do not load, keeping the current ones: cannot load"
            " TLS certificate"
        )
        still = await curl(cli.url, pki, "--http2")
        assert cli.process.returncode is None
    assert echoed(still)["SERVER_PROTOCOL"] == "HTTP/2"


async def test_sighup_with_workers_starts_workers_with_the_new_certificate(pki: PKI) -> None:
    async with serving(APP, "-b", "127.0.0.1:0", "-w", "2", *pki.server_flags()) as cli:
        await cli.wait_for_line(r"Worker \d+ is serving", nth=2)
        before = echoed(await curl(cli.url, pki))
        replace_server_certificate(pki)
        cli.send_signal(signal.SIGHUP)
        await cli.wait_for_line(r"New workers are ready: stopping 2 old worker\(s\)")
        # Until they exit, the old workers still share the listening socket, and a
        # connection the kernel hands one of them gets the old certificate.
        await cli.wait_for_line(r"Worker \d+ exited", nth=2)
        after = await curl(cli.url, pki, "--http2", ca="new-ca.pem")
    assert before["SSL_CLIENT_VERIFY"] == "NONE"
    assert echoed(after)["SERVER_PROTOCOL"] == "HTTP/2"


async def test_sighup_with_workers_and_broken_files_keeps_the_workers(pki: PKI) -> None:
    async with serving(APP, "-b", "127.0.0.1:0", "-w", "2", *pki.server_flags()) as cli:
        await cli.wait_for_line(r"Worker \d+ is serving", nth=2)
        spoil(pki, "server.crt")
        cli.send_signal(signal.SIGHUP)
        await cli.wait_for_line(
            "Received SIGHUP: not reloading, the options do not load: cannot load TLS certificate"
        )
        still = await curl(cli.url, pki)
        assert not [line for line in cli.stderr if "Started worker" in line][2:]
    assert echoed(still)["SSL_CLIENT_VERIFY"] == "NONE"


# ---- the pieces, in process ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (((("commonName", "a"),),), "CN=a"),
        (
            ((("countryName", "DE"),), (("organizationName", "Ex, Inc."),), (("commonName", "x"),)),
            "CN=x,O=Ex\\, Inc.,C=DE",
        ),
        (((("commonName", "#1 "),),), "CN=\\#1\\ "),  # leading # and trailing space escaped
        (((("commonName", "a"), ("userId", "b")),), "CN=a+UID=b"),  # a multi-valued RDN
        (((("commonName", 'q"<>;\\'),),), 'CN=q\\"\\<\\>\\;\\\\'),
    ],
)
def test_rfc2253(name: Sequence[tuple[tuple[str, str], ...]], expected: str) -> None:
    assert tls.rfc2253(tuple(name)) == expected
