"""Fixtures: real neurohttpd servers on 127.0.0.1, stopped by pid after use."""

from __future__ import annotations

import pytest
from server import Server


@pytest.fixture
def make_server(tmp_path):
    """Factory: make_server(workers=2, config={...}) -> a started Server.

    Every server it made is stopped (and checked for leftover shared memory)
    when the test ends.
    """
    made: list[Server] = []

    def factory(workers: int = 2, config: dict | None = None, start: bool = True,
                **kw) -> Server:
        srv = Server(tmp_path / f"srv{len(made)}", workers=workers, config=config, **kw)
        made.append(srv)
        if start:
            srv.start()
        return srv

    yield factory
    errors = []
    for srv in made:
        try:
            srv.stop()
        except AssertionError as e:
            errors.append(str(e))
        finally:
            srv.kill()
    if errors:
        pytest.fail("\n".join(errors))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One 2-worker server shared by a module's tests (they must leave it healthy)."""
    srv = Server(tmp_path_factory.mktemp("server"), workers=2).start()
    yield srv
    try:
        code = srv.stop()
        assert code == 0, f"server exited {code}:\n{srv.log()}"
    finally:
        srv.kill()


@pytest.fixture
def fake_upstream(tmp_path):
    """A fake OpenAI-compatible upstream (tests/fake_upstream.py) in its own
    process on 127.0.0.1, stopped by pid when the test ends."""
    from fake_upstream import FakeUpstream

    up = FakeUpstream(tmp_path / "fake_upstream").start()
    yield up
    up.stop()
