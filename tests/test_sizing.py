"""The shared-memory block is sized from the config, with room to grow, and
says what to raise when something no longer fits (stats/sizing.py)."""

from __future__ import annotations

import logging
import signal

import httpx
from server import wait_for

from neurohttp import config
from neurohttp.app import App
from neurohttp.messages import Response
from neurohttp.stats.sizing import CORE_ROUTES, PLUGIN_ROUTES, geometry_for


def _cfg(models: int, workers: int = 2, **stats: int) -> config.Config:
    return config.from_dict({
        "server": {"workers": workers}, "stats": dict(stats),
        "models": {f"m{i}": {"provider": "echo"} for i in range(models)}})


def test_sizes_follow_the_config_with_room_to_grow():
    g = geometry_for(_cfg(models=1))
    assert g.models == 1 + 1 + 8                      # other, echo, room for 8 more
    assert g.routes == 1 + CORE_ROUTES + g.models + PLUGIN_ROUTES
    assert g.max_workers == 2 + 8 and g.nslots == 2 * 10 + 1
    big = geometry_for(_cfg(models=40, workers=16))
    assert big.models == 1 + 40 + 40 and big.max_workers == 32
    assert big.routes > 40 + CORE_ROUTES                # /v1/models/<name> for each
    set_ = geometry_for(_cfg(models=1, max_workers=3, max_routes=20, max_models=5))
    assert (set_.max_workers, set_.routes, set_.models) == (3, 20, 5)
    assert geometry_for(config.from_dict({"state": {"max_keys": 1000}})).open_keys == 1024


def test_routes_past_the_room_count_as_other_and_say_so_once(caplog):
    app = App(stats_routes=3)  # "other" and two named routes
    with caplog.at_level(logging.ERROR, logger="neurohttp"):
        for path in ("/a", "/b", "/c", "/d"):
            app.add_route("GET", path, lambda req: Response(b""))
    assert app.route_names == ["other", "/a", "/b"]
    assert "/c" not in app.route_index and "/c" in app.routes  # served, counted as other
    said = [r.getMessage() for r in caplog.records if "max_routes" in r.getMessage()]
    assert len(said) == 1 and "/c" in said[0] and "[stats] max_routes" in said[0]


def test_twenty_models_are_all_counted_by_name(make_server):
    # the old block had room for 7 models and 23 routes: models past the 7th and
    # their /v1/models/<name> routes were counted as "other"
    models = {f"model-{i:02d}": {"provider": "echo"} for i in range(20)}
    srv = make_server(workers=1, config={"models": models})
    with httpx.Client(base_url=srv.url, timeout=20) as c:
        for name in models:
            r = c.post("/v1/chat/completions",
                       json={"model": name, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
            assert c.get(f"/v1/models/{name}").status_code == 200
    d = srv.stats()
    assert all(d["models"][name]["requests"] == 1 for name in models)
    assert "other" not in d["models"]
    assert all(d["routes"][f"/v1/models/{name}"]["requests"] == 1 for name in models)
    assert d["routes"]["/v1/chat/completions"]["requests"] == 20
    assert "other" not in d["routes"]


def test_ttin_past_the_block_room_is_refused_with_the_key_named(make_server):
    srv = make_server(workers=2, config={"server": {"workers": 2}, "stats": {"max_workers": 2}},
                      cli_workers=False)
    srv.send_signal(signal.SIGTTIN)  # a third: no room
    wait_for(lambda: "raise [stats] max_workers" in srv.log(), 10, what="TTIN refused")
    assert "TTIN refused: 3 workers" in srv.log()
    assert srv.request("GET", "/health")[0] == 200
    # a reload (two generations at once) still fits: the block has 2 slots per worker
    old = set(srv.worker_pids())
    srv.send_signal(signal.SIGHUP)

    def replaced() -> bool:
        d = srv.stats()
        return (d["master"]["generation"] == 2 and len(d["workers"]) == 2
                and all(w["state"] == "ready" for w in d["workers"])
                and not old & {w["pid"] for w in d["workers"]})
    wait_for(replaced, 30, what="the reload's workers serving")
    assert srv.request("GET", "/health")[0] == 200
    assert "no free stats slot" not in srv.log()
