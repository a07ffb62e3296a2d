"""The server-side TLS context: certificates, ALPN, and HTTP/2's TLS requirements."""

from __future__ import annotations

import os
import ssl

from .config import ConfigError

# RFC 9113 §9.2: HTTP/2 over TLS needs TLS 1.2 or later, an ephemeral key
# exchange and an AEAD cipher. Restricting TLS 1.2 suites to these keeps
# clients from negotiating something HTTP/2 would then have to refuse.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"

ALPN_PROTOCOLS = ("h2", "http/1.1")


def make_ssl_context(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
    """A server context that offers ALPN ``h2`` and ``http/1.1``.

    Raises:
      ConfigError: the certificate or key cannot be read or do not match.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_ciphers(_TLS12_CIPHERS)
    context.set_alpn_protocols(list(ALPN_PROTOCOLS))
    for path in (certfile, keyfile):
        # load_cert_chain's OSError does not say which file failed: check first.
        if path is not None and not os.access(path, os.R_OK):
            reason = "not found" if not os.path.exists(path) else "permission denied"
            raise ConfigError(f"cannot read TLS file {path}: {reason}")
    try:
        context.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load TLS certificate {certfile!r}: {exc}") from None
    return context
