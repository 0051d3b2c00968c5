"""The Redis backend of the shared state (`[state] backend = "redis"`): the
same operations as the shared-memory table (store.py, keylimits.py), each one
Lua script run atomically by Redis on one key, so several servers sharing one
Redis enforce one limit exactly (no read-then-write between them).

Clock: the scripts read Redis's own clock (`TIME`) unless the caller passes
`now` (tests do, to step across a minute or a day). One clock for every server,
so machines whose clocks differ still agree on every bucket. Redis 5+ replicates
a script's effects, not the script, so TIME in a writing script is allowed.

Each call is one round trip (EVALSHA; redis-py's Script falls back to EVAL once
when the server does not know the script yet). Token charges made in one turn
of the event loop go out together in one pipeline (`ChargeBatcher`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.exceptions import NoScriptError

from .keylimits import DAILY, REQUESTS, TOKENS, KeyLimits, KeyVerdict
from .store import Admission

PREFIX = "neurohttp:"

# Times in µs as Lua numbers (doubles: exact below 2^53, i.e. until the year 2255).
_NOW = """
local now = tonumber(ARGV[1])
if now == 0 then
  local tm = redis.call('TIME')
  now = tonumber(tm[1]) * 1000000 + tonumber(tm[2])
end
"""

# key_admit: table.py KeyTable.key_admit transcribed. KEYS[1] a hash: r (request TAT),
# t (token TAT), de (the day's end), dc (the day's count).
# ARGV: now, rpm, rpm_step, tpm, tpm_step, daily, charge
KEY_ADMIT = _NOW + """
local rpm, rs = tonumber(ARGV[2]), tonumber(ARGV[3])
local tpm, ts = tonumber(ARGV[4]), tonumber(ARGV[5])
local dl, charge = tonumber(ARGV[6]), ARGV[7] == '1'
local v = redis.call('HMGET', KEYS[1], 'r', 't', 'de', 'dc')
local rtat, ttat = tonumber(v[1]) or 0, tonumber(v[2]) or 0
local dend, dcount = tonumber(v[3]) or 0, tonumber(v[4]) or 0
if rtat < now then rtat = now end
if ttat < now then ttat = now end
if dend <= now then
  dend = now - (now % 86400000000) + 86400000000
  dcount = 0
end
local refused, wait = 0, 0
local new_r = rtat
if rs > 0 then
  new_r = rtat + rs
  local at = new_r - rpm * rs
  if at > now then refused, wait = 1, at - now end
end
if ts > 0 then
  local at = ttat + ts - tpm * ts
  if at > now then
    if refused == 0 then refused = 2 end
    if at - now > wait then wait = at - now end
  end
end
if dl > 0 and dcount >= dl then
  if refused == 0 then refused = 3 end
  if dend - now > wait then wait = dend - now end
end
if refused ~= 0 or not charge then new_r = rtat end
if refused == 0 and charge and rs > 0 then
  redis.call('HSET', KEYS[1], 'r', string.format('%.0f', new_r))
  -- kept while it says more than a fresh key would: never shortened
  local keep = math.max(new_r, ttat) - now
  if dcount > 0 and dend - now > keep then keep = dend - now end
  local ms = math.ceil(keep / 1000) + 1000
  if redis.call('PTTL', KEYS[1]) < ms then redis.call('PEXPIRE', KEYS[1], ms) end
end
local rrem, trem = 0, 0
if rs > 0 then rrem = math.floor((now + rpm * rs - new_r) / rs) end
if ts > 0 then trem = math.max(0, math.floor((now + tpm * ts - ttat) / ts)) end
return {refused, string.format('%.0f', wait), rrem, string.format('%.0f', new_r - now),
        trem, string.format('%.0f', ttat - now), math.max(0, dl - dcount),
        string.format('%.0f', dend - now)}
"""

# key_charge: tokens into the token bucket (debt allowed) and the day.
# ARGV: now, tokens, tpm_step, daily
KEY_CHARGE = _NOW + """
local n, ts, dl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local v = redis.call('HMGET', KEYS[1], 't', 'de', 'dc')
local ttat, dend, dcount = tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0
local keep = 0
if ts > 0 then
  if ttat < now then ttat = now end
  ttat = ttat + n * ts
  redis.call('HSET', KEYS[1], 't', string.format('%.0f', ttat))
  keep = ttat - now
end
if dl > 0 then
  if dend <= now then
    dend = now - (now % 86400000000) + 86400000000
    dcount = 0
  end
  redis.call('HSET', KEYS[1], 'de', string.format('%.0f', dend), 'dc', dcount + n)
  if dend - now > keep then keep = dend - now end
end
if ttat - now > keep then keep = ttat - now end
local ms = math.ceil(keep / 1000) + 1000
if redis.call('PTTL', KEYS[1]) < ms then redis.call('PEXPIRE', KEYS[1], ms) end
return 1
"""

# admit / charge (store.Store): GCRA on one key holding its TAT.
# ARGV: now, cost, step (µs), burst, debt
GCRA = _NOW + """
local cost, step, burst, debt = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5] == '1'
local tat = tonumber(redis.call('GET', KEYS[1])) or 0
if tat < now then tat = now end
local new = tat + cost * step
local allow_at = new - burst * step
if allow_at > now and not debt then
  return {0, string.format('%.0f', allow_at - now),
          math.max(0, math.floor((now + burst * step - tat) / step)), string.format('%.0f', tat - now)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 1000)
if allow_at <= now then
  return {1, '0', math.floor((now + burst * step - new) / step), string.format('%.0f', new - now)}
