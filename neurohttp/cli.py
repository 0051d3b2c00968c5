"""The `neurohttpd` command: start, stop, reload, status, check, top."""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from typing import Any

import click

from . import __version__
from . import config as config_mod
from .master import pidfile

CONFIG_OPT = click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
                          default=None, help="TOML config file (default: embedded defaults).")
PIDFILE_OPT = click.option("--pid-file", default=None, type=click.Path(dir_okay=False),
                           help="Pid file (default: [server] pid_file, neurohttpd.pid).")


def _load(config_path: str | None, overrides: dict[str, dict[str, Any]] | None = None) -> config_mod.Config:
    try:
        return config_mod.load(config_path, overrides)
    except config_mod.ConfigError as e:
        click.echo(f"neurohttpd: {e}", err=True)
        sys.exit(1)


def _check_tls(cfg: config_mod.Config) -> None:
    """Read and check the TLS files as the master will (exit 1 naming the
    file if one is bad); print the warnings (an expired certificate)."""
    from . import tlsconfig
    try:
        tls = tlsconfig.load(cfg)
    except config_mod.ConfigError as e:
        click.echo(f"neurohttpd: {e}", err=True)
        sys.exit(1)
    for warning in tls.warnings if tls is not None else []:
        click.echo(f"neurohttpd: warning: {warning}", err=True)


def _pid_path(config_path: str | None, pid_file: str | None) -> str:
    if pid_file:
        return pid_file
    return _load(config_path).server.pid_file


def _find_master(config_path: str | None, pid_file: str | None
                 ) -> tuple[str, int | None, str]:
    """(pid file, master pid or None, why not: the sentence to print when None).
    A pid file whose pid is not a neurohttpd master is stale: never signalled."""
    path = _pid_path(config_path, pid_file)
    found = pidfile.inspect(path)
    if found.master:
        return path, found.pid, ""
    if found.stale:
        return path, None, f"not running (stale pid file {path}: {found.stale})"
    return path, None, f"not running (no live master in {path})"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="neurohttpd")
def main() -> None:
    """NeuroHTTP: a pre-fork HTTP server for AI APIs."""


@main.command()
@CONFIG_OPT
@click.option("-b", "--bind", multiple=True, help="HOST:PORT to listen on (repeatable).")
@click.option("-w", "--workers", type=int, default=None, help="Worker processes (0: CPU count).")
@PIDFILE_OPT
@click.option("--daemon", is_flag=True, help="Detach and run in the background.")
def start(config_path: str | None, bind: tuple[str, ...], workers: int | None,
          pid_file: str | None, daemon: bool) -> None:
    """Start the master in the foreground (or detached with --daemon)."""
    server: dict[str, Any] = {}
    if bind:
        server["bind"] = list(bind)
    if workers is not None:
        server["workers"] = workers
    if pid_file:
        server["pid_file"] = pid_file
    overrides = {"server": server} if server else {}
    cfg = _load(config_path, overrides)
    from . import logs
    try:
        logs.setup_from(cfg)
    except config_mod.ConfigError as e:
        click.echo(f"neurohttpd: {e}", err=True)
        sys.exit(1)
    notify_fd = _daemonize() if daemon else -1
    from .master.arbiter import Master
    sys.exit(Master(cfg, overrides, notify_fd=notify_fd).run())


