"""The gateway benchmark (issue 11): one OpenAI-compatible upstream called
directly, through NeuroHTTP's gateway and through LiteLLM's proxy, in the same
run. docs/PERFORMANCE.md, "Gateway", has the numbers and what they mean.

    python loadtests/gateway_bench.py                  # everything, wrk runs of 10 s
    python loadtests/gateway_bench.py --quick          # a short smoke: 2 s runs, 50/200 streams
    python loadtests/gateway_bench.py --only direct,echo,litellm --duration 5 --out-md /tmp/gw.md
    python loadtests/gateway_bench.py --only neurohttp --parts wrk --profile /tmp/prof  # py-spy

Upstreams (started here on free 127.0.0.1 ports, stopped by pid). Each answers
POST /v1/chat/completions, whatever the body says:
  json   nginx: a fixed chat completion
  sse    nginx: a fixed stream (a role delta, 20 content deltas, a finish chunk,
         a usage chunk, [DONE])
  paced  a second neurohttpd (2 workers) whose echo model streams max_tokens
         tokens `--delay-ms` apart
Every gateway has three public models, json, sse and paced, each with one
deployment whose base_url is http://127.0.0.1:PORT/v1 of the upstream of that
name: every gateway calls the same path, /v1/chat/completions.

Columns (--only picks some; direct is the baseline of the "added" figures):
  direct     the client calls the upstreams (the CPU shown is nginx's)
  nginx-proxy  nginx (Debian's, 2 workers) as a plain reverse proxy in front of
             the same upstreams: upstream {} blocks with keepalive 64, HTTP/1.1,
             proxy_buffering off for the streams, access log off. Not a gateway:
             nginx cannot read or rewrite the JSON `model`, so it listens on one
             port per upstream (same path, same bodies). The floor of one extra
             HTTP hop over loopback, in C, in the same run
  neurohttp  neurohttpd -w 2 with the openai provider (DESIGN.md §5 models)
  litellm    LiteLLM's proxy, --num_workers 2, with the settings its "Best
             Practices for Production" page gives (LITELLM_SETTINGS below)
  echo       neurohttpd -w 2 answering itself with the echo model. Not a
             gateway: the reference the targets are set against (CPU per
             POST /v1/chat, RSS per worker without the gateway), and a
             stand-in for the gateway column where the provider is missing

Per column, in turn (the others are stopped meanwhile):
  1. start, and time from the start to the first 200 on a proxied request;
     check one answer and one stream
  2. wrk -t1, POST with keep-alive, a 2 s warm-up then --duration s each:
     non-stream (model json) and stream (model sse) at 1 connection (latency)
     and 64 (throughput), with the CPU of the column's processes (user + sys
     from /proc) over the measured run / requests. The echo column also runs
     POST /v1/chat {"prompt":"Hello"} at 64 (the core benchmark's scenario B).
  3. RSS and PSS of each worker after that load
  4. paced streams: --streams concurrent streams (each step in turn) of
     --events events --delay-ms apart from the paced upstream; one asyncio
     client (uvloop, a raw socket per stream) timestamps every read: first
     event p50/p99 per stream, inter-event gaps p50/p99/max, the column's
     CPU per delivered event and the client's own CPU. LiteLLM stops
     stepping at the first step where streams fail or do not finish.

A non-2xx answer or a socket error in a wrk run, a wrk run in which no answer
finished, or a failed paced stream on any column but litellm is an error: the
tables are printed, then the run exits with status 1 naming what failed.
Where LiteLLM breaks is a result, not an error.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "loadtests"))

from bench import SHARED_BENCH  # noqa: E402
from metrics_cost import children, cpu_seconds  # noqa: E402
from nginx_server import NGINX, Nginx, chat_stream_body, config_head, free_port  # noqa: E402
from stream_bench import DONE, TOKEN, gather_bounded, pct  # noqa: E402
from stream_bench import run as run_on_uvloop  # noqa: E402

COLUMNS = ("direct", "nginx-proxy", "neurohttp", "litellm", "echo")
LITELLM = "/work/venvs/litellm/bin/litellm"
MASTER_KEY = "sk-gateway-bench-master"  # LiteLLM refuses to start without one
UPSTREAM_KEY = "sk-gateway-bench-upstream"  # what the gateways send upstream (nginx ignores it)
KEY_ENV = "GATEWAY_BENCH_UPSTREAM_KEY"
SSE_EVENTS = 20  # content deltas in the sse upstream's stream
REPLY_TOKENS = 20  # max_tokens of the wrk bodies (the echo column answers that many)
# From LiteLLM's "Best Practices for Production" (docs.litellm.ai/docs/proxy/prod):
# env and config; --num_workers 2 to match our 2 workers (uvicorn, uvloop, its default).
LITELLM_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
               "LITELLM_MODE": "PRODUCTION", "LITELLM_MASTER_KEY": MASTER_KEY}
# Not a speed setting: uvicorn's supervisor pings each worker every 0.5 s and kills
# one that does not answer within 5 s. On a busy shared machine LiteLLM's workers,
# still importing the proxy, missed that and were restarted in a loop for 15
# minutes; with 120 s they start (LiteLLM's CLI documents the flag).
LITELLM_ARGS = ["--timeout_worker_healthcheck", "120"]
LITELLM_SETTINGS = """general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
  disable_spend_logs: true
  disable_error_logs: true
