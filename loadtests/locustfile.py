"""Locust load for NeuroHTTP: a user that probes /health, chats, streams and reads /stats.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8080 \
           --headless -u 200 -r 50 -t 60s

Streaming requests read the whole NDJSON stream and fail unless it ends with
the final {"done": true} line and its tokens join into the answer.
"""

from __future__ import annotations

import json

from locust import HttpUser, between, task


class AIClient(HttpUser):
    wait_time = between(0.01, 0.1)

    @task(5)
    def health(self) -> None:
        with self.client.get("/health", catch_response=True) as r:
            if r.status_code != 200 or r.json().get("status") != "ok":
                r.failure(f"health: {r.status_code} {r.text[:100]}")

    @task(10)
    def chat(self) -> None:
        with self.client.post("/v1/chat", json={"prompt": "Hello"}, catch_response=True) as r:
            if r.status_code != 200 or "response" not in r.json():
                r.failure(f"chat: {r.status_code} {r.text[:100]}")

    @task(3)
    def stream(self) -> None:
        with self.client.post("/v1/chat", json={"prompt": "Hello", "stream": True},
                              stream=True, catch_response=True, name="/v1/chat (stream)") as r:
            if r.status_code != 200:
                r.failure(f"stream: {r.status_code}")
                return
            tokens, last = [], None
            for line in r.iter_lines():
                if not line:
                    continue
                last = json.loads(line)
                if "token" in last:
                    tokens.append(last["token"])
            if not last or not last.get("done") or not tokens:
                r.failure("stream ended without tokens or without its final line")

    @task(1)
    def stats(self) -> None:
        with self.client.get("/stats", catch_response=True) as r:
            if r.status_code != 200 or "requests" not in r.json():
                r.failure(f"stats: {r.status_code}")
