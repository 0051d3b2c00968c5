"""Where requests go: an origin (scheme, host, port) parsed from a base URL."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str     # a name or an IP literal (IPv6 without brackets)
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def host_header(self) -> bytes:
        """The Host field: the port only when it is not the scheme's default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port != DEFAULT_PORTS[self.scheme]:
            host = f"{host}:{self.port}"
        return host.encode("idna")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def split_url(url: str) -> tuple[Origin, str]:
    """("https://api.example.com/v1/x?y=1") -> (Origin, "/v1/x?y=1").

    Refuses what a gateway must not guess about: another scheme, no host, and
    credentials in the URL (they would show wherever the URL does; an API key
    goes in a header). Messages never repeat the URL: its query may hold a key.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("invalid upstream URL") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError("upstream URL must start with http:// or https://")
    if parts.username is not None or parts.password is not None:
        raise ValueError("upstream URL must not carry credentials (use a header)")
    host = parts.hostname
    if not host:
        raise ValueError("upstream URL has no host")
    try:
        host.encode("idna")
    except UnicodeError:
        raise ValueError("upstream URL has an invalid host name") from None
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return Origin(scheme, host, port or DEFAULT_PORTS[scheme]), target