litellm_settings:
  request_timeout: 600
  set_verbose: false
"""


def body(model: str, stream: bool, max_tokens: int) -> bytes:
    msg: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Hello"}],
                           "max_tokens": max_tokens}
    if stream:
        msg["stream"] = True
    return json.dumps(msg, separators=(",", ":")).encode()


HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {MASTER_KEY}"}


# ------------------------------------------------------------ processes
def tree(pid: int) -> list[int]:
    """pid and all its descendants alive now."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


def tree_cpu(pids: list[int]) -> float:
    """utime + stime (s) of these processes and their descendants."""
    total = 0.0
    for root in pids:
        for p in tree(root):
            try:
                total += cpu_seconds(p)
            except (OSError, ValueError, IndexError):
                pass  # gone meanwhile
    return total


class Service:
    """A server process this script starts and stops by pid (with its children)."""

    def __init__(self, name: str, cmd: list[str], workdir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def workers(self, n: int) -> list[int]:
        """The n biggest children: the workers (LiteLLM also has a small helper)."""
        kids = []
        for p in children(self.pid):
            try:
                kids.append((psutil.Process(p).memory_info().rss, p))
            except psutil.Error:
                pass
        return [p for _, p in sorted(kids, reverse=True)[:n]]

    def tail(self, n: int = 20) -> str:
        if not self.log.closed:
            self.log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        procs = []
        for pid in tree(self.pid):
            try:
                procs.append(psutil.Process(pid))  # remembers the start time: no pid reuse
            except psutil.Error:
                pass
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            try:
                if p.is_running():
                    p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)
        if self.proc.poll() is None:
            self.proc.wait(10)
        self.log.close()


def neurohttpd(name: str, toml: str, workdir: Path, port: int, workers: int) -> Service:
    cfg = workdir / f"{name}.toml"
    cfg.write_text(toml)
    return Service(name, [sys.executable, "-m", "neurohttp", "start", "-c", str(cfg),
                          "-b", f"127.0.0.1:{port}", "-w", str(workers),
                          "--pid-file", str(workdir / f"{name}.pid")], workdir,
                   env={"PYTHONPATH": str(ROOT), KEY_ENV: UPSTREAM_KEY})


NEUROHTTP_HEAD = """[server]
graceful_timeout = 5.0
[log]
level = "warning"
"""


def paced_upstream_toml(delay_ms: float) -> str:
    return NEUROHTTP_HEAD + f"""
[models.paced]
provider = "echo"
token_delay_ms = {delay_ms}
repeat = true
split = "token"
"""


def echo_toml(delay_ms: float) -> str:
    """The echo column: the same public models, answered by the echo model."""
    models = "".join(f"""
[models.{m}]
provider = "echo"
repeat = true
split = "token"
""" for m in ("json", "sse"))
    return NEUROHTTP_HEAD + '\n[models.echo]\nprovider = "echo"\n' + models + \
        paced_upstream_toml(delay_ms)[len(NEUROHTTP_HEAD):]


def gateway_toml(ports: dict[str, int]) -> str:
    """The NeuroHTTP gateway: each public model one openai deployment, in its own
    table (DESIGN.md §5; docs/ROUTING.md)."""
    out = NEUROHTTP_HEAD
    for model, upstream_model, conns in (("json", "up", 64), ("sse", "up", 64),
                                         ("paced", "paced", 1024)):
        out += f"""
[models.{model}]
provider = "openai"
base_url = "http://127.0.0.1:{ports[model]}/v1"
model = "{upstream_model}"
api_key_env = "{KEY_ENV}"
max_connections = {conns}
"""
    return out


def litellm_yaml(ports: dict[str, int]) -> str:
    out = "model_list:\n"
    for model, upstream_model in (("json", "up"), ("sse", "up"), ("paced", "paced")):
        out += f"""  - model_name: {model}
    litellm_params:
      model: openai/{upstream_model}
      api_base: http://127.0.0.1:{ports[model]}/v1
      api_key: os.environ/{KEY_ENV}
"""
    return out + LITELLM_SETTINGS


