"""Headless Chromium driven over the DevTools protocol (the `websockets` client).

Used by tests/test_dashboard.py, and runnable to take the dashboard screenshot
for the docs under a little load:

    python3 tests/chromium.py --out docs/dashboard.png

Chromium is started with a fresh profile and no network of its own beyond the
page it is sent to; it and its helper processes are stopped by pid.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from websockets.sync.client import connect

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
         "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars",
         "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1"]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
        if p:
            return p
    return None


class Chromium:
    """One headless browser with one page; `events` collects what the page reports."""

    def __init__(self, start_timeout: float = 90.0) -> None:
        exe = chromium_path()
        if exe is None:
            raise FileNotFoundError("chromium is not installed")
        self.profile = tempfile.mkdtemp(prefix="nh-chromium-")
        self.proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={self.profile}",
                                      "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ws = None
        self.events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        try:
            port = self._devtools_port(start_timeout)
            # entered at once and closed in close(): the page lives as long as this object
            self.ws = connect(self._page_ws(port, start_timeout), max_size=64 * 2**20,
                              open_timeout=30).__enter__()
        except BaseException:
            self.close()
            raise

    def _devtools_port(self, timeout: float) -> int:
        path = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            try:
                first = path.read_text().splitlines()[0]
                if first.strip():
                    return int(first)
            except (OSError, IndexError, ValueError):
                pass
            time.sleep(0.1)
        raise TimeoutError("chromium did not open its DevTools port")

    def _page_ws(self, port: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    pages = [t for t in json.load(r) if t.get("type") == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError("chromium has no page target")

    # ------------------------------------------------------------ protocol
    def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its answer, keeping the events that arrive."""
        assert self.ws is not None
        mid = next(self._ids)
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer to {method}")
            msg = json.loads(self.ws.recv(timeout=left))
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        r = self.call("Runtime.evaluate", timeout, expression=expression, returnByValue=True,
                      awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"evaluate failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, interval: float = 0.25) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = self.evaluate(expression)
            if v:
                return v
            time.sleep(interval)
        raise TimeoutError(f"timed out waiting for {expression}")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads the page reported."""
        out = []
        for e in self.events:
            m, p = e["method"], e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
                out.append(f"console.{p['type']}: " + " ".join(
                    str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append(f"exception: {d.get('text')} {d.get('exception', {}).get('description')}")
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out

    def open(self, url: str, width: int = 1280, height: int = 900, mobile: bool = False) -> None:
        self.call("Runtime.enable")
        self.call("Log.enable")
        self.call("Page.enable")
        self.viewport(width, height, mobile)
        self.call("Page.navigate", url=url)

    def viewport(self, width: int, height: int, mobile: bool = False) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=mobile)

    def screenshot(self, path: str | Path) -> bytes:
        data = base64.b64decode(self.call("Page.captureScreenshot", 60, format="png",
                                          captureBeyondViewport=True)["data"])
        Path(path).write_bytes(data)
        return data

    def close(self) -> None:
        if self.ws is not None:
            try:
                self.ws.close()
            except Exception:
                pass
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for k in kids:  # helper processes (zygote, renderer) by pid, if any outlived it
            try:
                k.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(kids, timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)


# JS run in the page: per canvas, how many pixels are drawn at all, and how many
# opaque pixels of the chart's data colour (data-color) lie strictly inside the
# plot: below the legend strip and above the zero line, so a legend swatch or a
# flat line at zero does not count as data.
CANVAS_CHECK = """
(() => Array.from(document.querySelectorAll("canvas")).map((c) => {
  const hex = c.dataset.color || "#000000";
  const want = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  const dpr = c.width / c.clientWidth;
  const full = c.dataset.plot === "full";  // bars: no legend, no zero line
  const top = full ? 0 : Math.round(20 * dpr);
  const bottom = full ? c.height : c.height - Math.round(22 * dpr);
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let drawn = 0, data = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 0) drawn++;
    const y = Math.floor(i / 4 / c.width);
    if (y >= top && y < bottom && d[i + 3] > 200 && Math.abs(d[i] - want[0]) < 40 &&
        Math.abs(d[i + 1] - want[1]) < 40 && Math.abs(d[i + 2] - want[2]) < 40) data++;
  }
  return {id: c.id, width: c.width, height: c.height, drawn, data};
}))()
"""


def main() -> int:
    """Screenshot the dashboard of a fresh 2-worker server under a short, bounded load."""
    import argparse
    import sys
    import threading

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from server import Server

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/dashboard.png")
    ap.add_argument("--seconds", type=float, default=25.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nh-shot-"))
    srv = Server(tmp, workers=2, config={"models": {"echo": {"provider": "echo",
                                                             "token_delay_ms": 20}}}).start()
    stop = threading.Event()
    wrk = None
    try:
        if shutil.which("wrk"):
            wrk = subprocess.Popen(["wrk", "-t1", "-c16", f"-d{int(args.seconds) + 10}s",
                                    f"{srv.url}/health"], stdout=subprocess.DEVNULL)

        def chats() -> None:
            import httpx
            with httpx.Client(base_url=srv.url, timeout=10) as c:
                while not stop.wait(0.05):
                    c.post("/v1/chat", json={"prompt": "Hello", "stream": True})
        threads = [threading.Thread(target=chats, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        b = Chromium()
        try:
            b.open(srv.url + "/dashboard", 1280, 1000)
            b.wait_for("window.nhDashboard && window.nhDashboard.updates >= 3")
            b.screenshot(args.out)
            print(f"wrote {args.out}; page errors: {b.errors() or 'none'}")
        finally:
            b.close()
    finally:
        stop.set()
        if wrk is not None:
            wrk.terminate()
            wrk.wait(10)
        srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
