"""Fixtures of the Redis runtime tests: the session's private redis-server, a fresh key prefix per test."""

from __future__ import annotations

import itertools

import pytest

from tests.redis.server import RedisServer, session_server

_COUNTER = itertools.count()


@pytest.fixture
def server(request: pytest.FixtureRequest) -> RedisServer:
    """The session's private redis-server (unix socket, no TCP port, AOF on)."""
    return session_server(request.config)


@pytest.fixture
def url(server: RedisServer) -> str:
    return server.url


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test alone, so tests never see each other's runs, queues or timers."""
    return f"t{next(_COUNTER)}"


@pytest.fixture(autouse=True)
def _no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWDSL_LM", raising=False)
    monkeypatch.delenv("FLOWDSL_REDIS_URL", raising=False)
    monkeypatch.delenv("FLOWDSL_REDIS_PREFIX", raising=False)