def nginx_proxy_conf(d: Path, ports: dict[str, int], upstreams: dict[str, int],
                     workers: int) -> str:
    """The nginx-proxy column: the fastest sensible plain reverse proxy. One
    server per upstream (`ports[m]` in front of `upstreams[m]`: nginx cannot
    route on the JSON `model`), pooled keep-alive HTTP/1.1 upstream
    connections, no buffering for the streams, no access log."""
    servers = ""
    for m in ("json", "sse", "paced"):
        stream = m != "json"  # sse and paced stream: each event on as it comes
        servers += f"""
  upstream up_{m} {{
    server 127.0.0.1:{upstreams[m]};
    keepalive 64;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
  }}
  server {{
    listen 127.0.0.1:{ports[m]} reuseport;
    location / {{
      proxy_pass http://up_{m};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      {"proxy_buffering off;" if stream else ""}
      proxy_read_timeout 600s;
    }}
  }}"""
    return config_head(d, workers, 8192, main_extra="worker_rlimit_nofile 16384;\n") \
        + servers + "\n}\n"


# ------------------------------------------------------------ one request
def post(port: int, payload: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", payload, HEADERS)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def first_answer(port: int, t0: float, service: Service | None, timeout: float,
                 model: str = "json") -> float:
    """Seconds from t0 (the start) to the first 200 on a non-stream request."""
    payload = body(model, False, REPLY_TOKENS)
    last = "no answer"
    while time.monotonic() - t0 < timeout:
        if service is not None and not service.alive():
            raise SystemExit(f"{service.name} exited:\n{service.tail()}")
        try:
            status, answer = post(port, payload, timeout=5.0)
            if status == 200:
                return time.monotonic() - t0
            last = f"{status} {answer[:300]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.01)
    tail = service.tail() if service else ""
    raise SystemExit(f"no 200 from port {port} within {timeout:.0f} s (last: {last})\n{tail}")


def check_answers(name: str, ports: dict[str, int], sse_events: int) -> None:
    """One answer and one stream as a client sees them, before any load."""
    status, answer = post(ports["json"], body("json", False, REPLY_TOKENS))
    if status != 200 or not json.loads(answer).get("choices"):
        raise SystemExit(f"{name}: non-stream answer {status} {answer[:300]!r}")
    status, answer = post(ports["sse"], body("sse", True, REPLY_TOKENS))
    if status != 200 or answer.count(TOKEN) != sse_events or DONE not in answer:
        raise SystemExit(f"{name}: stream answer {status}: {answer.count(TOKEN)} content "
                         f"events (expected {sse_events}), [DONE] "
                         f"{'seen' if DONE in answer else 'missing'}: {answer[:300]!r}")


# ------------------------------------------------------------ wrk
def wrk_script(workdir: Path, name: str, payload: bytes) -> Path:
    """POST `payload` on every request; report.lua's done() prints the WRKJSON line."""
    path = workdir / f"{name}.lua"
    head = ['wrk.method = "POST"', f"wrk.body = [[{payload.decode()}]]"]
    head += [f'wrk.headers["{k}"] = "{v}"' for k, v in HEADERS.items()]
    path.write_text("\n".join(head) + "\n" + (SHARED_BENCH / "lua" / "report.lua").read_text())
    return path


def wrk(port: int, path: str, script: Path, conns: int, seconds: float) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "--timeout", "10s", "--latency",
           "-s", str(script), f"http://127.0.0.1:{port}{path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise SystemExit(f"wrk gave no result ({' '.join(cmd)}):\n{out.stdout}\n{out.stderr}")
    r: dict[str, Any] = json.loads(line[len("WRKJSON "):])
    return r


def measure(port: int, path: str, script: Path, conns: int, args: argparse.Namespace,
            cpu_pids: list[int], profile: tuple[int, Path] | None = None) -> dict[str, Any]:
    """A wrk run after a warm-up, with the CPU of cpu_pids' trees over it;
    profile = (pid, file): py-spy records that process meanwhile."""
    wrk(port, path, script, conns, args.warmup)
    spy = None
    if profile is not None:
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(profile[0]), "--rate", "200",
                                "--duration", f"{max(1, int(args.duration) - 1)}",
                                "--nonblocking", "--format", "raw", "-o", str(profile[1])],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c0 = tree_cpu(cpu_pids)
    r = wrk(port, path, script, conns, args.duration)
    cpu = tree_cpu(cpu_pids) - c0
    if spy is not None and profile is not None:
        spy.wait(60)
        log(f"profile of pid {profile[0]}, {path} -c{conns}, own samples by line:\n"
            + top_lines(profile[1]))
    n = r["requests"]
    nan = float("nan")  # no answer finished within the run: no latency to speak of
    return {"requests": n, "rps": n / (r["duration_us"] / 1e6),
            "p50_ms": r["p50_us"] / 1e3 if n else nan, "p99_ms": r["p99_us"] / 1e3 if n else nan,
            "non2xx": r["err_status"],
            "socket_errors": r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"],
            "cpu_us": cpu / n * 1e6 if n else nan}


def top_lines(raw: Path, n: int = 12) -> str:
    """The lines with the most samples of their own in py-spy's raw (collapsed) output."""
    own: dict[str, int] = {}
    total = 0
    try:
        text = raw.read_text()
    except OSError as e:
        return f"  (no profile: {e})"
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        total += int(count)
        leaf = stack.rsplit(";", 1)[-1]
        own[leaf] = own.get(leaf, 0) + int(count)
    best = sorted(own.items(), key=lambda kv: -kv[1])[:n]
    return "\n".join(f"  {100 * k / total:5.1f}%  {leaf}" for leaf, k in best)


