"""The TLS context of the `server.tls_bind` listeners, built from `[tls]`.

The master builds it (at start and on each reload) before it forks, so every
worker of a generation inherits the same OpenSSL context, and with it the same
session-ticket keys: a client resumes its session whichever worker its next
connection reaches. A reload that leaves the three files as they were keeps
the context (and the tickets already issued stay valid); a changed file gives
the new generation a new context, while the old workers finish their
connections on theirs.

Everything that can be wrong with the files is found here, before anything
is bound or forked, and is a ConfigError naming the config file, the key and
the file: `neurohttpd check`, `start` and a reload all refuse it. An expired
certificate (or one not valid yet) is only warned about, as nginx serves it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .config import Config, ConfigError

ALPN = ["http/1.1"]
# Seconds the closing TLS handshake (close_notify both ways) may take before
# the socket is closed anyway.
SHUTDOWN_TIMEOUT = 5.0

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n(.+?)-----END CERTIFICATE-----",
                       re.S)
_PEM_KEY = re.compile(rb"-----BEGIN ((?:RSA |EC |ENCRYPTED )?PRIVATE KEY)-----")


@dataclass(frozen=True)
class ServerTLS:
    """A built server context and what it was built from."""

    context: ssl.SSLContext
    fingerprint: bytes          # SHA-256 over the files' contents: unchanged files, same context
    cert_file: str
    not_before: datetime | None
    not_after: datetime | None
    client_certs: bool          # ca_file is set: clients must present a certificate from it
    warnings: list[str] = field(default_factory=list)


def load(cfg: Config, previous: ServerTLS | None = None) -> ServerTLS | None:
    """The context for cfg's TLS listeners (None if it has none); `previous`
    is returned as it is if the files have not changed. Raises ConfigError."""
    if not cfg.server.tls_bind:
        return None
    where = cfg.path or "<defaults>"
    tls = cfg.tls
    cert = _read(where, "tls.cert_file", tls.cert_file)
    certs = _PEM_CERT.findall(cert)
    if not certs:
        raise ConfigError(f"{where}: tls.cert_file {tls.cert_file}: no PEM certificate in it "
                          f"(expected -----BEGIN CERTIFICATE-----)")
    key_key, key_path = ("tls.key_file", tls.key_file) if tls.key_file else \
        ("tls.cert_file", tls.cert_file)
    key = _read(where, "tls.key_file", tls.key_file) if tls.key_file else cert
    kind = _PEM_KEY.search(key)
    if kind is None:
        hint = "" if tls.key_file else " (set tls.key_file to the file that holds it)"
        raise ConfigError(f"{where}: {key_key} {key_path}: no PEM private key in it{hint}")
    if kind.group(1) == b"ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in key:
        raise ConfigError(f"{where}: {key_key} {key_path}: the private key is encrypted with a "
                          f"passphrase, which the server cannot ask for; decrypt it "
                          f"(openssl pkey -in KEY -out KEY.plain)")
    ca = _read(where, "tls.ca_file", tls.ca_file) if tls.ca_file else b""
    fingerprint = hashlib.sha256(b"\0".join((cert, key, ca, tls.ca_file.encode()))).digest()
    try:
        not_before, not_after = validity(_pem_body(certs[0]))
    except ValueError as e:
        raise ConfigError(f"{where}: tls.cert_file {tls.cert_file}: the first certificate "
                          f"cannot be read ({e})") from None
    if previous is not None and previous.fingerprint == fingerprint:
        return ServerTLS(previous.context, fingerprint, tls.cert_file, not_before, not_after,
                         previous.client_certs, _warnings(tls.cert_file, not_before, not_after))
    ctx = new_server_context()
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file or None, password=_no_passphrase)
    except (ssl.SSLError, ValueError) as e:
        if isinstance(e, ssl.SSLError) and e.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"{where}: {key_key} {key_path}: the private key does not match "
                              f"the certificate in tls.cert_file {tls.cert_file}") from None
        raise ConfigError(f"{where}: tls.cert_file {tls.cert_file}, {key_key} {key_path}: "
                          f"not a usable certificate and key ({_reason(e)})") from None
    except OSError as e:  # the file went away since it was read
        raise ConfigError(f"{where}: tls.cert_file {tls.cert_file}: cannot read: "
                          f"{e.strerror}") from None
    if tls.ca_file:
        try:
            ctx.load_verify_locations(cafile=tls.ca_file)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"{where}: tls.ca_file {tls.ca_file}: no usable CA certificate "
                              f"({_reason(e)})") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ServerTLS(ctx, fingerprint, tls.cert_file, not_before, not_after, bool(tls.ca_file),
                     _warnings(tls.cert_file, not_before, not_after))


def new_server_context() -> ssl.SSLContext:
    """Python's server defaults (its cipher list at security level 2, no
    compression, server cipher preference) made explicit where they matter:
    TLS 1.2 at least, no renegotiation (a CPU-exhaustion lever in TLS 1.2),
    ALPN http/1.1, session tickets on (OpenSSL's default: 2 per handshake)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options &= ~ssl.OP_NO_TICKET
    ctx.set_alpn_protocols(ALPN)
    return ctx


def server_kwargs(context: ssl.SSLContext | None, handshake_timeout: float) -> dict[str, Any]:
    """loop.create_server's TLS arguments for a listener (none for a plain one).
    The handshake gets header_timeout: a client that opens a connection and
    never finishes the handshake is closed like one that never sends a head."""
    if context is None:
        return {}
    return {"ssl": context, "ssl_handshake_timeout": handshake_timeout,
            "ssl_shutdown_timeout": SHUTDOWN_TIMEOUT}


def _read(where: str, key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{where}: {key} {path}: cannot read: {e.strerror}") from None


def _no_passphrase() -> bytes:
    # Never let OpenSSL prompt on the terminal (a daemon would hang there).
    raise ValueError("the private key needs a passphrase")


def _reason(e: Exception) -> str:
    if isinstance(e, ssl.SSLError) and e.reason:
        return e.reason.replace("_", " ").lower()
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def _pem_body(block: bytes) -> bytes:
    try:
        return base64.b64decode(b"".join(block.split()), validate=True)
    except binascii.Error:
        raise ValueError("bad base64") from None


def _warnings(path: str, not_before: datetime | None, not_after: datetime | None) -> list[str]:
    now = datetime.now(UTC)
    out = []
    if not_after is not None and not_after < now:
        out.append(f"tls.cert_file {path}: the certificate expired on {not_after:%Y-%m-%d %H:%M} "
                   f"UTC; clients that check it will refuse the connection")
    if not_before is not None and not_before > now:
        out.append(f"tls.cert_file {path}: the certificate is not valid before "
                   f"{not_before:%Y-%m-%d %H:%M} UTC")
    return out


# ---- X.509 validity, from DER (sans-IO). Python's ssl module decodes a
# certificate only for a verified peer; this reads the one field we need.

def _tlv(der: bytes, i: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) of the DER element at i."""
    if i + 2 > len(der):
        raise ValueError("truncated")
    tag, n = der[i], der[i + 1]
    i += 2
    if n & 0x80:
        size = n & 0x7F
        if not 1 <= size <= 4 or i + size > len(der):
            raise ValueError("bad length")
        n = int.from_bytes(der[i:i + size], "big")
        i += size
    if i + n > len(der):
        raise ValueError("truncated")
    return tag, i, i + n


def _time(tag: int, raw: bytes) -> datetime:
    text = raw.decode("ascii")
    if tag == 0x17:      # UTCTime YYMMDDHHMMSSZ (RFC 5280: 50-99 are 19xx)
        year = int(text[:2])
        text = str(1900 + year if year >= 50 else 2000 + year) + text[2:]
    elif tag != 0x18:    # GeneralizedTime YYYYMMDDHHMMSSZ
        raise ValueError("bad time")
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)


def validity(der: bytes) -> tuple[datetime, datetime]:
    """(notBefore, notAfter) of a DER X.509 certificate; ValueError if it is not one."""
    tag, start, _ = _tlv(der, 0)
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, i, end = _tlv(der, start)          # tbsCertificate
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, _, nxt = _tlv(der, i)
    if tag == 0xA0:                         # [0] version
        i = nxt
    for want in (0x02, 0x30, 0x30):         # serial, signature algorithm, issuer
        tag, _, nxt = _tlv(der, i)
        if tag != want or nxt > end:
            raise ValueError("not a certificate")
        i = nxt
    tag, i, _ = _tlv(der, i)                # validity
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, s, e = _tlv(der, i)
    not_before = _time(tag, der[s:e])
    tag, s, e2 = _tlv(der, e)
    return not_before, _time(tag, der[s:e2])