def _daemonize() -> int:
    """Double fork. The original process waits on a pipe until the master reports
    that it started (or why it could not), prints that and exits with 0 or 1;
    the master continues detached. Returns the pipe's write end (the master's)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        chunks = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], 0.5)
            if ready:
                b = os.read(r, 4096)
                if not b:
                    break  # the master closed its end: started or failed, it said which
                chunks.append(b)
        os.waitpid(pid, 0)
        msg = b"".join(chunks).decode(errors="replace").strip()
        if msg.startswith("ok "):
            click.echo(f"neurohttpd started: master pid {msg[3:]}")
            os._exit(0)
        click.echo(f"neurohttpd: {msg.removeprefix('error ') or 'the master did not start'}",
                   err=True)
        os._exit(1)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)  # the master is not a session leader, so it can never get a terminal
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        # Detached: errors go to the error log (set error_log to a file with --daemon).
        os.dup2(devnull, fd)
    os.close(devnull)
    return w


@main.command()
@CONFIG_OPT
@PIDFILE_OPT
@click.option("--now", is_flag=True, help="Quick stop (SIGQUIT): do not wait for requests.")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for the master to exit.")
def stop(config_path: str | None, pid_file: str | None, now: bool, timeout: float) -> None:
    """Stop the master: graceful (SIGTERM) or quick (--now, SIGQUIT)."""
    path, pid, why = _find_master(config_path, pid_file)
    if pid is None:
        click.echo(f"neurohttpd: {why}", err=True)
        return
    os.kill(pid, signal.SIGQUIT if now else signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pidfile.read(path) != pid and not _alive(pid):
            click.echo(f"neurohttpd: master {pid} stopped")
            return
        time.sleep(0.05)
    click.echo(f"neurohttpd: master {pid} still running after {timeout:g} s", err=True)
    sys.exit(1)


def _alive(pid: int) -> bool:
    from .stats.block import pid_alive
    return pid_alive(pid)


@main.command()
@CONFIG_OPT
@PIDFILE_OPT
def reload(config_path: str | None, pid_file: str | None) -> None:
    """Reload the config and replace every worker gracefully (SIGHUP)."""
    path, pid, why = _find_master(config_path, pid_file)
    if pid is None:
        click.echo(f"neurohttpd: {why}", err=True)
        sys.exit(7)  # LSB: program is not running
    if config_path:
        _check_tls(_load(config_path))  # refuse early, with the error, if the new config is bad
    os.kill(pid, signal.SIGHUP)
    click.echo(f"neurohttpd: reload signalled to master {pid}")


@main.command()
@CONFIG_OPT
@PIDFILE_OPT
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (for scripts).")
def status(config_path: str | None, pid_file: str | None, as_json: bool) -> None:
    """Exit 0 and describe the server while it runs, 3 when it does not."""
    path, pid, why = _find_master(config_path, pid_file)
    if pid is None:
        if as_json:
            stale = pidfile.inspect(path).stale
            click.echo(json.dumps({"running": False, "pid_file": os.path.abspath(path),
                                   **({"stale": stale} if stale else {})}))
        else:
            click.echo(f"neurohttpd is {why}")
        sys.exit(3)
    doc = _status_doc(path, pid)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    m = doc["master"]
    click.echo(f"neurohttpd is running: master pid {pid}, up {_age(m['uptime'])}, "
               f"config {m['config'] or '(embedded defaults)'}, {len(doc['workers'])} workers, "
               f"generation {m.get('generation', '?')}")
    click.echo(f"  {'WORKER':>6} {'PID':>8} {'STATE':<9} {'AGE':>8} {'REQUESTS':>10} "
               f"{'RSS':>10} {'CPU':>16}")
    for w in doc["workers"]:
        click.echo(f"  {w['id']:>6} {w['pid']:>8} {w['state']:<9} {_age(w['age']):>8} "
                   f"{w['requests']:>10} {w['rss_mb']:>6.1f} MiB "
                   f"{w['cpu_s']:>7.2f}s {w['cpu_percent']:>5.1f}%")


def _age(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def _status_doc(pid_path: str, pid: int) -> dict[str, Any]:
    """The master's and workers' figures: the stats block for what the server
    counts, psutil for memory and CPU (sampled over 0.2 s)."""
    import psutil

    from .stats.block import StatsBlock, block_name
    from .stats.snapshot import stats_document

    doc: dict[str, Any] = {"running": True, "pid_file": os.path.abspath(pid_path)}
    info: dict[str, Any] = {}
    stats: dict[str, Any] = {"workers": [], "master": {}}
    try:
        block = StatsBlock.attach(block_name(pid_path))
    except FileNotFoundError:
        block = None
    if block is not None:
        try:
            if block.valid():
                stats = stats_document(block)
                info = json.loads(block.read_text(0) or "{}")
        finally:
            block.close()
    rows = stats["workers"]
    if not rows:  # no block: fall back to the master's children
        try:
            rows = [{"id": 0, "pid": c.pid, "state": "unknown", "age": 0, "requests": 0}
                    for c in psutil.Process(pid).children()]
        except psutil.Error:
            rows = []
    procs: dict[int, psutil.Process] = {}
    for p in [pid] + [w["pid"] for w in rows]:
        try:
            procs[p] = psutil.Process(p)
        except psutil.Error:
            pass

    def cpu(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system

    t0 = time.monotonic()
    before = {}
    for p, proc in procs.items():
        try:
            before[p] = cpu(proc)
        except psutil.Error:
            pass
    time.sleep(0.2)
    dt = time.monotonic() - t0

    def figures(p: int) -> dict[str, float]:
        proc = procs.get(p)
        try:
            assert proc is not None
            used = cpu(proc)
            return {"rss_mb": round(proc.memory_info().rss / 1048576, 1), "cpu_s": round(used, 2),
                    "cpu_percent": round(100 * (used - before.get(p, used)) / dt, 1)}
        except (psutil.Error, AssertionError):
            return {"rss_mb": 0.0, "cpu_s": 0.0, "cpu_percent": 0.0}

    started = info.get("started") or stats.get("master", {}).get("started") or time.time()
    m = stats.get("master", {})
    doc["master"] = {"pid": pid, "uptime": max(0, int(time.time() - started)),
                     "config": info.get("config"), "binds": info.get("binds", []),
                     "tls_binds": info.get("tls_binds", []),
                     "generation": m.get("generation"), "reloads": m.get("reloads"),
                     "restarts": m.get("restarts"), **figures(pid)}
    doc["workers"] = [{"id": w["id"], "pid": w["pid"], "state": w["state"], "age": w["age"],
                       "requests": w["requests"], **figures(w["pid"])}
                      for w in sorted(rows, key=lambda w: (w["id"], w["pid"]))]
    return doc


@main.command()
@CONFIG_OPT
def check(config_path: str | None) -> None:
    """Validate a config file, like nginx -t (enabled plugins are loaded too, as
    a worker loads them, so the providers they add can be checked)."""
    cfg = _load(config_path)
    if cfg.plugins.enabled:
        from .app import App
        from .plugins import PluginError, load_configured
        try:
            load_configured(App(), cfg)
        except (PluginError, config_mod.ConfigError) as e:
            click.echo(f"neurohttpd: {e}", err=True)
            sys.exit(1)
    _check_tls(cfg)
    for warning in config_mod.warnings(cfg):
        click.echo(f"neurohttpd: warning: {warning}", err=True)
    where = cfg.path or "the embedded defaults"
    listens = cfg.server.bind + [f"{a} (tls)" for a in cfg.server.tls_bind]
    click.echo(f"neurohttpd: configuration {where} is valid "
               f"({', '.join(listens)}; {cfg.worker_count} workers; "
               f"models {', '.join(cfg.models)})")


def _url_for(host: str, port: int) -> str:
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _default_url(config_path: str | None, pid_file: str | None) -> str:
    """The running master's first plain listening address (found through its pid
    file), else the config's first bind address, else http://127.0.0.1:8080.
    TLS addresses are skipped: top speaks plain HTTP."""
    path, pid, _ = _find_master(config_path, pid_file)
    if pid is not None:
        import psutil
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except (psutil.Error, OSError):
            conns = []
        tls = {config_mod.parse_bind(a) for a in _master_info(path).get("tls_binds", [])}
        listening = sorted((c.laddr.ip, c.laddr.port) for c in conns
                           if c.status == psutil.CONN_LISTEN)
        listening = [a for a in listening if a not in tls]
        if listening:
            return _url_for(*listening[0])
    if config_path:
        binds = _load(config_path).binds
        if binds:
            return _url_for(*binds[0])
    return "http://127.0.0.1:8080"


def _master_info(pid_path: str) -> dict[str, Any]:
    """The facts the master publishes in its stats block (binds, tls_binds, ...)."""
    from .stats.block import StatsBlock, block_name
    try:
        block = StatsBlock.attach(block_name(pid_path))
    except FileNotFoundError:
        return {}
    try:
        return dict(json.loads(block.read_text(0) or "{}")) if block.valid() else {}
    finally:
        block.close()


@main.command()
@CONFIG_OPT
@PIDFILE_OPT
@click.option("-u", "--url", default=None,
              help="Server to watch, e.g. http://10.0.0.5:8080 (default: the running master's "
                   "address from -c/--pid-file, else http://127.0.0.1:8080).")
@click.option("-n", "--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--once", is_flag=True,
              help="Print one view and exit (status 1 if the server cannot be read).")
def top(config_path: str | None, pid_file: str | None, url: str | None, interval: float,
        once: bool) -> None:
    """A live terminal view of the server's figures, per worker (Ctrl-C quits)."""
    from .top import run
    sys.exit(run(url or _default_url(config_path, pid_file), interval, once=once))


