"""Pytest plugin: only the tests that need no server (the core and the embedded backends).

CI runs the whole suite on one Python and, with ``python -m pytest -p tests.embedded_only``,
this part of it on the others: what differs between Python versions is the library's own
code and the standard library's SQLite, not the servers.

A test needs a server when it asks for one of the server fixtures, carries the ``server``
mark, has a server backend's name as a word of its own name or its module's
(``test_postgresql_restart``, ``test_redis.py``), or is parametrized with one
(``"postgresql"``, ``"redis"``, ``"s3"``, ``"celery"``, or a value starting with one, such as
``"redis_cache.py"``, alone or in a tuple). A test that reaches a
server in another way (``request.getfixturevalue`` inside the test) fails here with a message
saying so, rather than quietly costing the time this selection is meant to save.
"""

from __future__ import annotations

import pytest

SERVER_FIXTURES = frozenset({"postgres_server", "redis_server", "s3_endpoint", "rabbitmq_url"})
# Celery's tests and example need its broker (RabbitMQ) and result backend (Redis).
SERVER_NAMES = ("postgresql", "postgres", "redis", "s3", "celery", "rabbitmq")


def needs_server(item: pytest.Item) -> bool:
    if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return True
    if item.get_closest_marker("server") is not None:
        return True
    name = getattr(item, "originalname", item.name)
    words = {*name.split("_"), *item.path.stem.split("_")}
    if words.intersection(SERVER_NAMES):
        return True
    callspec = getattr(item, "callspec", None)
    params = callspec.params.values() if callspec is not None else ()
    # A parameter may be a name or a tuple of names (two storages at once).
    names = [n for v in params for n in (v if isinstance(v, tuple) else (v,)) if isinstance(n, str)]
    return any(name.startswith(SERVER_NAMES) for name in names)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    server = [item for item in items if needs_server(item)]
    if server:
        config.hook.pytest_deselected(items=server)
        items[:] = [item for item in items if not needs_server(item)]


def pytest_fixture_setup(fixturedef: pytest.FixtureDef[object]) -> None:
    if fixturedef.argname in SERVER_FIXTURES:
        pytest.fail(
            f"this test reaches a server ({fixturedef.argname}) but was not deselected: "
            "mark it @pytest.mark.server (see tests/embedded_only.py)",
            pytrace=False,
        )
