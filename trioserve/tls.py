"""TLS: the server's SSLContext, client certificates for the app, certificate reloads.

The context (:func:`make_ssl_context`) offers ALPN ``h2`` and ``http/1.1`` and
keeps to HTTP/2's TLS requirements by default (RFC 9113 §9.2: TLS 1.2 or later,
ephemeral key exchange, AEAD ciphers). Options: ``--tls-min-version``,
``--ciphers`` (TLS 1.2 suites; TLS 1.3's are OpenSSL's), an encrypted key's
password (``--keyfile-password``, in OpenSSL's ``env:``/``file:``/``pass:``
syntax), and client certificates: ``--cert-reqs optional|required`` with the
CAs of ``--ca-certs``.

**Client certificates reach the app** under mod_ssl's environ names
(:func:`tls_environ`, computed once per connection, the same over HTTP/1.1 and
HTTP/2): ``SSL_PROTOCOL`` and ``SSL_CIPHER`` always, ``SSL_CLIENT_VERIFY``
(``SUCCESS`` for a verified certificate, ``NONE`` when the client sent none),
and for a certificate ``SSL_CLIENT_S_DN``, ``SSL_CLIENT_I_DN`` (RFC 2253
strings, as mod_ssl writes them) and ``SSL_CLIENT_CERT`` (PEM). A certificate
that does not verify ends the handshake (OpenSSL sends an alert), as with
mod_ssl's ``SSLVerifyClient optional``, so the app never sees it:
``FAILED`` appears only if OpenSSL hands over a certificate without
verifying it, which these settings do not allow.

**Reloading certificates** (:func:`reload_certificates`, on SIGHUP): every
context this process made is rebuilt from its options, files read again, and
the whole new context is checked before it is used. The served context then
hands each new handshake to the new one (from its SNI callback, which OpenSSL
calls for every ClientHello, with or without a server name), so connections
already open keep their session and nothing is dropped; files that do not
load leave the current ones in place. Swapping a whole context, rather than
loading the new files into the served one, means a certificate and key that
do not match can never be half installed.
"""

from __future__ import annotations

import os
import ssl
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .config import ConfigError

if TYPE_CHECKING:
    from .config import Config

# RFC 9113 §9.2: HTTP/2 over TLS needs TLS 1.2 or later, an ephemeral key
# exchange and an AEAD cipher. Restricting TLS 1.2 suites to these keeps
# clients from negotiating something HTTP/2 would then have to refuse.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"

ALPN_PROTOCOLS = ("h2", "http/1.1")

CERT_REQS = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}
TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
PASSWORD_SOURCES = ("env:", "file:", "pass:")

# Contexts made by make_ssl_context in this process, with the options they came
# from: what reload_certificates rebuilds.
_served: weakref.WeakKeyDictionary[ssl.SSLContext, Config] = weakref.WeakKeyDictionary()


class TLSFileError(ConfigError):
    """A TLS file (certificate, key, CAs, password) cannot be read or used."""

    exit_status = 1


def check_tls_options(config: Config) -> None:
    """Refuse TLS options that cannot work, without reading any file (Config calls this).

    Raises:
      ConfigError: one line naming the option.
    """
    _check(
        config.cert_reqs in CERT_REQS,
        f"cert-reqs must be none, optional or required, not {config.cert_reqs!r}",
    )
    _check(
        config.tls_min_version in TLS_VERSIONS,
        f"tls-min-version must be 1.2 or 1.3, not {config.tls_min_version!r}",
    )
    if config.certfile is None:
        for name, value in (
            ("ca_certs", config.ca_certs),
            ("ciphers", config.ciphers),
            ("keyfile_password", config.keyfile_password),
            ("cert_reqs", None if config.cert_reqs == "none" else config.cert_reqs),
            ("tls_min_version", None if config.tls_min_version == "1.2" else "1.3"),
        ):
            flag = "--" + name.replace("_", "-")
            _check(value is None, f"{flag} needs --certfile and --keyfile (it is about TLS)")
    _check(
        config.cert_reqs == "none" or config.ca_certs is not None,
        f"--cert-reqs {config.cert_reqs} needs --ca-certs FILE: the CAs client certificates"
        " must chain to",
    )
    _check(
        config.ca_certs is None or config.cert_reqs != "none",
        "--ca-certs is unused with --cert-reqs none: add --cert-reqs optional or required",
    )
    password = config.keyfile_password
    _check(
        password is None or password.startswith(PASSWORD_SOURCES),
        "keyfile-password must be env:VAR, file:PATH or pass:TEXT",
    )
    if config.ciphers is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(config.ciphers)
        except ssl.SSLError:
            message = f"--ciphers {config.ciphers!r}: OpenSSL knows no such cipher"
            raise ConfigError(message) from None


def make_ssl_context(config: Config) -> ssl.SSLContext:
    """The server context for ``config`` (which has a certfile), ALPN ``h2`` and ``http/1.1``.

    The context is remembered (weakly) so that :func:`reload_certificates`
    can give it new files.

    Raises:
      TLSFileError: a file cannot be read, does not load, or the key and
        certificate do not match; the password cannot be had or is wrong.
    """
    context = _build(config)
    _served[context] = config
    return context