end
return {0, string.format('%.0f', allow_at - now), 0, string.format('%.0f', new - now)}
"""

# quota (store.Store): a counter per window of window_s seconds since the epoch.
# ARGV: now, cost, limit, window (µs), force
QUOTA = _NOW + """
local cost, limit, span, force = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5] == '1'
local v = redis.call('HMGET', KEYS[1], 'end', 'n')
local wend, count = tonumber(v[1]) or 0, tonumber(v[2]) or 0
if wend <= now then
  wend = now - (now % span) + span
  count = 0
end
if count + cost > limit and not force then
  return {0, string.format('%.0f', wend - now), math.max(0, limit - count), string.format('%.0f', wend - now)}
end
count = count + cost
redis.call('HSET', KEYS[1], 'end', string.format('%.0f', wend), 'n', count)
redis.call('PEXPIRE', KEYS[1], math.ceil((wend - now) / 1000) + 1000)
if count <= limit then
  return {1, '0', limit - count, string.format('%.0f', wend - now)}
end
return {0, string.format('%.0f', wend - now), 0, string.format('%.0f', wend - now)}
"""

_REFUSED = ("", REQUESTS, TOKENS, DAILY)
_INF = float("inf")


def _now_arg(now: float | None) -> int:
    return 0 if now is None else int(now * 1_000_000)


def _admission(r: Sequence[Any], never: bool) -> Admission:
    allowed = int(r[0]) == 1
    return Admission(allowed, _INF if never and not allowed else int(r[1]) / 1e6,
                     int(r[2]), int(r[3]) / 1e6)


class RedisStore:
    """The Store operations and the batched key operations over one
    `redis.asyncio.Redis` client, every one a coroutine (one round trip)."""

    def __init__(self, client: Any, prefix: str = PREFIX) -> None:
        self.r = client
        self.prefix = prefix
        self._key_admit = client.register_script(KEY_ADMIT)
        self._key_charge = client.register_script(KEY_CHARGE)
        self._gcra = client.register_script(GCRA)
        self._quota = client.register_script(QUOTA)

    # ------------------------------------------------------------ API keys
    async def key_admit(self, k: KeyLimits, now: float | None = None,
                        charge: bool = True) -> KeyVerdict:
        # EVALSHA through execute_command: Script.__call__ costs ~15 % more CPU
        # per call (measured), and this is the one call on the request path
        args = (self.prefix + "q:" + k.name, _now_arg(now), k.rpm, k.rpm_step, k.tpm,
                k.tpm_step, k.daily, 1 if charge else 0)
        try:
            r = await self.r.execute_command("EVALSHA", self._key_admit.sha, 1, *args)
        except NoScriptError:  # a new or flushed Redis: load it once, run it
            r = await self.r.execute_command("EVAL", KEY_ADMIT, 1, *args)
        refused = _REFUSED[int(r[0])]
        return KeyVerdict(not refused, refused, int(r[1]) / 1e6, int(r[2]), int(r[3]) / 1e6,
                          int(r[4]), int(r[5]) / 1e6, int(r[6]), int(r[7]) / 1e6)

    def key_charge_args(self, k: KeyLimits, tokens: int,
                        now: float | None = None) -> tuple[list[str], list[int]]:
        return [self.prefix + "q:" + k.name], [_now_arg(now), tokens, k.tpm_step, k.daily]

    async def key_charge(self, k: KeyLimits, tokens: int, now: float | None = None) -> None:
        keys, args = self.key_charge_args(k, tokens, now)
        await self._key_charge(keys=keys, args=args)

    async def key_charge_many(self, charges: list[tuple[KeyLimits, int]],
                              now: float | None = None) -> None:
        """Several charges in one pipeline: one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for k, tokens in charges:
            keys, args = self.key_charge_args(k, tokens, now)
            await self._key_charge(keys=keys, args=args, client=pipe)
        await pipe.execute()

    # ------------------------------------------------------------ store.Store, async
    async def admit(self, key: str, cost: int, rate: float, burst: int,
                    now: float | None = None, debt: bool = False) -> Admission:
        step = round(1_000_000 / rate) or 1
        r = await self._gcra(keys=[self.prefix + key],
                             args=[_now_arg(now), cost, step, burst, 1 if debt else 0])
        return _admission(r, cost > burst)

    async def charge(self, key: str, cost: int, rate: float, burst: int,
                     now: float | None = None) -> Admission:
        return await self.admit(key, cost, rate, burst, now, debt=True)

    async def quota(self, key: str, cost: int, limit: int, window_s: int,
                    now: float | None = None, force: bool = False) -> Admission:
        r = await self._quota(keys=[self.prefix + key],
                              args=[_now_arg(now), cost, limit, window_s * 1_000_000,
                                    1 if force else 0])
        return _admission(r, cost > limit)

    async def add(self, key: str, n: int = 1) -> int:
        return int(await self.r.incrby(self.prefix + key, n))

    async def get(self, key: str) -> int:
        v = await self.r.get(self.prefix + key)
        return int(v) if v is not None else 0

    async def set(self, key: str, value: int) -> int:
        """Set an exact counter; returns the value before (SET ... GET)."""
        v = await self.r.set(self.prefix + key, value, get=True)
        return int(v) if v is not None else 0


def connect(url: str, timeout_s: float) -> Any:
    """A redis.asyncio client for `url` whose every wait is bounded by
    `timeout_s` and which never retries on its own (the caller decides: fail
    open or closed), with hiredis's parser when it is installed."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return aioredis.Redis.from_url(url, socket_timeout=timeout_s,
                                   socket_connect_timeout=timeout_s,
                                   retry=Retry(NoBackoff(), 0), retry_on_timeout=False,
                                   health_check_interval=0)

