"""The `neurohttpd` command: start, stop, reload, status, check."""

from __future__ import annotations

import os
import select
import signal
import sys
import time

import click

from . import __version__
from . import config as config_mod
from .master import pidfile

CONFIG_OPT = click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
                          default=None, help="TOML config file (default: embedded defaults).")
PIDFILE_OPT = click.option("--pid-file", default=None, type=click.Path(dir_okay=False),
                           help="Pid file (default: [server] pid_file, neurohttpd.pid).")


def _load(config_path: str | None, overrides: dict | None = None) -> config_mod.Config:
    try:
        return config_mod.load(config_path, overrides)
    except config_mod.ConfigError as e:
        click.echo(f"neurohttpd: {e}", err=True)
        sys.exit(1)


def _pid_path(config_path: str | None, pid_file: str | None) -> str:
    if pid_file:
        return pid_file
    return _load(config_path).server.pid_file


def _master_pid(config_path: str | None, pid_file: str | None) -> tuple[str, int | None]:
    path = _pid_path(config_path, pid_file)
    return path, pidfile.read(path)


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
    server: dict = {}
    if bind:
        server["bind"] = list(bind)
    if workers is not None:
        server["workers"] = workers
    if pid_file:
        server["pid_file"] = pid_file
    overrides = {"server": server} if server else {}
    cfg = _load(config_path, overrides)
    from . import logs
    logs.setup(cfg.log.level, cfg.log.error_log)
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
    path, pid = _master_pid(config_path, pid_file)
    if pid is None:
        click.echo(f"neurohttpd: not running (no live master in {path})", err=True)
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
    path, pid = _master_pid(config_path, pid_file)
    if pid is None:
        click.echo(f"neurohttpd: not running (no live master in {path})", err=True)
        sys.exit(7)  # LSB: program is not running
    if config_path:
        _load(config_path)  # refuse early, with the error, if the new config is bad
    os.kill(pid, signal.SIGHUP)
    click.echo(f"neurohttpd: reload signalled to master {pid}")


@main.command()
@CONFIG_OPT
@PIDFILE_OPT
def status(config_path: str | None, pid_file: str | None) -> None:
    """Exit 0 and describe the server while it runs, 3 when it does not."""
    path, pid = _master_pid(config_path, pid_file)
    if pid is None:
        click.echo(f"neurohttpd is not running (pid file {path})")
        sys.exit(3)
    import psutil
    try:
        kids = psutil.Process(pid).children()
    except psutil.Error:
        kids = []
    click.echo(f"neurohttpd is running: master pid {pid}, {len(kids)} workers")
    for k in kids:
        try:
            click.echo(f"  worker pid {k.pid}: {' '.join(k.cmdline())}")
        except psutil.Error:
            pass


@main.command()
@CONFIG_OPT
def check(config_path: str | None) -> None:
    """Validate a config file, like nginx -t."""
    cfg = _load(config_path)
    where = cfg.path or "the embedded defaults"
    click.echo(f"neurohttpd: configuration {where} is valid "
               f"({', '.join(cfg.server.bind)}; {cfg.worker_count} workers; "
               f"models {', '.join(cfg.models)})")


if __name__ == "__main__":
    main()