# ------------------------------------------------------------ paced streams
SLACK_S = 30.0  # a stream not done this long after its last event was due has failed


def bound_s(args: argparse.Namespace) -> float:
    return 1.0 + args.events * args.delay_ms / 1e3 + SLACK_S


class PacedStream(asyncio.Protocol):
    """One streamed request on its own connection (Connection: close): the time
    of its first content event and the gaps between the following ones."""

    def __init__(self, request: bytes, t0: float, gaps: list[float],
                 done: asyncio.Future[PacedStream]) -> None:
        self.request = request
        self.t0 = t0
        self.gaps = gaps
        self.done = done
        self.status = 0
        self.events = 0
        self.first = float("nan")
        self.last = 0.0
        self.head = b""
        self.tail = b""
        self.finished = False
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)  # uvloop's: not a subclass
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.status:
            self.head += data[:16]
            if len(self.head) >= 12:
                self.status = int(self.head[9:12]) if self.head[9:12].isdigit() else -1
        buf = self.tail + data
        k = buf.count(TOKEN)
        self.tail = buf[-(len(TOKEN) - 1):]
        if k:
            if self.events == 0:
                self.first = now - self.t0
            else:
                self.gaps.append(now - self.last)
            self.gaps.extend([0.0] * (k - 1))  # arrived in the same read
            self.events += k
            self.last = now
        if DONE in buf:
            self.finished = True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self)


async def one_stream(port: int, request: bytes, gaps: list[float], delay: float,
                     opened: list[PacedStream]) -> PacedStream:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(delay)
    done: asyncio.Future[PacedStream] = loop.create_future()
    t0 = time.perf_counter()  # connecting is part of the wait for the first event
    stream = PacedStream(request, t0, gaps, done)
    opened.append(stream)
    await loop.create_connection(lambda: stream, "127.0.0.1", port)
    return await done


async def paced_step(port: int, streams: int, events: int, delay_ms: float,
                     cpu_pids: list[int]) -> dict[str, Any]:
    payload = body("paced", True, events)
    head = "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items())
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{head}"
               f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload
    gaps: list[float] = []
    ramp = 1.0  # starts spread over a second, as in stream_bench
    bound = ramp + events * delay_ms / 1e3 + SLACK_S  # bound_s()
    c0, me0, t0 = tree_cpu(cpu_pids), time.process_time(), time.perf_counter()
    opened: list[PacedStream] = []
    results = await gather_bounded([one_stream(port, request, gaps, random.random() * ramp,
                                               opened) for _ in range(streams)], bound)
    wall = time.perf_counter() - t0
    cpu, me = tree_cpu(cpu_pids) - c0, time.process_time() - me0
    for st in opened:  # streams not done in time: closed, so the next step starts clean
        if st.transport is not None and not st.done.done():
            st.transport.abort()
    await asyncio.sleep(0.1)
    complete = [r for r in results if isinstance(r, PacedStream) and r.status == 200
                and r.finished and r.events == events]
    # a stream that never had an event counts as infinitely late
    firsts = [st.first if st.events else float("inf") for st in opened]
    firsts += [float("inf")] * (streams - len(opened))
    non2xx = sum(1 for st in opened if st.status not in (0, 200))
    received = sum(st.events for st in opened)
    return {"streams": streams, "complete": len(complete), "non2xx": non2xx,
            "failed": streams - len(complete) - non2xx,  # connect errors, cut or late streams
            "first_p50_ms": pct(firsts, 0.5) * 1e3, "first_p99_ms": pct(firsts, 0.99) * 1e3,
            "gap_p50_ms": pct(gaps, 0.5) * 1e3, "gap_p99_ms": pct(gaps, 0.99) * 1e3,
            "gap_max_ms": max(gaps) * 1e3 if gaps else float("nan"),
            "wall_s": wall, "gateway_cores": cpu / wall, "client_cores": me / wall,
            "cpu_us_per_event": cpu / received * 1e6 if received else float("nan")}


# ------------------------------------------------------------ one column
@dataclass
class Column:
    name: str
    ports: dict[str, int]  # load (json, sse, paced) -> port the client calls
    cpu: dict[str, list[int]]  # load -> pids whose process trees are the column's CPU
    service: Service | None = None
    results: dict[str, Any] = field(default_factory=dict)


