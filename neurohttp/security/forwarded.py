"""The client's address behind trusted proxies: X-Forwarded-For, read as
nginx's realip module reads it with `real_ip_recursive on`.

Each proxy appends the address it received the request from, so the list
grows to the right and only its right end is vouched for: walking from the
right, every address that is itself a trusted proxy is skipped and the first
that is not is the client. Anything further left was written by that client
and may be forged. If every address is a trusted proxy, the left-most is
taken. An entry that is not an address (garbage, "unknown", an obfuscated
RFC 7239 name) stops the walk: nothing to its left is believed, and the client
is the last address walked (the peer itself if the right-most entry is bad).
Several X-Forwarded-For fields are one list, in order (RFC 9110 5.3).

Only X-Forwarded-For is read, and only when the peer is a trusted proxy
(the firewall checks that): X-Real-IP, Forwarded, True-Client-IP and the like
are ignored, whoever sends them.
"""

from __future__ import annotations

from .networks import Address, Networks, parse, text

_NAME = b"x-forwarded-for"
_LEN = len(_NAME)


def forwarded_for(raw_headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The X-Forwarded-For fields of a request joined with ",", or None."""
    found: list[bytes] | None = None
    for name, value in raw_headers:
        # the length first: it rules out most fields without hashing their names
        if len(name) == _LEN and (name == b"X-Forwarded-For" or name.lower() == _NAME):
            if found is None:
                found = [value]
            else:
                found.append(value)
    if found is None:
        return None
    return found[0] if len(found) == 1 else b",".join(found)


def _entry(item: bytes) -> Address | None:
    """One list entry: an address, "[v6]" or "[v6]:port", "v4:port"."""
    s = item.strip(b" \t")
    if s[:1] == b"[":
        end = s.find(b"]")
        rest = s[end + 1:] if end > 0 else b"?"
        if rest and not (rest[:1] == b":" and rest[1:].isdigit()):
            return None
        s = s[1:end]
    elif s.count(b":") == 1:  # an IPv4 address with a port
        s, _, port = s.partition(b":")
        if not port.isdigit():
            return None
    try:
        return parse(s.decode("ascii"))
    except UnicodeDecodeError:
        return None


def real_client(xff: bytes, trusted: Networks) -> str | None:
    """The client's address from an X-Forwarded-For value sent by a trusted
    proxy (canonical spelling), or None when its right-most entry is bad."""
    client: Address | None = None
    for item in reversed(xff.split(b",")):
        a = _entry(item)
        if a is None:
            break
        client = a
        if not trusted.has(a):
            break
    return None if client is None else text(client)
