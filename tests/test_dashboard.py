"""The dashboard in headless Chromium: no console errors, every chart drawn with
data, readable at laptop and phone widths, screenshots taken."""

from __future__ import annotations

import struct
import threading

import httpx
import pytest
from chromium import CANVAS_CHECK, Chromium, chromium_path

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed "
                                "(.ci/run installs it)")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_dashboard_in_chromium(make_server, tmp_path):
    srv = make_server(workers=2, config={"models": {"echo": {"provider": "echo",
                                                             "token_delay_ms": 5}}})
    stop = threading.Event()
    sent = [0]

    def load() -> None:
        # light, bounded load so every chart has something to draw
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            for i in range(3000):
                if stop.is_set():
                    return
                if i % 10 == 0:
                    c.post("/v1/chat", json={"prompt": "Hello", "stream": True})
                else:
                    c.get("/health")
                sent[0] += 1
                stop.wait(0.005)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    try:
        browser = Chromium()
        try:
            browser.open(srv.url + "/dashboard", 1280, 900)
            # a few refreshes, at least one after some seconds of load have closed
            browser.wait_for("window.nhDashboard && window.nhDashboard.updates >= 3 && "
                             "window.nhDashboard.last.window.requests > 0 && "
                             "window.nhDashboard.last.window.tokens_out > 0", timeout=90)
            canvases = {c["id"]: c for c in browser.evaluate(CANVAS_CHECK)}
            assert set(canvases) == {"c-rps", "c-lat", "c-conn", "c-tok", "c-workers"}
            for c in canvases.values():
                assert c["width"] > 200 and c["height"] > 50, c
                assert c["drawn"] > 500, c        # axes, labels, lines
                assert c["data"] > 30, c          # the data line / bars in the chart's colour
            # the tiles and tables are filled from /stats
            assert browser.evaluate("document.getElementById('t-workers').textContent") == "2"
            rows = browser.evaluate("document.querySelectorAll('#routes tr').length")
            assert rows >= 3
            status = browser.evaluate("document.getElementById('status').textContent")
            assert status.startswith("live")
            shot = browser.screenshot(tmp_path / "dashboard-laptop.png")
            assert png_size(shot)[0] == 1280

            # a phone: one column, nothing wider than the screen, charts redrawn
            browser.viewport(390, 844, mobile=True)
            n = browser.evaluate("window.nhDashboard.updates")
            browser.wait_for(f"window.nhDashboard.updates > {n + 1}", timeout=60)
            overflow = browser.evaluate(
                "document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 1
            widths = browser.evaluate(
                "Array.from(document.querySelectorAll('canvas')).map(c => c.clientWidth)")
            assert all(80 < w <= 390 for w in widths), widths
            canvases = {c["id"]: c for c in browser.evaluate(CANVAS_CHECK)}
            assert all(c["data"] > 10 for c in canvases.values()), canvases
            shot = browser.screenshot(tmp_path / "dashboard-phone.png")
            assert png_size(shot)[0] == 390

            assert browser.errors() == []
        finally:
            browser.close()
    finally:
        stop.set()
        t.join(30)
    assert sent[0] > 0


def test_dashboard_shows_figures_per_api_key(make_server):
    """[auth] on: the API keys table (requests, tokens, 403s, 429s per key) and
    the 401s by reason, filled from /stats after real refusals; hidden without [auth]."""
    import hashlib
    key = "nh-dash-key-0123456789"
    srv = make_server(workers=1, config={
        "auth": {"enabled": True, "keys": [{"name": "team-a", "rpm": 2, "models": ["echo"],
                                            "sha256": hashlib.sha256(key.encode()).hexdigest()}]},
        "models": {"echo": {"provider": "echo"}, "big": {"provider": "echo"}}})
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        h = {"Authorization": f"Bearer {key}"}
        codes = [c.post("/v1/chat", json={"prompt": "Hi"}, headers=h).status_code
                 for _ in range(3)]
        codes.append(c.post("/v1/chat", json={"prompt": "Hi", "model": "big"},
                            headers=h).status_code)
        codes.append(c.post("/v1/chat", json={"prompt": "Hi"}).status_code)
        assert codes == [200, 200, 429, 403, 401]
        figs = c.get("/stats").json()["auth"]["keys"]["team-a"]
    browser = Chromium()
    try:
        browser.open(srv.url + "/dashboard", 1280, 900)
        browser.wait_for("window.nhDashboard && window.nhDashboard.updates >= 1", timeout=60)
        assert browser.evaluate("document.getElementById('keys-card').hidden") is False
        rows = browser.evaluate("Array.from(document.querySelectorAll('#keys tr')).map("
                                "r => Array.from(r.children).map(c => c.textContent))")
        assert rows[0] == ["key", "requests", "tokens in", "tokens out", "403 model", "429 limit"]
        name, requests, tin, tout, forbidden, limited = rows[1]
        assert (name, requests, forbidden, limited) == ("team-a", "2", "1", "1")
        assert int(tin.replace(",", "")) == figs["tokens_in"] > 0
        assert int(tout.replace(",", "")) == figs["tokens_out"] > 0
        text = browser.evaluate("document.getElementById('unauthorized').textContent")
        assert "missing 1" in text and "invalid 0" in text
        assert browser.errors() == []
    finally:
        browser.close()
    plain = make_server(workers=1)
    browser = Chromium()
    try:
        browser.open(plain.url + "/dashboard", 1280, 900)
        browser.wait_for("window.nhDashboard && window.nhDashboard.updates >= 1", timeout=60)
        assert browser.evaluate("document.getElementById('keys-card').hidden") is True
    finally:
        browser.close()


def test_dashboard_shows_each_deployments_breaker(make_server, fake_upstream):
    """The Deployments table shows each deployment's breaker (the down
    upstream's open), in-flight requests, retries and hedges from /stats
    "router", and the router table its counts per model."""
    from test_top import breaker_server
    srv, down = breaker_server(make_server, fake_upstream)
    figs = srv.stats()["router"]["m"]
    browser = Chromium()
    try:
        browser.open(srv.url + "/dashboard", 1280, 900)
        browser.wait_for("window.nhDashboard && window.nhDashboard.updates >= 1", timeout=60)

        def rows(table: str) -> list[list[str]]:
            return browser.evaluate(f"Array.from(document.querySelectorAll('#{table} tr')).map("
                                    "r => Array.from(r.children).map(c => c.textContent))")
        deps = rows("deployments")
        assert deps[0][:4] == ["deployment", "origin", "breaker", "in flight"]
        assert "retries" in deps[0] and "hedges" in deps[0]
        by_origin = {r[1]: r for r in deps[1:]}
        assert by_origin[down][2] == "open" and by_origin[fake_upstream.url][2] == "closed"
        assert by_origin[down][3] == "0"
        router = rows("router")
        assert router[0] == ["model", "requests", "failed", "retries", "hedges", "fallbacks",
                             "retries refused"]
        assert router[1] == ["m", *(str(figs[k]) for k in ("requests", "failed", "retries",
                                                          "hedges", "fallbacks",
                                                          "retries_refused"))]
        assert browser.errors() == []
    finally:
        browser.close()