def start_column(name: str, ups: dict[str, Any], workdir: Path,
                 args: argparse.Namespace) -> Column:
    ports = {m: ups[m]["port"] for m in ("json", "sse", "paced")}
    if name == "direct":
        col = Column(name, ports, {m: [ups[m]["pid"]] for m in ports})
        col.results["start_s"] = ups["json"]["start_s"]
        return col
    if name == "nginx-proxy":
        d = workdir / "nginx-proxy"
        d.mkdir(exist_ok=True)
        front = {m: free_port() for m in ports}
        conf = d / "nginx.conf"
        conf.write_text(nginx_proxy_conf(d, front, ports, args.workers))
        svc = Service(name, [NGINX, "-c", str(conf), "-p", str(d), "-e", str(d / "error.log")],
                      workdir)
        col = Column(name, front, dict.fromkeys(front, [svc.pid]), svc)
        try:
            col.results["start_s"] = first_answer(front["json"], svc.t0, svc, 10.0)
        except BaseException:
            svc.stop()
            raise
        return col
    port = free_port()
    if name == "litellm":
        cfg = workdir / "litellm.yaml"
        cfg.write_text(litellm_yaml(ports))
        svc = Service(name, [args.litellm, "--config", str(cfg), "--host", "127.0.0.1",
                             "--port", str(port), "--num_workers", str(args.workers),
                             *LITELLM_ARGS], workdir,
                      env={**LITELLM_ENV, KEY_ENV: UPSTREAM_KEY})
        timeout = args.start_timeout
    else:
        toml = gateway_toml(ports) if name == "neurohttp" else echo_toml(args.delay_ms)
        svc = neurohttpd(name, toml, workdir, port, args.workers)
        timeout = 30.0
    col = Column(name, dict.fromkeys(ports, port), dict.fromkeys(ports, [svc.pid]), svc)
    try:
        col.results["start_s"] = first_answer(port, svc.t0, svc, timeout)
    except BaseException:
        svc.stop()
        raise
    return col


def run_column(col: Column, workdir: Path, args: argparse.Namespace) -> None:
    log(f"[{col.name}] up in {col.results['start_s']:.2f} s")
    sse_events = REPLY_TOKENS if col.name == "echo" else SSE_EVENTS
    check_answers(col.name, col.ports, sse_events)
    res = col.results
    if "wrk" in args.parts:
        res["wrk"] = {}
        for load, stream in (("json", False), ("sse", True)):
            script = wrk_script(workdir, f"{col.name}-{load}", body(load, stream, REPLY_TOKENS))
            for conns in (1, 64):
                prof = None
                if args.profile and conns == 64 and col.service is not None:
                    w = col.service.workers(1)
                    prof = (w[0], Path(args.profile) / f"{col.name}-{load}.txt") if w else None
                r = measure(col.ports[load], "/v1/chat/completions", script, conns, args,
                            col.cpu[load], prof)
                res["wrk"][f"{load}-{conns}"] = r
                log(f"[{col.name}] {load} -c{conns}: {fmt(r)}")
        if col.name == "echo":  # the core benchmark's scenario B: the CPU reference
            r = measure(col.ports["json"], "/v1/chat", SHARED_BENCH / "lua" / "post_chat.lua",
                        64, args, col.cpu["json"])
            res["wrk"]["chat-64"] = r
            log(f"[{col.name}] POST /v1/chat -c64: {fmt(r)}")
    if col.service is not None:
        res["rss_mib"], res["pss_mib"] = [], []
        for p in col.service.workers(args.workers):
            try:
                m = psutil.Process(p).memory_full_info()
            except psutil.Error:
                continue
            res["rss_mib"].append(m.rss / 2**20)
            res["pss_mib"].append(m.pss / 2**20)
        log(f"[{col.name}] RSS per worker after load: "
            + ", ".join(f"{x:.1f}" for x in res["rss_mib"]) + " MiB")
    if "paced" in args.parts:
        res["paced"] = []
        for n in args.streams:
            r = run_on_uvloop(paced_step(col.ports["paced"], n, args.events, args.delay_ms,
                                         col.cpu["paced"]))
            res["paced"].append(r)
            log(f"[{col.name}] {n} paced streams: {fmt(r)}")
            if r["client_cores"] > 0.8:
                log(f"warning: the client used {r['client_cores']:.2f} cores: it may be what "
                    f"delays the events")
            if r["complete"] < n and col.name == "litellm":
                res["broke_at"] = n
                break


# ------------------------------------------------------------ report
def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


