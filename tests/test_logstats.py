"""plugins/logstats.py against real servers: one line per interval for the whole
server (never two for one interval, none missing), figures that add up to
/stats, the file reopened on USR1, and the error log when no path is set."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from server import ROOT, wait_for

PLUGINS = str(ROOT / "plugins")
CHAT = json.dumps({"prompt": "Hello"})


def logstats_config(**options: object) -> dict:
    return {"plugins": {"paths": [PLUGINS], "enabled": ["logstats"], "logstats": options}}


def read_lines(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def test_one_line_per_interval_for_the_server_adding_up_to_stats(make_server, tmp_path):
    out = tmp_path / "stats.jsonl"
    srv = make_server(workers=2, config=logstats_config(interval_s=1, path=str(out)))
    for _ in range(10):
        assert srv.request("GET", "/health")[0] == 200
    for _ in range(5):
        assert srv.request("POST", "/v1/chat", CHAT)[0] == 200
    for _ in range(3):
        assert srv.request("GET", "/nope")[0] == 404
    stats = srv.stats()  # not counted in itself; in the lines once its second is over
    total = stats["responses"] + 1

    def caught_up() -> list[dict] | None:
        lines = read_lines(out)
        return lines if sum(x["requests"] for x in lines) == total else None

    lines = wait_for(caught_up, 15, what="the lines to add up to /stats")
    ends = [x["end"] for x in lines]
    # one line per interval, for the whole server: consecutive, none twice
    assert ends == list(range(ends[0], ends[0] + len(ends))), ends
    assert all(x["start"] == x["end"] - 1 and x["interval_s"] == 1 for x in lines)
    assert sum(x["status"]["4xx"] for x in lines) == stats["status"]["4xx"] == 3
    assert sum(x["status"]["2xx"] for x in lines) == stats["status"]["2xx"] + 1
    assert sum(x["tokens_out"] for x in lines) == stats["tokens_out"] > 0
    assert sum(x["tokens_in"] for x in lines) == stats["tokens_in"] > 0

    def route_sum(path: str) -> int:
        return sum(x["routes"].get(path, {}).get("requests", 0) for x in lines)

    assert route_sum("/v1/chat") == stats["routes"]["/v1/chat"]["requests"] == 5
    assert route_sum("/health") == stats["routes"]["/health"]["requests"]
    assert route_sum("/stats") == 1
    echo = [x["models"]["echo"] for x in lines if "echo" in x["models"]]
    assert sum(m["requests"] for m in echo) == stats["models"]["echo"]["requests"] == 5
    busy = [x for x in lines if x["requests"]]
    assert all(x["rps"] == x["requests"] and x["workers"] == 2 for x in busy)
    assert all(set(x["latency_ms"]) == {"p50", "p90", "p99"} for x in busy)
    assert all(x["active_streams"] == 0 for x in lines)


def test_the_file_is_reopened_on_usr1(make_server, tmp_path):
    out = tmp_path / "stats.jsonl"
    srv = make_server(workers=2, config=logstats_config(interval_s=1, path=str(out)))
    wait_for(lambda: len(read_lines(out)) >= 2, 10, what="two lines")
    rotated = tmp_path / "stats.jsonl.1"
    out.rename(rotated)
    srv.send_signal(signal.SIGUSR1)
    wait_for(lambda: len(read_lines(out)) >= 2, 10, what="lines in the new file")
    n = len(read_lines(rotated))
    wait_for(lambda: len(read_lines(out)) >= 4, 10, what="more lines in the new file")
    assert len(read_lines(rotated)) == n  # the old file is no longer written
    ends = [x["end"] for x in read_lines(rotated) + read_lines(out)]
    assert len(ends) == len(set(ends))


def test_without_a_path_the_lines_go_to_the_error_log(make_server):
    srv = make_server(workers=1, config=logstats_config(interval_s=1))

    def lines() -> list[dict]:
        return [json.loads(x[x.index("{"):])
                for x in srv.log().splitlines() if '"interval_s":1' in x]

    got = wait_for(lambda: len(lines()) >= 2 and lines(), 10, what="lines in the error log")
    assert all(x["interval_s"] == 1 and "requests" in x for x in got)
