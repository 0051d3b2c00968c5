"""API keys: how a request names its key, and how the server recognises it
knowing only SHA-256 digests.

A key is sent as `Authorization: Bearer KEY` or, when there is no
Authorization header, `x-api-key: KEY`. The server hashes what was sent and
looks the digest up in a dict of the configured digests, then compares the two
digests with `hmac.compare_digest`. Nothing here logs or returns the key; a
key is named by its `name` everywhere (docs/SECURITY.md, "What is constant-time").
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable

from ..config import KeySpec
from ..shared.keylimits import KeyLimits

PREFIX = "nh-"
# RFC 6750's b64token, and a bound: anything else in the header is malformed.
_TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]{1,512}=*")
_BEARER = b"bearer "

# Why a request was refused 401 (also the figures' reasons in /stats and /metrics).
MISSING = "missing"
MALFORMED = "malformed"
INVALID = "invalid"
REASONS = (MISSING, MALFORMED, INVALID)


def new_key() -> str:
    """A fresh random key: the prefix and 256 bits, URL-safe base64."""
    return PREFIX + secrets.token_urlsafe(32)


def digest(key: str | bytes) -> str:
    """The hex SHA-256 of a key, as [[auth.keys]] sha256 holds it."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


class ApiKey:
    """A configured key as the request path uses it (the key itself is not here)."""

    __slots__ = ("name", "digest", "models", "limits", "rate_format")

    def __init__(self, spec: KeySpec) -> None:
        self.name = spec.name
        self.digest = bytes.fromhex(spec.sha256)
        self.models: frozenset[str] | None = frozenset(spec.models) if spec.models else None
        self.limits = KeyLimits(spec.name, spec.rpm, spec.tpm, spec.daily_tokens)
        self.rate_format = ""  # its x-ratelimit-* lines, limits filled in (gate.rate_format)

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def __repr__(self) -> str:
        return f"<ApiKey {self.name}>"


# The fields that carry a key, found by one dict lookup in their usual
# spellings; another case is lower-cased only when its length could match
# (the parser finds its own fields the same way, protocol/h1.py).
_AUTH, _API_KEY = 1, 2
_FIELDS = {b"authorization": _AUTH, b"Authorization": _AUTH, b"x-api-key": _API_KEY,
           b"X-Api-Key": _API_KEY, b"X-API-Key": _API_KEY, b"X-API-KEY": _API_KEY}
_LENGTHS = frozenset(map(len, _FIELDS))


def key_field(raw_headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes] | None:
    """The field that carries the request's key, as (_AUTH or _API_KEY, its raw
    value), None when there is none, or (0, b"") when a field comes twice.
    Authorization wins over x-api-key."""
    auth = api_key = None
    for name, value in raw_headers:
        kind = _FIELDS.get(name)
        if kind is None:
            if len(name) not in _LENGTHS:
                continue
            kind = _FIELDS.get(name.lower())
            if kind is None:
                continue
        if kind == _AUTH:
            if auth is not None:
                return _TWICE
            auth = value
        else:
            if api_key is not None:
                return _TWICE
            api_key = value
    if auth is not None:
        return _AUTH, auth
    if api_key is not None:
        return _API_KEY, api_key
    return None


_TWICE = (0, b"")


def token_of(kind: int, value: bytes) -> bytes:
    """The key in a key_field value (not yet checked for form), or b"" when the
    field is malformed (Authorization not `Bearer <token>`, or the field twice)."""
    if kind == _AUTH:
        if value[:7].lower() != _BEARER:
            return b""
        return value[7:].strip(b" \t")
    return value.strip(b" \t")


def presented(raw_headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request presents (bytes, not yet checked for form), None when
    it presents none, or b"" when the header is malformed: not `Bearer <token>`,
    or the field twice. Authorization wins over x-api-key."""
    f = key_field(raw_headers)
    return None if f is None else token_of(*f)


def well_formed(token: bytes) -> bool:
    return _TOKEN.fullmatch(token) is not None


# Accepted field values remembered per worker (KeyRing.identify), and a bound:
# a client can vary a good key's spelling ("bearer", spaces), never grow this.
SEEN_MAX = 256


class KeyRing:
    """The configured keys, found by the digest of what a request presents.

    A field value that was accepted once is remembered (value -> key, at most
    SEEN_MAX, per field kind), so a client's next requests skip the hash, the
    parse and the comparison: one dict lookup. Only values that matched a
    configured digest are remembered, never a wrong or malformed one; the ring
    lives in one worker's memory, is never written anywhere, and is built anew
    with the workers a HUP starts (a key removed from the file stops working
    there). Its lookup hashes the value with the process's secret SipHash key
    and compares bytes only on a full 64-bit hash match, so its timing says
    nothing about a value that is not already a valid key."""

    def __init__(self, specs: Iterable[KeySpec]) -> None:
        self.keys = [ApiKey(s) for s in specs]
        self.by_digest = {k.digest: k for k in self.keys}
        self.by_name = {k.name: k for k in self.keys}
        # raw field values accepted before, by field kind (index _AUTH, _API_KEY)
        self._seen: tuple[dict[bytes, ApiKey], ...] = ({}, {}, {})

    def identify(self, raw_headers: list[tuple[bytes, bytes]]) -> ApiKey | str:
        """The request's key, or why it has none: MISSING, MALFORMED or INVALID."""
        f = key_field(raw_headers)
        if f is None:
            return MISSING
        kind, value = f
        seen = self._seen[kind]
        key = seen.get(value)
        if key is not None:
            return key
        token = token_of(kind, value)
        if not token:  # malformed, or a field twice (kind 0)
            return MALFORMED
        d = hashlib.sha256(token).digest()
        key = self.by_digest.get(d)
        # The lookup hashes the digest with the process's secret SipHash key and
        # compares bytes only on a full 64-bit hash match; this comparison is the
        # one that decides, and it takes the same time wherever the digests differ.
        if key is None or not hmac.compare_digest(key.digest, d):
            # the form is checked only now: a good key costs no pattern match
            return INVALID if well_formed(token) else MALFORMED
        if len(seen) >= SEEN_MAX:
            seen.clear()
        seen[value] = key
        return key