def fmt(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def num(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None or x != x else format(x, spec)


def get(res: dict[str, dict[str, Any]], col: str, load: str, key: str) -> float | None:
    try:
        return float(res[col]["wrk"][load][key])
    except (KeyError, TypeError):
        return None


def paced_at(res: dict[str, dict[str, Any]], col: str, streams: int) -> dict[str, Any] | None:
    return next((r for r in res.get(col, {}).get("paced", []) if r["streams"] == streams), None)


def report(res: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    cols = [c for c in COLUMNS if c in res]
    label = {"direct": "direct", "nginx-proxy": "nginx proxy (a hop, no gateway)",
             "neurohttp": "**NeuroHTTP**", "litellm": "LiteLLM", "echo": "echo (no gateway)"}
    out = ["| | " + " | ".join(label[c] for c in cols) + " |",
           "|---|" + "---:|" * len(cols)]

    def row(title: str, cell: Any) -> None:
        out.append(f"| {title} | " + " | ".join(cell(c) for c in cols) + " |")

    row("start → first answer (s)", lambda c: num(res[c].get("start_s")))
    for load, what in (("json", "non-stream"), ("sse", f"stream ({SSE_EVENTS} events)")):
        if "wrk" not in args.parts:
            break
        row(f"{what}, 1 conn: p50 / p99 (ms)", lambda c, ld=load: (
            f"{num(get(res, c, f'{ld}-1', 'p50_ms'), '.3f')} / "
            f"{num(get(res, c, f'{ld}-1', 'p99_ms'), '.3f')}"))
        row(f"{what}, 1 conn: added p50 vs direct (ms)", lambda c, ld=load: "" if c == "direct"
            else num(diff(get(res, c, f"{ld}-1", "p50_ms"),
                          get(res, "direct", f"{ld}-1", "p50_ms")), "+.3f"))
        row(f"{what}, 64 conns: req/s", lambda c, ld=load: num(
            get(res, c, f"{ld}-64", "rps"), ",.0f"))
        row(f"{what}, 64 conns: p50 / p99 (ms)", lambda c, ld=load: (
            f"{num(get(res, c, f'{ld}-64', 'p50_ms'))} / "
            f"{num(get(res, c, f'{ld}-64', 'p99_ms'))}"))
        row(f"{what}, 64 conns: CPU µs/request (direct: nginx's)", lambda c, ld=load: num(
            get(res, c, f"{ld}-64", "cpu_us"), ".1f"))
    if "echo" in res and "wrk" in args.parts:
        row("POST /v1/chat (echo), 64 conns: req/s, CPU µs/request", lambda c: (
            f"{num(get(res, c, 'chat-64', 'rps'), ',.0f')}, "
            f"{num(get(res, c, 'chat-64', 'cpu_us'), '.1f')}" if c == "echo" else ""))
    row("RSS per worker after load, MiB (PSS)", lambda c: (
        f"{mean(res[c]['rss_mib']):.1f} ({mean(res[c]['pss_mib']):.1f})"
        if res[c].get("rss_mib") else "–"))
    if "wrk" in args.parts:
        row("non-2xx / socket errors (all wrk runs)", lambda c: (
            f"{sum(r['non2xx'] for r in res[c]['wrk'].values())} / "
            f"{sum(r['socket_errors'] for r in res[c]['wrk'].values())}"))
    if "paced" in args.parts:
        out += ["", f"Paced streams: {args.events} events {args.delay_ms:g} ms apart per "
                    "stream, starts spread over 1 s; first event = from connecting to the "
                    "first content event.", "",
                "| streams | column | complete | first event p50 / p99 (ms) "
                "| gap p50 / p99 / max (ms) | server cores, CPU µs/event (direct: the "
                "upstream's) | client cores |",
                "|---:|---|---:|---:|---:|---:|---:|"]
        for n in args.streams:
            for c in cols:
                r = paced_at(res, c, n)
                if r is None:
                    if res[c].get("broke_at") is not None and n > res[c]["broke_at"]:
                        out.append(f"| {n} | {label[c]} | not run (broke at "
                                   f"{res[c]['broke_at']}) | | | | |")
                    continue
                bad = r["streams"] - r["complete"]
                out.append(
                    f"| {n} | {label[c]} | {r['complete']}"
                    + (f" ({r['non2xx']} non-2xx, {r['failed']} refused, cut or not done in "
                       f"{bound_s(args):.0f} s)" if bad else "")
                    + f" | {num(r['first_p50_ms'], '.1f')} / {num(r['first_p99_ms'], '.1f')}"
                    f" | {num(r['gap_p50_ms'], '.1f')} / {num(r['gap_p99_ms'], '.1f')} / "
                    f"{num(r['gap_max_ms'], '.0f')} | {r['gateway_cores']:.2f}, "
                    f"{num(r.get('cpu_us_per_event'), '.1f')} | {r['client_cores']:.2f} |")
    out += ["", *targets(res, args)]
    floor = beside_floor(res, args)
    if floor:
        out += ["", *floor]
    return "\n".join(out)


def diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not b else a / b


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def targets(res: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """Issue 11's targets, for the gateway column (or the echo stand-in without it)."""
    subject = "neurohttp" if "neurohttp" in res else "echo" if "echo" in res else None
    if subject is None:
        return []
    s = subject
    title = "NeuroHTTP gateway" if s == "neurohttp" else \
        "echo STAND-IN (not the gateway: the harness only)"
    out = [f"Targets ({title}), same run:", "",
           "| target | measured | |", "|---|---:|---|"]

    def line(what: str, value: float | None, spec: str, ok: bool | None) -> None:
        verdict = "–" if ok is None else ("met" if ok else "**missed**")
        out.append(f"| {what} | {num(value, spec)} | {verdict} |")

    def check(value: float | None, limit: float, below: bool = True) -> bool | None:
        return None if value is None or value != value else (
            value <= limit if below else value >= limit)

    if "wrk" in args.parts:
        for load, what in (("json", "non-stream"), ("sse", "stream")):
            added = diff(get(res, s, f"{load}-1", "p50_ms"),
                         get(res, "direct", f"{load}-1", "p50_ms"))
            line(f"added p50 at 1 conn, {what} ≤ 0.3 ms", added, "+.3f", check(added, 0.3))
        for load, what in (("json", "non-stream"), ("sse", "stream")):
            x = ratio(get(res, s, f"{load}-64", "rps"), get(res, "litellm", f"{load}-64", "rps"))
            line(f"req/s at 64 conns ≥ 100× LiteLLM's, {what} (×)", x, ",.0f",
                 check(x, 100, below=False))
        ref = get(res, "echo", "chat-64", "cpu_us")
        for load, what in (("json", "non-stream"), ("sse", "stream")):
            x = ratio(get(res, s, f"{load}-64", "cpu_us"), ref)
            line(f"CPU per request ≤ 3× echo's POST /v1/chat ({num(ref, '.1f')} µs), {what} (×)",
                 x, ".2f", check(x, 3))
    rss = res[s].get("rss_mib")
    base = res.get("echo", {}).get("rss_mib")
    added_rss = mean(rss) - mean(base) if rss and base else None
    line("RSS per worker ≤ 10 MiB above echo's (MiB)", added_rss, "+.1f", check(added_rss, 10))
    line("start → first proxied answer ≤ 1 s (s)", res[s].get("start_s"), ".2f",
         check(res[s].get("start_s"), 1.0))
    if "paced" in args.parts:
        n = max(args.streams)
        mine, direct = paced_at(res, s, n), paced_at(res, "direct", n)
        gap = mine["gap_p99_ms"] if mine else None
        line(f"{n} streams: gap p99 ≤ {args.delay_ms:g} + 10 ms (ms)", gap, ".1f",
             check(gap, args.delay_ms + 10))
        first = diff(mine["first_p99_ms"] if mine else None,
                     direct["first_p99_ms"] if direct else None)
        line(f"{n} streams: first event p99 ≤ direct's + 5 ms (ms)", first, "+.1f",
             check(first, 5))
    return out


def beside_floor(res: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """NeuroHTTP beside nginx-proxy, the floor of one extra HTTP hop over
    loopback in C (same upstreams, same run): how much of its cost the hop
    alone explains."""
    s, f = "neurohttp", "nginx-proxy"
    if s not in res or f not in res:
        return []
    out = ["NeuroHTTP beside nginx-proxy (the floor of one HTTP hop), same run:", "",
           "| | NeuroHTTP | nginx-proxy | NeuroHTTP over nginx-proxy |", "|---|---:|---:|---:|"]

    def line(what: str, mine: float | None, floor: float | None, spec: str,
             how: str = "ratio") -> None:
        rel = ratio(mine, floor) if how == "ratio" else diff(mine, floor)
        out.append(f"| {what} | {num(mine, spec)} | {num(floor, spec)} | "
                   f"{num(rel, '.2f') + ' ×' if how == 'ratio' else num(rel, '+.3f') + ' ms'} |")

    if "wrk" in args.parts:
        for load, what in (("json", "non-stream"), ("sse", "stream")):
            line(f"{what}: CPU µs/request at 64 conns", get(res, s, f"{load}-64", "cpu_us"),
                 get(res, f, f"{load}-64", "cpu_us"), ".1f")
            line(f"{what}: req/s at 64 conns", get(res, s, f"{load}-64", "rps"),
                 get(res, f, f"{load}-64", "rps"), ",.0f")
            direct = get(res, "direct", f"{load}-1", "p50_ms")
            line(f"{what}: added p50 at 1 conn vs direct (ms)",
                 diff(get(res, s, f"{load}-1", "p50_ms"), direct),
                 diff(get(res, f, f"{load}-1", "p50_ms"), direct), "+.3f", how="diff")
    rss, frss = res[s].get("rss_mib"), res[f].get("rss_mib")
    line("RSS per worker after load (MiB)", mean(rss) if rss else None,
         mean(frss) if frss else None, ".1f")
    if "paced" in args.parts:
        for n in args.streams:
            mine, floor = paced_at(res, s, n), paced_at(res, f, n)
            if mine is None or floor is None:
                continue
            line(f"{n} paced streams: gap p99 (ms)",
                 mine["gap_p99_ms"], floor["gap_p99_ms"], ".1f", how="diff")
            line(f"{n} paced streams: first event p99 (ms)",
                 mine["first_p99_ms"], floor["first_p99_ms"], ".1f", how="diff")
            line(f"{n} paced streams: CPU µs/event", mine["cpu_us_per_event"],
                 floor["cpu_us_per_event"], ".1f")
    return out


def failures(res: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for c, r in res.items():
        for load, w in r.get("wrk", {}).items():
            if w["non2xx"] or w["socket_errors"]:
                out.append(f"{c}: wrk {load}: {w['non2xx']} non-2xx answers, "
                           f"{w['socket_errors']} socket errors")
            elif not w["requests"]:
                out.append(f"{c}: wrk {load}: no answer finished within the run")
        if c == "litellm":
            continue  # where LiteLLM breaks is a result, not a failure of the harness
        for p in r.get("paced", []):
            if p["complete"] < p["streams"]:
                out.append(f"{c}: {p['streams']} paced streams: {p['complete']} complete, "
                           f"{p['non2xx']} non-2xx, {p['failed']} failed or unfinished")
    return out


# ------------------------------------------------------------ main
def start_upstreams(workdir: Path, args: argparse.Namespace,
                    stack: list[Service | Nginx]) -> dict[str, Any]:
    ups: dict[str, Any] = {}
    t0 = time.monotonic()
    ng = Nginx(workdir / "nginx-json").start()
    stack.append(ng)
    assert ng.proc is not None
    ups["json"] = {"port": ng.port, "pid": ng.proc.pid, "start_s": time.monotonic() - t0}
    ng = Nginx(workdir / "nginx-sse", chat_body=chat_stream_body(SSE_EVENTS),
               chat_type="text/event-stream").start()
    stack.append(ng)
    assert ng.proc is not None
    ups["sse"] = {"port": ng.port, "pid": ng.proc.pid}
    port = free_port()
    svc = neurohttpd("paced-upstream", paced_upstream_toml(args.delay_ms), workdir, port, 2)
    stack.append(svc)
    first_answer(port, svc.t0, svc, 30.0, model="paced")
    ups["paced"] = {"port": port, "pid": svc.pid}
    return ups


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(COLUMNS),
                    help=f"columns, comma-separated (default: {','.join(COLUMNS)})")
    ap.add_argument("--parts", default="wrk,paced", help="wrk, paced or both")
    ap.add_argument("--duration", type=float, help="seconds per measured wrk run (10)")
    ap.add_argument("--warmup", type=float, help="seconds of wrk before each run (2)")
    ap.add_argument("--streams", help="paced concurrency steps (50,200,1000)")
    ap.add_argument("--events", type=int, help="events per paced stream (100)")
    ap.add_argument("--delay-ms", type=float, default=20.0, help="pacing of the paced upstream")
    ap.add_argument("--workers", type=int, default=2, help="workers of each gateway")
    ap.add_argument("--quick", action="store_true",
                    help="a short smoke: 2 s runs, 1 s warm-up, 50 and 200 streams of 25 events "
                         "(options given explicitly still apply)")
    ap.add_argument("--litellm", default=LITELLM, help="the litellm proxy's executable")
    ap.add_argument("--start-timeout", type=float, default=300.0,
                    help="seconds LiteLLM may take to its first answer (its imports are slow)")
    ap.add_argument("--profile", default="",
                    help="a directory: py-spy records one worker of each column during its "
                         "64-connection runs (raw stacks there; the busiest lines printed)")
    ap.add_argument("--out-md", default="", help="also write the tables here")
    ap.add_argument("--json", default="", help="write the raw results here")
    args = ap.parse_args()
    for key, full, quick in (("duration", 10.0, 2.0), ("warmup", 2.0, 1.0),
                             ("streams", "50,200,1000", "50,200"), ("events", 100, 25)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    for c in only:
        if c not in COLUMNS:
            ap.error(f"unknown column {c!r} (known: {', '.join(COLUMNS)})")
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not args.parts <= {"wrk", "paced"}:
        ap.error("--parts takes wrk, paced or both")
    args.streams = [int(x) for x in args.streams.split(",")]
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    if "litellm" in only and not Path(args.litellm).exists():
        ap.error(f"{args.litellm} not found (--litellm PATH)")
    # a TERM still runs the finally block that stops the servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cmdline = "python loadtests/gateway_bench.py " + " ".join(sys.argv[1:])
    res: dict[str, dict[str, Any]] = {}
    stack: list[Service | Nginx] = []
    t_start, load0 = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="gateway_bench_") as tmp:
        workdir = Path(tmp)
        try:
            ups = start_upstreams(workdir, args, stack)
            for name in [c for c in COLUMNS if c in only]:
                col = start_column(name, ups, workdir, args)
                try:
                    run_column(col, workdir, args)
                finally:
                    if col.service is not None:
                        col.service.stop()
                res[name] = col.results
        finally:
            for s in reversed(stack):
                s.stop()
    text = (f"`{cmdline}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(t_start))}, "
            f"{time.time() - t_start:.0f} s; load average {load0:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} cores)\n\n"
            + report(res, args) + "\n")
    print(text)
    if args.out_md:
        Path(args.out_md).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    bad = failures(res)
    for b in bad:
        print(f"ERROR: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