def check_tls_files(config: Config) -> None:
    """Load ``config``'s TLS files once, to report a problem before anything serves.

    Raises:
      TLSFileError: as :func:`make_ssl_context`.
    """
    _build(config)


def reload_certificates() -> int:
    """Read the TLS files of every context this process serves again; how many there are.

    New handshakes use the new files; open connections are not touched.

    Raises:
      TLSFileError: for the first context whose files do not load; that one
        (and those after it) keep their current files.
    """
    served = list(_served.items())
    for context, config in served:
        replacement = _build(config)
        context.sni_callback = _hand_over_to(replacement)
    return len(served)


def _hand_over_to(replacement: ssl.SSLContext) -> Callable[..., None]:
    def sni_callback(ssl_object: Any, server_name: str | None, context: ssl.SSLContext) -> None:
        ssl_object.context = replacement

    return sni_callback


def _build(config: Config) -> ssl.SSLContext:
    assert config.certfile is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[config.tls_min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_ciphers(config.ciphers or _TLS12_CIPHERS)
    context.set_alpn_protocols(list(ALPN_PROTOCOLS))
    for path in (config.certfile, config.keyfile, config.ca_certs):
        # load_cert_chain's OSError does not say which file failed: check first.
        if path is not None and not os.access(path, os.R_OK):
            reason = "not found" if not os.path.exists(path) else "permission denied"
            raise TLSFileError(f"cannot read TLS file {path}: {reason}")
    try:
        context.load_cert_chain(
            config.certfile, config.keyfile, password=_password_reader(config.keyfile_password)
        )
    except _NoPassword:
        raise TLSFileError(
            f"TLS key {config.keyfile} is encrypted: give its password with --keyfile-password"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        hint = " (wrong --keyfile-password?)" if config.keyfile_password else ""
        raise TLSFileError(
            f"cannot load TLS certificate {config.certfile!r}: {exc}{hint}"
        ) from None
    if config.cert_reqs != "none":
        try:
            context.load_verify_locations(cafile=config.ca_certs)
        except (ssl.SSLError, OSError) as exc:
            raise TLSFileError(f"cannot load CA certificates {config.ca_certs!r}: {exc}") from None
        context.verify_mode = CERT_REQS[config.cert_reqs]
    return context


class _NoPassword(Exception):
    """The key is encrypted and no password was configured."""


def _password_reader(source: str | None) -> Callable[[], str]:
    """The password callback for load_cert_chain: called only if the key is encrypted."""

    def read() -> str:
        if source is None:
            raise _NoPassword
        kind, _, value = source.partition(":")
        if kind == "pass":
            return value
        if kind == "env":
            if value not in os.environ:
                raise TLSFileError(
                    f"--keyfile-password env:{value}: the environment variable {value} is not set"
                )
            return os.environ[value]
        try:
            with open(value, encoding="utf-8") as file:
                return file.readline().rstrip("\r\n")
        except OSError as exc:
            raise TLSFileError(
                f"--keyfile-password file:{value}: cannot read it: {exc.strerror or exc}"
            ) from None

    return read


# ---- what the app sees -----------------------------------------------------------------

# OpenSSL's short names, as RFC 2253 strings use them (others keep their long name).
_SHORT_NAMES = {
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "commonName": "CN",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


def tls_environ(stream: Any) -> dict[str, str]:
    """mod_ssl's environ variables for a connection whose handshake is done.

    ``stream`` is a ``trio.SSLStream`` or an ``ssl.SSLObject`` (anything with
    ``version()``, ``cipher()`` and ``getpeercert()``).
    """
    cipher = stream.cipher()
    environ = {"SSL_PROTOCOL": stream.version() or "", "SSL_CIPHER": cipher[0] if cipher else ""}
    der = stream.getpeercert(binary_form=True)
    if der is None:
        environ["SSL_CLIENT_VERIFY"] = "NONE"
        return environ
    # getpeercert() without binary_form is empty unless OpenSSL verified the certificate.
    decoded = stream.getpeercert()
    environ["SSL_CLIENT_VERIFY"] = "SUCCESS" if decoded else "FAILED"
    if decoded:
        environ["SSL_CLIENT_S_DN"] = rfc2253(decoded["subject"])
        environ["SSL_CLIENT_I_DN"] = rfc2253(decoded["issuer"])
    environ["SSL_CLIENT_CERT"] = ssl.DER_cert_to_PEM_cert(der)
    return environ


def rfc2253(name: tuple[tuple[tuple[str, str], ...], ...]) -> str:
    """A distinguished name from ``getpeercert()`` as an RFC 2253 string, most specific
    part first (``CN=client,O=Example,C=DE``), as mod_ssl and ``openssl -nameopt RFC2253``
    write it."""
    return ",".join(
        "+".join(f"{_SHORT_NAMES.get(kind, kind)}={_escape(value)}" for kind, value in rdn)
        for rdn in reversed(name)
    )


def _escape(value: str) -> str:
    escaped = "".join("\\" + char if char in ',+"\\<>;' else char for char in value)
    if escaped.startswith(("#", " ")):
        escaped = "\\" + escaped
    if escaped.endswith(" ") and not escaped.endswith("\\ "):
        escaped = escaped[:-1] + "\\ "
    return escaped


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
