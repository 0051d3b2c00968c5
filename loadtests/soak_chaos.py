"""Chaos mode of loadtests/soak.py: keep-alive clients with no retries against a
real neurohttpd that is reloaded, SIGKILLed, SIGSTOPped and abused, counting
every request that did not get its complete, correct answer.

    python3 loadtests/soak.py --chaos                       # 10 minutes
    python3 loadtests/soak.py --chaos --duration 60 --png /tmp/chaos.png

Load (--load-procs processes, threads inside, so the controller's timing and
sampling do not share a GIL with them):
  - --clients keep-alive clients (a list: the run is cut into equal stages, one
    per level), each on one http.client connection reused for every request,
    with no retry of any kind: a request that fails is counted and the next one
    opens a new connection. The mix: GET /health, POST /v1/chat, streamed
    /v1/chat (NDJSON), /v1/chat/completions, streamed /v1/chat/completions (SSE).
    Every answer is checked whole: status 200, body parsed, the exact answer
    text, a stream ended by its final event.
  - --slow-readers clients that stream a long answer (a parrot model repeating
    a --slow-kb prompt) with a 4 KiB receive buffer, read at --slow-rate bytes/s.
  - --uploaders clients that POST a --upload-kb body in chunked encoding cut
    into 1-2 byte chunks, on a keep-alive connection; the parrot answers the
    prompt back, so the answer proves the body arrived whole.

Chaos (the controller): a SIGHUP to the master every --reload-every seconds
(random in the range) and bursts of --burst-size HUPs within 0.5 s every
--burst-every seconds; SIGKILL of a random worker every --kill-every seconds;
SIGSTOP of a random worker every --stop-every seconds, SIGCONT --stop-for
seconds later (less than worker_timeout).

Counting. A request is "ok" or "failed". A failed request is "killed in
flight" only if it failed on a connection the SIGKILLed worker held: before the
kill the worker is SIGSTOPped, its TCP connections are read from /proc (psutil)
and the client ports of those connections recorded; a failure counts as killed
if its connection has one of those ports, was opened before the kill and failed
after it. Every other failure is "lost" (target 0): no answer, a truncated one,
an error status or a wrong body alike.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import multiprocessing as mp
import os
import random
import resource
import signal
import socket
import sys
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
from soak_server import ROOT, SoakServer, git_commit

CONFIG = """
[server]
bind = ["127.0.0.1:{port}"]
workers = {workers}
graceful_timeout = 30
worker_timeout = 30

[log]
error_log = "{error_log}"

[models.echo]
provider = "echo"

[models.paced]
provider = "echo"
token_delay_ms = 5
response = "one two three four five six seven eight"