@main.group()
def keys() -> None:
    """API keys: issue a new one, or hash one for [[auth.keys]] (docs/SECURITY.md)."""


@keys.command("new")
@click.argument("name")
@click.option("--rpm", type=click.IntRange(min=0), default=0, help="Requests per minute (0: no limit).")
@click.option("--tpm", type=click.IntRange(min=0), default=0, help="Tokens per minute (0: no limit).")
@click.option("--daily-tokens", type=click.IntRange(min=0), default=0,
              help="Tokens per UTC day (0: no limit).")
@click.option("--models", default="", help="Comma-separated models it may use (default: all).")
def keys_new(name: str, rpm: int, tpm: int, daily_tokens: int, models: str) -> None:
    """Print a fresh random key (once: it is stored nowhere) and the
    [[auth.keys]] table to paste into the config (its digest only)."""
    from .security.keys import digest, new_key
    if not config_mod.KEY_NAME_RE.fullmatch(name):
        raise click.BadParameter("1-64 letters, digits, '.', '_' or '-'", param_hint="NAME")
    key = new_key()
    names = [m.strip() for m in models.split(",") if m.strip()]
    table = (f"[[auth.keys]]\nname = {json.dumps(name)}\nsha256 = \"{digest(key)}\"\n"
             f"rpm = {rpm}\ntpm = {tpm}\ndaily_tokens = {daily_tokens}\n"
             f"models = [{', '.join(json.dumps(m) for m in names)}]")
    click.echo(f"# the key (shown once; give it to the client, keep no copy):\n{key}\n")
    click.echo(f"# paste into the config ([auth] enabled = true):\n{table}")


@keys.command("hash")
def keys_hash() -> None:
    """Read a key on standard input and print its SHA-256 (the sha256 of [[auth.keys]])."""
    from .security.keys import digest
    key = sys.stdin.readline().strip()
    if not key:
        raise click.UsageError("no key on standard input")
    click.echo(digest(key))


if __name__ == "__main__":
    main()
