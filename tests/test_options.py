"""Driver options at class definition: those that would break the backend are refused with
their reason, an unknown one is answered with the backend's own options, and a Redis URL
names its database once."""

from __future__ import annotations

import re
from typing import Any

import pytest

pytest.importorskip("redis")

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from pydantic_toast import ExternalBaseModel, ExternalConfigDict, StorageValidationError
from pydantic_toast.backends.redis import RedisBackend
from pydantic_toast.backends.redis_sentinel import RedisSentinelBackend


def define_item(storage: str) -> type[ExternalBaseModel]:
    class Item(ExternalBaseModel):
        model_config = ExternalConfigDict(storage=storage)
        name: str

    return Item


def refused(storage: str) -> str:
    with pytest.raises(StorageValidationError) as caught:
        define_item(storage)
    return str(caught.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "redis://127.0.0.1:6379/1?decode_responses=true",
            "redis option 'decode_responses' is refused: records are read as bytes; replies "
            "decoded to str would make every record read back as corrupt",
        ),
        (
            "redis://127.0.0.1:6379/1?connection_class=foo",
            "redis option 'connection_class' is refused: the URL's scheme chooses it",
        ),
        (
            "redis://127.0.0.1:6379/1?event_dispatcher=x",
            "redis option 'event_dispatcher' is refused: it is one of redis-py's internals",
        ),
        (
            "redis://127.0.0.1:6379/1?parser_class=x",
            "redis option 'parser_class' is refused: the replies are read by redis-py's own parser",
        ),
        ("redis://127.0.0.1:6379/1?encoding=latin-1", "redis option 'encoding' is refused"),
        ("redis://127.0.0.1:6379/1?host=elsewhere", "redis option 'host' is refused"),
        (
            "redis://127.0.0.1:6379/1?retry=3",
            "redis option 'retry' takes a Python object, which a URL cannot carry: pass it as "
            "a keyword argument to the backend",
        ),
        (
            "redis+cluster://127.0.0.1:7000?decode_responses=true",
            "redis cluster option 'decode_responses' is refused: records are read as bytes",
        ),
        (
            "redis+cluster://127.0.0.1:7000?startup_nodes=x",
            "redis cluster option 'startup_nodes' is refused: the URL names the nodes",
        ),
        (
            "redis+sentinel://127.0.0.1:26379/mymaster?decode_responses=1",
            "redis sentinel option 'decode_responses' is refused: records are read as bytes",
        ),
    ],
)
def test_driver_options_that_break_the_backend_are_refused_at_definition(
    url: str, message: str
) -> None:
    assert message in refused(url)


def test_driver_options_that_break_the_backend_are_refused_as_keywords() -> None:
    with pytest.raises(StorageValidationError, match="'decode_responses' is refused"):
        RedisBackend("redis://127.0.0.1/0", decode_responses=True)
    with pytest.raises(StorageValidationError, match="'connection_class' is refused"):
        RedisBackend("redis://127.0.0.1/0", connection_class=object)
    # A Python object redis-py takes is a keyword's business, and reaches it.
    retry = Retry(NoBackoff(), 1)
    backend = RedisBackend("redis://127.0.0.1/0", retry=retry)
    assert backend._client_options["retry"] is retry


def known_options(message: str) -> tuple[list[str], list[str]]:
    """The backend's own options and the driver's, as an unknown-option error lists them."""
    found = re.search(r"; \w+ options: ([\w, ]+); passed to the driver: ([\w, ]+)$", message)
    assert found is not None, message
    return found[1].split(", "), found[2].split(", ")


def test_an_unknown_postgresql_option_lists_every_known_one() -> None:
    message = refused("postgresql://postgres@127.0.0.1/test?foo=1")
    assert "unknown PostgreSQL option 'foo'" in message
    own, driver = known_options(message)
    assert own == ["table", "min_size", "max_size", "timeout", "command_timeout"]
    assert {"sslmode", "sslrootcert", "target_session_attrs", "application_name"} <= set(driver)


def test_an_unknown_redis_option_lists_its_own_first_and_no_internals() -> None:
    message = refused("redis://127.0.0.1:6379/1?foo=1")
    assert "unknown redis option 'foo'" in message
    own, driver = known_options(message)
    assert own == ["prefix", "ttl", "timeout", "max_connections", "wait_replicas", "wait_timeout"]
    assert {"client_name", "health_check_interval", "ssl_ca_certs", "db"} <= set(driver)
    internals = {"connection_class", "event_dispatcher", "decode_responses", "parser_class"}
    assert not internals & set(driver)
    # Python objects are no option a URL can take; a keyword can.
    assert "retry" not in driver
    with pytest.raises(StorageValidationError) as caught:
        RedisBackend("redis://127.0.0.1/1", foo=1)
    assert "retry" in known_options(str(caught.value))[1]


@pytest.mark.parametrize(
    ("url", "keywords", "message"),
    [
        (
            "redis://127.0.0.1:6379/1?db=2",
            {},
            "redis option db='2' conflicts with the database in the URL's path (1): name the "
            "database once, in the path",
        ),
        ("redis://127.0.0.1:6379/1", {"db": 2}, "redis option db='2' conflicts"),
        ("rediss://127.0.0.1:6379/0?db=x", {}, "Invalid value for 'db'"),
        (
            "redis+sentinel://127.0.0.1:26379/mymaster/1?db=2",
            {},
            "redis sentinel option db='2' conflicts with the database in the URL's path (1)",
        ),
    ],
)
def test_a_db_option_that_conflicts_with_the_path_is_refused(
    url: str, keywords: dict[str, Any], message: str
) -> None:
    backend = RedisSentinelBackend if url.startswith("redis+sentinel") else RedisBackend
    with pytest.raises(StorageValidationError) as caught:
        backend(url, **keywords)
    assert message in str(caught.value)
    if not keywords:
        assert message in refused(url)


async def test_a_db_option_that_agrees_with_the_path_or_stands_alone_is_used() -> None:
    for url, db in [
        ("redis://127.0.0.1:6379/1?db=1", 1),
        ("redis://127.0.0.1:6379?db=3", 3),
        ("redis://127.0.0.1:6379/?db=4", 4),
        ("redis://127.0.0.1:6379/5", 5),
    ]:
        client = RedisBackend(url)._new_client()  # builds the pool; connects to nothing
        assert client.connection_pool.connection_kwargs["db"] == db, url
        await client.aclose()


@pytest.mark.filterwarnings("ignore:Call to '__init__' function with deprecated usage")
def test_cluster_options_in_a_url_are_typed() -> None:
    from pydantic_toast.backends.redis_cluster import RedisClusterBackend

    url = "redis+cluster://127.0.0.1:7000?read_from_replicas=false&reinitialize_steps=7"
    client = RedisClusterBackend(url)._new_client()
    assert (client.read_from_replicas, client.reinitialize_steps) == (False, 7)
    client = RedisClusterBackend(
        "redis+cluster://127.0.0.1:7000?read_from_replicas=1"
    )._new_client()
    assert client.read_from_replicas is True
    assert refused("redis+cluster://127.0.0.1:7000?read_from_replicas=maybe").endswith(
        "redis cluster option read_from_replicas must be true or false, not 'maybe'"
    )
    assert "reinitialize_steps must be" in refused(
        "redis+cluster://127.0.0.1:7000?reinitialize_steps=-1"
    )
    assert refused("redis+cluster://127.0.0.1:7000?cluster_error_retry_attempts=3").endswith(
        "redis cluster option 'cluster_error_retry_attempts' is refused: redis-py does not "
        "retry here: the model's retries (ExternalConfigDict) do"
    )