[models.parrot]
provider = "echo"
response = "{{prompt}}"
"""

CHAT_ANSWER = "Hello, AI world!"
PACED_ANSWER = "one two three four five six seven eight"
# keep-alive mix: (kind, weight)
MIX = (("health", 30), ("chat", 30), ("stream", 15), ("completions", 15),
       ("completions_stream", 10))
# The kind's request: method, path, body
REQUESTS: dict[str, tuple[str, str, bytes]] = {
    "health": ("GET", "/health", b""),
    "chat": ("POST", "/v1/chat", b'{"prompt":"soak"}'),
    "stream": ("POST", "/v1/chat", b'{"prompt":"soak","model":"paced","stream":true}'),
    "completions": ("POST", "/v1/chat/completions",
                    b'{"model":"echo","messages":[{"role":"user","content":"soak"}]}'),
    "completions_stream": ("POST", "/v1/chat/completions",
                           b'{"model":"paced","stream":true,'
                           b'"messages":[{"role":"user","content":"soak"}]}'),
}
SLOW_WAIT_S = 1.0   # requests slower than this are listed one by one
EXTRA_KINDS = ("slow_stream", "upload")   # long by design: kept out of the mix's latency
VOCAB = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray "
         "yankee zulu").split()


# ------------------------------------------------------------------ answers (pure)

def prompt_text(n_bytes: int, seed: int) -> str:
    """About n_bytes of space-separated words: cheap to tokenize, unlike one long run."""
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < n_bytes:
        w = rng.choice(VOCAB)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


def chunked(body: bytes, rng: random.Random) -> bytes:
    """`body` in chunked transfer coding, cut into chunks of 1 or 2 bytes."""
    parts = []
    i = 0
    while i < len(body):
        n = rng.choice((1, 2))
        piece = body[i:i + n]
        parts.append(b"%x\r\n%s\r\n" % (len(piece), piece))
        i += n
    parts.append(b"0\r\n\r\n")
    return b"".join(parts)


def ndjson_text(body: bytes) -> tuple[str, str]:
    """The text of an NDJSON stream, and "" or what is wrong with it: every line
    a {"token"} object but the last, {"done": true, "finish_reason": "stop"}."""
    lines = [ln for ln in body.split(b"\n") if ln.strip()]
    if not lines:
        return "", "empty stream"
    tokens = []
    for ln in lines[:-1]:
        obj = json.loads(ln)
        if not isinstance(obj, dict) or not isinstance(obj.get("token"), str):
            return "", f"not a token line: {ln[:80]!r}"
        tokens.append(obj["token"])
    last = json.loads(lines[-1])
    if not isinstance(last, dict) or last.get("done") is not True:
        return "", f"stream did not end with its done line: {lines[-1][:80]!r}"
    if last.get("finish_reason") != "stop":
        return "", f"stream ended with finish_reason {last.get('finish_reason')!r}"
    return "".join(tokens), ""


def sse_text(body: bytes) -> tuple[str, str]:
    """The text of an OpenAI SSE stream, and "" or what is wrong with it: chunks
    with delta.content, one with finish_reason "stop", then data: [DONE]."""
    datas = []
    for event in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        for ln in event.split(b"\n"):
            if ln.startswith(b"data:"):
                datas.append(ln[5:].strip())
    if not datas or datas[-1] != b"[DONE]":
        return "", "stream did not end with data: [DONE]"
    text = []
    finish = None
    for d in datas[:-1]:
        obj = json.loads(d)
        choice = obj["choices"][0] if obj.get("choices") else {}
        text.append(choice.get("delta", {}).get("content") or "")
        finish = choice.get("finish_reason") or finish
    if finish != "stop":
        return "", f"stream ended with finish_reason {finish!r}"
    return "".join(text), ""


def check_answer(kind: str, status: int, body: bytes, expect: str = "") -> str:
    """"" if this is the complete, right answer to a request of `kind`, else why not."""
    if status != 200:
        return f"status {status}"
    try:
        if kind == "health":
            ok = json.loads(body).get("status") == "ok"
            return "" if ok else "health not ok"
        if kind in ("chat", "upload"):
            doc = json.loads(body)
            want = expect or CHAT_ANSWER
            if doc.get("response") != want or "usage" not in doc:
                return "wrong chat answer"
            return ""
        if kind == "completions":
            doc = json.loads(body)
            if doc["choices"][0]["message"]["content"] != CHAT_ANSWER:
                return "wrong completion"
            return ""
        if kind in ("stream", "slow_stream"):
            text, problem = ndjson_text(body)
        elif kind == "completions_stream":
            text, problem = sse_text(body)
        else:
            return f"unknown kind {kind}"
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        return f"malformed body ({type(e).__name__})"
    if problem:
        return problem
    if text != (expect or PACED_ANSWER):
        return "stream text differs from the answer"
    return ""


# ------------------------------------------------------------------ clients (load processes)

class Conn(http.client.HTTPConnection):
    """An http.client connection that records its local port and when it was
    opened (to match it against a killed worker's connections), and can be
    given a small receive buffer (a slow reader)."""

    def __init__(self, port: int, timeout: float, rcvbuf: int = 0) -> None:
        super().__init__("127.0.0.1", port, timeout=timeout)
        self.rcvbuf = rcvbuf
        self.local_port = 0
        self.opened = 0.0
        self.answered = 0   # requests answered on it so far

    def connect(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        s.settimeout(self.timeout)
        self.local_port = 0
        self.opened = time.monotonic()
        try:
            s.connect((self.host, self.port))
        except BaseException:
            s.close()
            raise
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = s
        self.local_port = s.getsockname()[1]
        self.answered = 0


IO_ERRORS = (OSError, http.client.HTTPException, ValueError)


class Tally:
    """What one client thread saw; merged per load process at the end."""

    def __init__(self, t0: float, seconds: int) -> None:
        self.t0 = t0
        self.ok_per_s = [0] * seconds
        self.lat: dict[str, array[float]] = {}          # "stage/kind" -> seconds, ok ones
        self.failures: list[dict[str, Any]] = []
        self.slow: list[dict[str, Any]] = []            # any request over SLOW_WAIT_S
        self.longest: dict[str, Any] = {}
        self.longest_wait = -1.0
        self.connections = 0
        self.server_closed = 0                          # answers with Connection: close

    def _sec(self, t: float) -> int:
        return min(len(self.ok_per_s) - 1, max(0, int(t - self.t0)))

    def ok(self, stage: int, kind: str, t0: float, t1: float, conn: Conn, fresh: bool) -> None:
        self.ok_per_s[self._sec(t1)] += 1
        self.lat.setdefault(f"{stage}/{kind}", array("d")).append(t1 - t0)
        self._note_wait(stage, kind, t0, t1, conn, fresh, "", "ok", None)

    def fail(self, stage: int, kind: str, t0: float, t1: float, conn: Conn, fresh: bool,
             phase: str, reason: str) -> None:
        rec = self.record(stage, kind, t0, t1, conn, fresh, phase, reason)
        self.failures.append(rec)
        self._note_wait(stage, kind, t0, t1, conn, fresh, phase, reason, rec)

    def _note_wait(self, stage: int, kind: str, t0: float, t1: float, conn: Conn, fresh: bool,
                   phase: str, reason: str, rec: dict[str, Any] | None) -> None:
        """Keep the requests that waited over SLOW_WAIT_S, and the longest one of the
        mix (slow streams and uploads are long by design: they are not in it)."""
        wait = t1 - t0
        longest = kind not in EXTRA_KINDS and wait > self.longest_wait
        if wait <= SLOW_WAIT_S and not longest:
            return
        rec = rec or self.record(stage, kind, t0, t1, conn, fresh, phase, reason)
        if wait > SLOW_WAIT_S:
            self.slow.append(rec)
        if longest:
            self.longest, self.longest_wait = rec, wait

    def record(self, stage: int, kind: str, t0: float, t1: float, conn: Conn, fresh: bool,
               phase: str, reason: str) -> dict[str, Any]:
        return {"stage": stage, "kind": kind, "t0": t0, "t1": t1, "wait": t1 - t0,
                "port": conn.local_port, "opened": conn.opened, "fresh": fresh,
                "answered_before": conn.answered, "phase": phase, "reason": reason}


@dataclass
class LoadPlan:
    port: int
    t0: float                 # monotonic start of the run (CLOCK_MONOTONIC is system-wide)
    end: float
    levels: list[int]         # keep-alive clients per stage
    think: float
    timeout: float
    slow_readers: int
    slow_kb: int
    slow_rate: int
    uploaders: int
    upload_kb: int
    seed: int

    def stage(self, t: float) -> int:
        n = len(self.levels)
        return min(n - 1, max(0, int((t - self.t0) / (self.end - self.t0) * n)))


class Client:
    def __init__(self, plan: LoadPlan, tally: Tally, seed: int) -> None:
        self.plan = plan
        self.tally = tally
        self.rng = random.Random(seed)
        self.conn = Conn(plan.port, plan.timeout)

    def exchange(self, kind: str, send: Callable[[Conn], object],
                 expect: str = "") -> None:
        """One request on self.conn (opened if need be, never retried), checked whole."""
        conn = self.conn
        t0 = time.monotonic()
        stage = self.plan.stage(t0)
        fresh = conn.sock is None
        phase = "connect"
        try:
            if fresh:
                conn.connect()
                self.tally.connections += 1
            phase = "send"
            send(conn)
            phase = "head"
            resp = conn.getresponse()
            phase = "body"
            body = resp.read()
        except IO_ERRORS as e:
            conn.close()
            self.tally.fail(stage, kind, t0, time.monotonic(), conn, fresh, phase,
                            f"{'new' if fresh else 'reused'} connection, {phase}: "
                            f"{type(e).__name__}")
            return
        t1 = time.monotonic()
        if resp.will_close:
            self.tally.server_closed += 1
        problem = check_answer(kind, resp.status, body, expect)
        if problem:
            self.tally.fail(stage, kind, t0, t1, conn, fresh, "answer", problem)
        else:
            self.tally.ok(stage, kind, t0, t1, conn, fresh)
        conn.answered += 1

    def run(self) -> None:
        raise NotImplementedError


def send_request(kind: str, conn: Conn) -> None:
    method, path, body = REQUESTS[kind]
    headers = {"Content-Type": "application/json"} if body else {}
    conn.request(method, path, body or None, headers)


class KeepAliveClient(Client):
    """The mix on one reused connection, active in the stages whose level counts it."""

    def __init__(self, plan: LoadPlan, tally: Tally, index: int) -> None:
        super().__init__(plan, tally, plan.seed * 1000 + index)
        self.index = index
        self.kinds = [k for k, _ in MIX]
        self.weights = [w for _, w in MIX]

    def run(self) -> None:
        plan = self.plan
        while (now := time.monotonic()) < plan.end:
            if self.index >= plan.levels[plan.stage(now)]:
                self.conn.close()   # not in this stage: idle, connection closed by us
                time.sleep(min(0.2, plan.end - now))
                continue
            kind = self.rng.choices(self.kinds, self.weights)[0]
            self.exchange(kind, partial(send_request, kind))
            time.sleep(self.rng.uniform(0, 2 * plan.think))
        self.conn.close()


class SlowReader(Client):
    """A long NDJSON stream read slowly through a small receive buffer; after the
    end of the run the rest is read at full speed (nothing is abandoned)."""

    def __init__(self, plan: LoadPlan, tally: Tally, index: int) -> None:
        super().__init__(plan, tally, plan.seed * 7919 + index)
        self.conn = Conn(plan.port, plan.timeout, rcvbuf=4096)
        self.text = prompt_text(plan.slow_kb * 1024, index)
        self.body = json.dumps({"prompt": self.text, "model": "parrot",
                                "stream": True}).encode()
        self.durations: list[float] = []

    def _read_slowly(self, resp: http.client.HTTPResponse) -> bytes:
        buf = bytearray()
        started = time.monotonic()
        while piece := resp.read(1024):
            buf += piece
            now = time.monotonic()
            if now < self.plan.end:
                ahead = len(buf) / self.plan.slow_rate - (now - started)
                if ahead > 0:
                    time.sleep(min(ahead, self.plan.end - now))
        return bytes(buf)

    def run(self) -> None:
        while time.monotonic() < self.plan.end - 2:
            self.stream_once()
            time.sleep(1.0)

    def stream_once(self) -> None:
        conn = self.conn = Conn(self.plan.port, self.plan.timeout, rcvbuf=4096)
        t0 = time.monotonic()
        stage = self.plan.stage(t0)
        phase = "connect"
        try:
            conn.connect()
            self.tally.connections += 1
            phase = "send"
            conn.request("POST", "/v1/chat", self.body, {"Content-Type": "application/json"})
            phase = "head"
            resp = conn.getresponse()
            phase = "body"
            body = self._read_slowly(resp)
        except IO_ERRORS as e:
            self.tally.fail(stage, "slow_stream", t0, time.monotonic(), conn, True, phase,
                            f"slow reader, {phase}: {type(e).__name__}")
            return
        finally:
            conn.close()
        t1 = time.monotonic()
        problem = check_answer("slow_stream", resp.status, body, self.text)
        if problem:
            self.tally.fail(stage, "slow_stream", t0, t1, conn, True, "answer", problem)
        else:
            self.tally.ok(stage, "slow_stream", t0, t1, conn, True)


class TinyChunkUploader(Client):
    """A chunked body in 1-2 byte chunks, on a keep-alive connection; the parrot
    model answers the prompt back, so a right answer proves the body arrived whole."""

    def __init__(self, plan: LoadPlan, tally: Tally, index: int) -> None:
        super().__init__(plan, tally, plan.seed * 104729 + index)
        self.text = prompt_text(plan.upload_kb * 1024, 1000 + index)
        body = json.dumps({"prompt": self.text, "model": "parrot"}).encode()
        self.wire = chunked(body, self.rng)

    def _send(self, c: Conn) -> None:
        c.putrequest("POST", "/v1/chat", skip_accept_encoding=True)
        c.putheader("Content-Type", "application/json")
        c.putheader("Transfer-Encoding", "chunked")
        c.endheaders()
        c.send(self.wire)

    def run(self) -> None:
        while time.monotonic() < self.plan.end:
            self.exchange("upload", self._send, self.text)
            time.sleep(self.rng.uniform(0.5, 1.5))
        self.conn.close()


def load_process(plan: LoadPlan, ka_indices: list[int], extras: bool, out: str) -> None:
    """One load process: its share of the keep-alive clients (and, in the first
    one, the slow readers and uploaders) as threads; the merged tally to `out`."""
    seconds = int(plan.end - plan.t0) + 600
    clients: list[Client] = [KeepAliveClient(plan, Tally(plan.t0, seconds), i)
                             for i in ka_indices]
    if extras:
        clients += [SlowReader(plan, Tally(plan.t0, seconds), i)
                    for i in range(plan.slow_readers)]
        clients += [TinyChunkUploader(plan, Tally(plan.t0, seconds), i)
                    for i in range(plan.uploaders)]
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    time.sleep(max(0.0, plan.t0 - time.monotonic()))   # the run starts at t0 for all
    for t in threads:
        t.start()
    # Every socket operation is bounded by plan.timeout; the slow readers by their size.
    hard_end = plan.end + 4 * plan.timeout + 120
    for t in threads:
        t.join(max(0.0, hard_end - time.monotonic()))
    merged: dict[str, Any] = {"ok_per_s": [0] * seconds, "lat": {}, "failures": [],
                              "slow": [], "longest": {}, "connections": 0,
                              "server_closed": 0,
                              "unfinished_clients": sum(t.is_alive() for t in threads),
                              "cpu_s": sum(resource.getrusage(resource.RUSAGE_SELF)[:2])}
    for c in clients:
        tl = c.tally
        merged["ok_per_s"] = [a + b for a, b in zip(merged["ok_per_s"], tl.ok_per_s,
                                                     strict=True)]
        for k, v in tl.lat.items():
            merged["lat"].setdefault(k, []).extend(round(x, 6) for x in v)
        merged["failures"] += tl.failures
        merged["slow"] += tl.slow
        if tl.longest.get("wait", -1) > merged["longest"].get("wait", -1):
            merged["longest"] = tl.longest
        merged["connections"] += tl.connections
        merged["server_closed"] += tl.server_closed
    Path(out).write_text(json.dumps(merged))


# ------------------------------------------------------------------ chaos (controller)

@dataclass
class Kill:
    t_stop: float           # SIGSTOP, then its connections were read
    t_kill: float           # SIGKILL
    pid: int
    ports: set[int]         # client ports of the TCP connections it held


@dataclass
class Chaos:
    server: SoakServer
    rng: random.Random
    stop_for: tuple[float, float]
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (t, what, detail)
    kills: list[Kill] = field(default_factory=list)
    stops: list[tuple[float, float, int]] = field(default_factory=list)  # (from, to, pid)
    stopped: dict[int, tuple[float, float]] = field(default_factory=dict)  # pid -> (from, cont at)
    hups: int = 0
    bursts: int = 0

    def _candidates(self) -> list[int]:
        return [p for p in self.server.worker_pids() if p not in self.stopped]

    def hup(self, what: str = "hup") -> None:
        os.kill(self.server.pid, signal.SIGHUP)
        self.hups += 1
        self.events.append((time.monotonic(), what, ""))

    def burst(self, size: int) -> None:
        """`size` HUPs at random moments within 0.5 s."""
        t = time.monotonic()
        self.bursts += 1
        for at in sorted(self.rng.uniform(0, 0.5) for _ in range(size)):
            time.sleep(max(0.0, t + at - time.monotonic()))
            self.hup("burst")

    def kill(self) -> None:
        """SIGKILL a random worker, its client connections noted first. It is
        SIGSTOPped while /proc is read, so it cannot accept one more meanwhile."""
        pids = self._candidates()
        if not pids:
            return
        pid = self.rng.choice(pids)
        t_stop = time.monotonic()
        try:
            os.kill(pid, signal.SIGSTOP)
            proc = psutil.Process(pid)
            deadline = time.monotonic() + 1.0
            while proc.status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
                time.sleep(0.002)
            conns = proc.net_connections(kind="tcp")
            ports = {c.raddr.port for c in conns
                     if c.raddr and c.laddr.port == self.server.port}
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, psutil.NoSuchProcess):
            return  # it exited (drained) meanwhile: nothing killed
        t_kill = time.monotonic()
        self.kills.append(Kill(t_stop, t_kill, pid, ports))
        self.events.append((t_kill, "kill", f"pid {pid}, {len(ports)} connections"))

    def stop(self) -> None:
        pids = self._candidates()
        if not pids:
            return
        pid = self.rng.choice(pids)
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return
        now = time.monotonic()
        self.stopped[pid] = (now, now + self.rng.uniform(*self.stop_for))
        self.events.append((now, "stop", f"pid {pid}"))

    def cont(self, now: float, every: bool = False) -> None:
        for pid, (since, until) in list(self.stopped.items()):
            if every or now >= until:
                del self.stopped[pid]
                try:
                    os.kill(pid, signal.SIGCONT)
                    detail = f"pid {pid}"
                except ProcessLookupError:
                    detail = f"pid {pid} was gone before SIGCONT"
                t = time.monotonic()
                self.stops.append((since, t, pid))
                self.events.append((t, "cont", detail))


class Every:
    """A recurring chaos event at random intervals within (lo, hi) seconds;
    the first one within the first interval."""

    def __init__(self, span: tuple[float, float], rng: random.Random, now: float) -> None:
        self.span = span
        self.rng = rng
        self.next = now + rng.uniform(*span) if span[1] > 0 else math.inf

    def due(self, now: float) -> bool:
        if now < self.next:
            return False
        self.next = now + self.rng.uniform(*self.span)
        return True


# ------------------------------------------------------------------ report

def percentile(sorted_xs: list[float], q: float) -> float:
    if not sorted_xs:
        return 0.0
    return sorted_xs[min(len(sorted_xs) - 1, max(0, math.ceil(q * len(sorted_xs)) - 1))]


def lat_figures(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"n": len(s), "p50_ms": round(percentile(s, 0.50) * 1000, 2),
            "p99_ms": round(percentile(s, 0.99) * 1000, 2),
            "max_ms": round(s[-1] * 1000, 2) if s else 0.0}


def classify(failures: list[dict[str, Any]], kills: list[Kill]) -> None:
    """Mark each failure "killed" (in flight on a SIGKILLed worker's connection, or
    sent on one after the kill before the client saw it closed) or "lost"."""
    for f in failures:
        f["class"] = "lost"
        if f["phase"] == "answer":
            continue  # a complete answer, wrong: never excused
        for k in kills:
            if f["port"] in k.ports and f["opened"] <= k.t_stop and f["t1"] >= k.t_stop:
                f["class"] = "killed in flight" if f["t0"] <= k.t_kill \
                    else "killed: sent on its dead connection"
                f["killed_by"] = k.pid
                break


def rss_figures(samples: list[tuple[float, dict[int, float]]], master_pid: int) -> dict[str, Any]:
    per: dict[int, list[float]] = {}
    for _, sample in samples:
        for pid, mb in sample.items():
            per.setdefault(pid, []).append(mb)
    master = per.pop(master_pid, [0.0])
    workers = [{"pid": pid, "samples": len(v), "first": round(v[0], 1),
                "min": round(min(v), 1), "max": round(max(v), 1), "last": round(v[-1], 1)}
               for pid, v in per.items()]
    allw = [mb for v in per.values() for mb in v]
    growth = max(workers, key=lambda w: w["max"] - w["first"], default=None)
    return {
        "workers_min_mb": round(min(allw), 1) if allw else 0.0,
        "workers_max_mb": round(max(allw), 1) if allw else 0.0,
        "worker_processes": len(workers),
        "largest_growth_of_one_worker": growth and {
            "pid": growth["pid"], "from_mb": growth["first"], "to_mb": growth["max"]},
        "master_mb": {"first": round(master[0], 1), "last": round(master[-1], 1),
                      "min": round(min(master), 1), "max": round(max(master), 1)},
        "per_worker": workers,
    }


def summarize(args: argparse.Namespace, plan: LoadPlan, load: dict[str, Any], chaos: Chaos,
              rss: list[tuple[float, dict[int, float]]], server: SoakServer,
              stats: dict[str, Any] | None, exit_code: int, shm_left: bool,
              master_died_at: float) -> dict[str, Any]:
    t0 = plan.t0
    failures = load["failures"]
    classify(failures, chaos.kills)
    lost = [f for f in failures if f["class"] == "lost"]
    killed = [f for f in failures if f["class"] != "lost"]
    ok = sum(load["ok_per_s"])
    lat_all: list[float] = []
    by_kind: dict[str, list[float]] = {}
    by_stage: dict[int, list[float]] = {}
    for key, xs in load["lat"].items():
        stage_s, kind = key.split("/")
        by_kind.setdefault(kind, []).extend(xs)
        if kind not in EXTRA_KINDS:
            lat_all.extend(xs)
            by_stage.setdefault(int(stage_s), []).extend(xs)
    hup_times = sorted(t for t, what, _ in chaos.events if what in ("hup", "burst"))

    def after_hup(t: float) -> bool:
        return any(0 <= t - h <= 1.0 for h in hup_times)

    def after_kill(t: float) -> bool:
        return any(0 <= t - k.t_kill <= 0.5 for k in chaos.kills)

    stages = []
    n = len(plan.levels)
    span = (plan.end - plan.t0) / n
    for i, level in enumerate(plan.levels):
        lo, hi = t0 + i * span, t0 + (i + 1) * span
        hups = sum(1 for h in hup_times if lo <= h < hi)
        st_lost = sum(1 for f in lost if f["stage"] == i)
        st_ok = sum(len(xs) for k, xs in load["lat"].items() if int(k.split("/")[0]) == i)
        stages.append({
            "keepalive_clients": level, "from_s": round(i * span), "to_s": round((i + 1) * span),
            "requests": st_ok + sum(1 for f in failures if f["stage"] == i), "ok": st_ok,
            "lost": st_lost, "killed_in_flight": sum(1 for f in killed if f["stage"] == i),
            "hups": hups, "lost_per_hup": round(st_lost / hups, 1) if hups else None,
            "latency": lat_figures(by_stage.get(i, [])),
        })
    longest = dict(load["longest"])
    if longest:
        longest = {"kind": longest["kind"], "wait_s": round(longest["wait"], 3),
                   "at_s": round(longest["t0"] - t0, 1), "new_connection": longest["fresh"],
                   "outcome": longest["reason"]}
    slow_fresh = [s for s in load["slow"] if s["fresh"] and s["kind"] not in
                  EXTRA_KINDS]
    master = (stats or {}).get("master", {})
    return {
        "mode": "chaos", "checkout": str(ROOT), "commit": git_commit(),
        "duration_s": args.duration, "workers": args.workers,
        "keepalive_clients": plan.levels, "load_processes": args.load_procs,
        "slow_readers": plan.slow_readers, "uploaders": plan.uploaders,
        "requests": ok + len(failures), "ok": ok,
        "lost": len(lost),
        "killed_in_flight": len(killed),
        "killed_detail": dict(Counter(f["class"] for f in killed)),
        "lost_by_reason": dict(Counter(f["reason"] for f in lost).most_common()),
        "lost_by_kind": dict(Counter(f["kind"] for f in lost).most_common()),
        "lost_within_1s_after_a_hup": sum(1 for f in lost if after_hup(f["t1"])),
        "lost_per_hup": round(len(lost) / chaos.hups, 1) if chaos.hups else None,
        "lost_examples": [{"at_s": round(f["t0"] - t0, 3), "kind": f["kind"],
                           "reason": f["reason"], "wait_s": round(f["wait"], 3),
                           "answered_before_on_conn": f["answered_before"]}
                          for f in lost[:20]],
        "req_per_s": round((ok + len(failures)) / args.duration, 1),
        "latency": lat_figures(lat_all),
        # the server's own figure (request parsed to response written), for comparison:
        # the clients' figures include their own scheduling (threads share a GIL)
        "server_latency_ms": (stats or {}).get("latency_ms"),
        "client_cpu_s": round(load["cpu_s"], 1),
        "latency_by_kind": {k: lat_figures(v) for k, v in sorted(by_kind.items())},
        "longest_wait": longest,
        "waited_over_1s": sum(1 for s in load["slow"] if s["kind"] not in
                              EXTRA_KINDS),
        "waited_over_1s_on_a_new_connection": len(slow_fresh),
        "stages": stages,
        "connections_opened": load["connections"],
        "answers_with_connection_close": load["server_closed"],
        # a check on the attribution: lost requests that failed within 0.5 s after a
        # kill (their connection was not one of the killed worker's), and of those the
        # ones no HUP explains (none in the second before)
        "lost_within_0.5s_after_a_kill": sum(1 for f in lost if after_kill(f["t1"])),
        "lost_within_0.5s_after_a_kill_no_hup": sum(
            1 for f in lost if after_kill(f["t1"]) and not after_hup(f["t1"])),
        "kills": [{"at_s": round(k.t_kill - t0, 3), "pid": k.pid,
                   "stopped_for_ms": round((k.t_kill - k.t_stop) * 1000, 1),
                   "requests_killed": sum(1 for f in killed if f["killed_by"] == k.pid),
                   "client_ports": sorted(k.ports)}
                  for k in chaos.kills],
        "events": [(round(t - t0, 3), what, detail) for t, what, detail in chaos.events],
        "slowest": [{"at_s": round(r["t0"] - t0, 3), "wait_s": round(r["wait"], 3),
                     "kind": r["kind"], "new_connection": r["fresh"], "port": r["port"],
                     "outcome": r["reason"]}
                    for r in sorted(load["slow"], key=lambda r: -r["wait"])
                    if r["kind"] not in EXTRA_KINDS][:20],
        "chaos": {"hups": chaos.hups, "bursts": chaos.bursts, "kills": len(chaos.kills),
                  "stops": len(chaos.stops),
                  "stop_s": [round(b - a, 1) for a, b, _ in chaos.stops]},
        "server": {"reloads": master.get("reloads"), "restarts": master.get("restarts"),
                   "generation": master.get("generation"),
                   "requests": (stats or {}).get("requests"),
                   "responses": (stats or {}).get("responses"),
                   "exit_code": exit_code, "shm_left": shm_left,
                   "master_died_at_s": round(master_died_at - t0, 1) if master_died_at else None,
                   "log_warnings_errors": server.log_problems(),
                   "error_log": str(server.error_log)},
        "rss": rss_figures(rss, server.pid),
        "unfinished_clients": load["unfinished_clients"],
    }


def markdown(s: dict[str, Any]) -> str:
    r = s["rss"]
    lat = s["latency"]
    lw = s["longest_wait"] or {}
    rows = [
        ("checkout / commit", f"{s['checkout']} / {s['commit']}"),
        ("duration, workers, keep-alive clients",
         f"{s['duration_s']:g} s, {s['workers']}, {' then '.join(map(str, s['keepalive_clients']))}"
         f" (+{s['slow_readers']} slow reader, {s['uploaders']} tiny-chunk uploader)"),
        ("requests (req/s)", f"{s['requests']:,} ({s['req_per_s']:g}/s)"),
        ("ok", f"{s['ok']:,}"),
        ("**lost** (target 0)", f"**{s['lost']:,}** ({s['lost_per_hup']} per HUP; "
                                f"{s['lost_within_1s_after_a_hup']} within 1 s after a HUP)"),
        ("killed in flight (on a SIGKILLed worker's connections)",
         f"{s['killed_in_flight']} ("
         + ", ".join(f"{n} {what}" for what, n in s["killed_detail"].items()) + ")"),
        ("lost within 0.5 s after a kill (of which no HUP in the second before)",
         f"{s['lost_within_0.5s_after_a_kill']} ({s['lost_within_0.5s_after_a_kill_no_hup']})"),
        ("requests / responses the server counted", f"{s['server']['requests']} / "
                                                     f"{s['server']['responses']}"),
        ("HUPs (bursts) / kill -9 / SIGSTOP", f"{s['chaos']['hups']} ({s['chaos']['bursts']}) / "
                                              f"{s['chaos']['kills']} / {s['chaos']['stops']}"),
        ("reloads reported by the server", f"{s['server']['reloads']}"),
        ("latency p50 / p99 / max (clients' clocks)",
         f"{lat['p50_ms']} / {lat['p99_ms']} / {lat['max_ms']} ms"),
        ("server's latency p50 / p99 / max (/stats)",
         " / ".join(str((s["server_latency_ms"] or {}).get(k)) for k in ("p50", "p99", "max"))
         + " ms"),
        ("load generator CPU", f"{s['client_cpu_s']} s ({s['client_cpu_s'] / s['duration_s']:.0%}"
                               " of one core)"),
        ("longest wait", f"{lw.get('wait_s')} s ({lw.get('kind')} at {lw.get('at_s')} s, "
                         + (f"{'new' if lw.get('new_connection') else 'reused'} connection, ok"
                            if lw.get("outcome") == "ok" else str(lw.get("outcome"))) + ")"),
        ("requests that waited > 1 s (on a new connection)",
         f"{s['waited_over_1s']} ({s['waited_over_1s_on_a_new_connection']})"),
        ("worker RSS min–max (processes)", f"{r['workers_min_mb']}–{r['workers_max_mb']} MiB "
                                           f"({r['worker_processes']})"),
        ("largest growth of one worker", str(r["largest_growth_of_one_worker"])),
        ("master RSS first → last (max)", f"{r['master_mb']['first']} → {r['master_mb']['last']} "
                                          f"({r['master_mb']['max']}) MiB"),
        ("server exit after TERM / shared memory left",
         f"{s['server']['exit_code']} / {'yes' if s['server']['shm_left'] else 'none'}"),
    ]
    out = ["| figure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    out += ["", "| stage | clients | requests | lost | killed | HUPs | lost/HUP | p50 / p99 / max ms |",
            "|---|---|---|---|---|---|---|---|"]
    for i, st in enumerate(s["stages"]):
        la = st["latency"]
        out.append(f"| {i + 1} ({st['from_s']}–{st['to_s']} s) | {st['keepalive_clients']} | "
                   f"{st['requests']:,} | {st['lost']} | {st['killed_in_flight']} | {st['hups']} | "
                   f"{st['lost_per_hup']} | {la['p50_ms']} / {la['p99_ms']} / {la['max_ms']} |")
    if s["lost_by_reason"]:
        out += ["", "Lost, by reason:", ""]
        out += [f"- {n} × {reason}" for reason, n in s["lost_by_reason"].items()]
    if s["server"]["log_warnings_errors"]:
        out += ["", "Server log warnings and errors:", ""]
        out += [f"- {n} × {msg}" for msg, n in list(s["server"]["log_warnings_errors"].items())[:10]]
    return "\n".join(out) + "\n"


def plot(path: str, s: dict[str, Any], plan: LoadPlan, load: dict[str, Any], chaos: Chaos,
         rss: list[tuple[float, dict[int, float]]], master_pid: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = plan.t0
    dur = plan.end - t0
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(12, 9), sharex=True,
                                        gridspec_kw={"height_ratios": [2, 1.3, 2]})
    secs = int(math.ceil(dur)) + 1
    ok = load["ok_per_s"][:secs]
    ax1.plot([i + 0.5 for i in range(len(ok))], ok, color="tab:green", lw=1,
             label="ok requests/s")
    ax1.set_ylabel("requests/s")
    ax1.set_ylim(bottom=0)
    ax1.set_title(f"neurohttpd chaos soak: {s['duration_s']:g} s, {s['requests']:,} requests, "
                  f"{s['lost']} lost, {s['killed_in_flight']} killed in flight; "
                  f"{s['chaos']['hups']} HUPs, {s['chaos']['kills']} kill -9, "
                  f"{s['chaos']['stops']} SIGSTOP", fontsize=10)
    lost = [0] * secs
    killed = [0] * secs
    for f in load["failures"]:
        i = min(secs - 1, max(0, int(f["t1"] - t0)))
        (lost if f["class"] == "lost" else killed)[i] += 1
    xs = list(range(secs))
    ax2.bar(xs, lost, width=1.0, align="edge", color="tab:red", label="lost (target 0)")
    ax2.bar(xs, killed, width=1.0, align="edge", bottom=lost, color="tab:orange",
            label="killed in flight")
    ax2.set_ylabel("failed requests/s")
    series: dict[int, list[tuple[float, float]]] = {}
    for t, sample in rss:
        for pid, mb in sample.items():
            series.setdefault(pid, []).append((t - t0, mb))
    for pid, pts in series.items():
        px, py = zip(*pts, strict=True)
        if pid == master_pid:
            ax3.plot(px, py, color="black", lw=2, label="master")
        else:
            ax3.plot(px, py, color="tab:blue", lw=0.8, alpha=0.6)
    ax3.plot([], [], color="tab:blue", label="workers (one line per process)")
    ax3.set_ylabel("RSS (MiB)")
    ax3.set_ylim(bottom=0)
    ax3.set_xlabel("seconds")
    for ax in (ax1, ax2, ax3):
        for t, what, _ in chaos.events:
            if what == "hup":
                ax.axvline(t - t0, color="tab:purple", lw=0.5, alpha=0.35)
            elif what == "burst":
                ax.axvline(t - t0, color="tab:purple", lw=1.5, alpha=0.8)
            elif what == "kill":
                ax.axvline(t - t0, color="tab:red", lw=1.2, ls="--")
        for a, b, _ in chaos.stops:
            ax.axvspan(a - t0, b - t0, color="tab:orange", alpha=0.2, lw=0)
        ax.set_xlim(0, dur)
    ax2.plot([], [], color="tab:purple", lw=0.5, label="HUP")
    ax2.plot([], [], color="tab:purple", lw=1.5, label="HUP burst")
    ax2.plot([], [], color="tab:red", lw=1.2, ls="--", label="kill -9 of a worker")
    ax2.fill_between([], [], color="tab:orange", alpha=0.2, label="a worker SIGSTOPped")
    for ax in (ax1, ax2, ax3):
        ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------ the run

def run(args: argparse.Namespace) -> int:
    levels = [int(x) for x in str(args.clients).split(",")]
    server = SoakServer(CONFIG, args.workers)
    server.start()
    print(f"server: master pid {server.pid} on 127.0.0.1:{server.port}, checkout {ROOT}, "
          f"log {server.error_log}", file=sys.stderr)
    t0 = time.monotonic() + 1.0   # the load processes start at t0
    plan = LoadPlan(port=server.port, t0=t0, end=t0 + args.duration, levels=levels,
                    think=args.think, timeout=args.timeout, slow_readers=args.slow_readers,
                    slow_kb=args.slow_kb, slow_rate=args.slow_rate, uploaders=args.uploaders,
                    upload_kb=args.upload_kb, seed=args.seed)
    rng = random.Random(args.seed)
    chaos = Chaos(server, rng, args.stop_for)
    ctx = mp.get_context("fork")
    outs = [str(server.tmp / f"load-{i}.json") for i in range(args.load_procs)]
    procs = [ctx.Process(target=load_process,
                         args=(plan, list(range(i, max(levels), args.load_procs)), i == 0,
                               outs[i]), daemon=True)
             for i in range(args.load_procs)]
    rss: list[tuple[float, dict[int, float]]] = []
    master_died_at = 0.0
    stats: dict[str, Any] | None = None
    exit_code, shm_left = -1, False
    try:
        for p in procs:
            p.start()
        while time.monotonic() < t0:
            time.sleep(0.01)
        now = time.monotonic()
        hup, burst = Every(args.reload_every, rng, now), Every(args.burst_every, rng, now)
        kill, stop = Every(args.kill_every, rng, now), Every(args.stop_every, rng, now)
        next_sample = next_print = now
        while (now := time.monotonic()) < plan.end:
            if now >= next_sample:
                pids = server.worker_pids()
                rss.append((now, server.rss_mb([server.pid] + pids)))
                next_sample += 0.5
            if not server.alive():
                if not master_died_at:
                    master_died_at = now
                    print(f"the master exited ({server.proc and server.proc.returncode}) "
                          f"at {now - t0:.1f} s", file=sys.stderr)
                time.sleep(0.05)
                continue
            chaos.cont(now)
            if hup.due(now):
                chaos.hup()
            if burst.due(now):
                chaos.burst(args.burst_size)
            if kill.due(now):
                chaos.kill()
            if stop.due(now) and now + args.stop_for[1] + 1 < plan.end:
                chaos.stop()   # (none whose SIGCONT would fall after the end)
            if now >= next_print:
                print(f"{now - t0:5.0f} s: {chaos.hups} HUPs, {len(chaos.kills)} kills, "
                      f"{len(chaos.stops) + len(chaos.stopped)} stops, "
                      f"{len(rss[-1][1]) - 1 if rss else 0} workers", file=sys.stderr)
                next_print += 10.0
            time.sleep(0.01)
        chaos.cont(time.monotonic(), every=True)
        while any(p.is_alive() for p in procs):
            p = next(p for p in procs if p.is_alive())
            p.join(1.0)
            if time.monotonic() - plan.end > 4 * args.timeout + 150:
                break
        stats = server.get("/stats")
    finally:
        chaos.cont(time.monotonic(), every=True)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        exit_code, shm_left = server.stop()
    loads = [json.loads(Path(o).read_text()) for o in outs if os.path.exists(o)]
    if len(loads) != len(outs):
        print("a load process left no result", file=sys.stderr)
        return 2
    load: dict[str, Any] = {"ok_per_s": [sum(x) for x in zip(*(ld["ok_per_s"] for ld in loads),
                                                                strict=True)],
                            "lat": {}, "failures": [], "slow": [], "longest": {},
                            "connections": 0, "server_closed": 0, "unfinished_clients": 0,
                            "cpu_s": 0.0}
    for ld in loads:
        for k, v in ld["lat"].items():
            load["lat"].setdefault(k, []).extend(v)
        for key in ("failures", "slow"):
            load[key] += ld[key]
        for key in ("connections", "server_closed", "unfinished_clients", "cpu_s"):
            load[key] += ld[key]
        if ld["longest"].get("wait", -1) > load["longest"].get("wait", -1):
            load["longest"] = ld["longest"]
    load["failures"].sort(key=lambda f: f["t1"])
    summary = summarize(args, plan, load, chaos, rss, server, stats, exit_code, shm_left,
                        master_died_at)
    md = markdown(summary)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    if args.out_md:
        Path(args.out_md).write_text(md)
    if args.png:
        plot(args.png, summary, plan, load, chaos, rss, server.pid)
        print(f"plot written to {args.png}")
    good = (summary["lost"] == 0 and exit_code == 0 and not shm_left
            and not summary["unfinished_clients"])
    return 0 if good else 1
