"""Real local clusters for the failover tests and the cluster benchmark.

A Redis Cluster (three primaries, three replicas), a Redis primary with a replica and three
Sentinels, and a PostgreSQL primary with a streaming standby: each started from the binaries on
this machine, on free loopback ports, in a temporary directory, and torn down by the pids it
started (never by name). PostgreSQL refuses to run as root, so when the tests run as root its
commands run as the ``postgres`` user, in a directory that user owns.

What the failover tests share is here too: `started` for their module fixtures, `delete_keys`
for the keys a test leaves, and `running` for the workers that save and load while a node dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

Setup = TypeVar("Setup")

NODE_TIMEOUT_MS = 1000


class Unavailable(Exception):
    """What a cluster needs is not on this machine (the caller skips or fails)."""


def free_ports(count: int, bus: bool = False) -> list[int]:
    """Loopback ports nothing listens on, all different. With ``bus``, ports a cluster node
    can use: below 55536, and with port + 10000 (its cluster bus) free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(20000, 45000) if bus else 0
        try:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port))
                port = sock.getsockname()[1]
                if bus:
                    with socket.socket() as bus_sock:
                        bus_sock.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        if port not in ports and all(abs(port - other) != 10000 for other in ports):
            ports.append(port)
    return ports


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:g}s")
        time.sleep(0.05)


def started(
    start: Callable[[], AbstractContextManager[Setup]],
    what: str,
    missing: tuple[type[Exception], ...] = (Unavailable,),
) -> Iterator[Setup]:
    """For a module fixture (``yield from started(redis_cluster, "a local Redis Cluster")``):
    the setup ``start`` makes, torn down after the module; one of ``missing`` raised while
    starting it skips the tests, or fails them in CI (`tests.conftest.service_missing`)."""
    from tests.conftest import service_missing

    try:
        with start() as setup:
            yield setup
    except missing as exc:
        service_missing(what, str(exc))


def delete_keys(client: Any, pattern: str) -> None:
    """Delete the keys matching ``pattern`` through a synchronous redis client (a single
    server or a cluster), then close it."""
    try:
        for key in client.scan_iter(match=pattern, count=1000):
            client.delete(key)
    finally:
        client.close()


@dataclass
class Workload:
    """Workers repeating ``step`` while a failover happens (`running`).

    ``done`` holds the moment each step finished; a step that raises one of ``tolerated``
    adds its moment to ``lost`` and the worker goes on; any other exception is kept in
    ``failures`` and ends its worker.
    """

    step: Callable[[], Awaitable[None]]
    tolerated: tuple[type[BaseException], ...] = ()
    done: list[float] = field(default_factory=list)
    lost: list[float] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _workers: list[asyncio.Task[None]] = field(default_factory=list)

    async def _work(self) -> None:
        while not self._stop.is_set():
            try:
                await self.step()
                self.done.append(time.monotonic())
            except self.tolerated:
                self.lost.append(time.monotonic())
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.failures.append(exc)
                return

    def failed(self) -> str:
        """The failures, whole, a line each: an assertion's message, never cut short as a
        list's repr would be."""
        return "\n".join(f"{type(exc).__name__}: {exc}" for exc in self.failures)

    def since(self, moment: float) -> list[float]:
        """The moments steps finished after ``moment``."""
        return [t for t in self.done if t > moment]

    async def wait_done_since(self, moment: float, count: int, timeout: float) -> list[float]:
        """Until ``count`` steps finished after ``moment`` (or ``timeout`` seconds); those."""
        deadline = time.monotonic() + timeout
        while len(self.since(moment)) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self.since(moment)

    async def stop(self) -> None:
        """Let every worker finish its step, and wait for them (again: nothing more)."""
        self._stop.set()
        await asyncio.gather(*self._workers)


@contextlib.asynccontextmanager
async def running(
    step: Callable[[], Awaitable[None]],
    workers: int,
    tolerated: tuple[type[BaseException], ...] = (),
) -> AsyncIterator[Workload]:
    """``workers`` tasks repeating ``step`` until the block ends (or `Workload.stop`)."""
    load = Workload(step, tolerated)
    load._workers = [asyncio.create_task(load._work()) for _ in range(workers)]
    try:
        yield load
    finally:
        await load.stop()


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise Unavailable(f"{name} is not on PATH")
    return path


def redis_command(port: int, *args: str, timeout: float = 5) -> str:
    """One command through redis-cli; its reply as text ("" if the server does not answer)."""
    try:
        done = subprocess.run(
            [_binary("redis-cli"), "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return ""
    return done.stdout.strip()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


@dataclass
class RedisNodes:
    """redis-server processes of one setup, by port, in a directory of their own."""

    root: Path
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    arguments: dict[int, list[str]] = field(default_factory=dict)

    def start(self, port: int, *arguments: str, binary: str = "redis-server") -> None:
        directory = self.root / str(port)
        directory.mkdir(exist_ok=True)
        self.arguments[port] = [_binary(binary), *arguments]
        self.restart(port)

    def restart(self, port: int) -> None:
        """Start the server of ``port`` again (its data and cluster state are kept)."""
        self.processes[port] = subprocess.Popen(
            self.arguments[port],
            cwd=self.root / str(port),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(
            lambda: redis_command(port, "PING") == "PONG", 10, f"redis on port {port} answers"
        )

    def live(self) -> list[int]:
        """The ports whose server is running."""
        return [port for port, process in self.processes.items() if process.poll() is None]

    def kill(self, port: int) -> None:
        """SIGKILL: the node dies at once, as a crash would."""
        process = self.processes[port]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def stop_all(self) -> None:
        for process in self.processes.values():
            _stop(process)


def server_arguments(port: int) -> list[str]:
    return [
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
        # A replica's first sync starts at once (the default waits 5 s for more replicas).
        "--repl-diskless-sync-delay",
        "0",
    ]


@dataclass
class RedisCluster:
    nodes: RedisNodes
    ports: list[int]

    @property
    def url(self) -> str:
        """A storage URL naming every node (the client needs only one to find the rest)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def cluster_nodes(self) -> list[dict[str, str]]:
        """``CLUSTER NODES`` as asked of any node that answers: id, port, role, master."""
        for port in self.ports:
            if self.nodes.processes[port].poll() is not None:
                continue
            text = redis_command(port, "CLUSTER", "NODES")
            if text:
                rows = []
                for line in text.splitlines():
                    node_id, address, flags, master, *_ = line.split()
                    rows.append(
                        {
                            "id": node_id,
                            "port": address.split("@")[0].rsplit(":", 1)[1],
                            "flags": flags,
                            "master": master,
                        }
                    )
                return rows
        raise RuntimeError("no cluster node answers")

    def primaries(self) -> list[int]:
        return [
            int(row["port"])
            for row in self.cluster_nodes()
            if "master" in row["flags"] and "fail" not in row["flags"]
        ]

    def replicas(self) -> list[int]:
        return [
            int(row["port"])
            for row in self.cluster_nodes()
            if "slave" in row["flags"] and "fail" not in row["flags"]
        ]

    def is_ok(self) -> bool:
        """Every live node says ``cluster_state:ok`` and agrees on who the primaries are."""
        states = [redis_command(port, "CLUSTER", "INFO") for port in self.nodes.live()]
        return bool(states) and all("cluster_state:ok" in state for state in states)

    def wait_ok(self, timeout: float = 30) -> None:
        wait_until(self.is_ok, timeout, "the cluster reports cluster_state:ok")

    def rejoin(self, port: int, timeout: float = 30) -> None:
        """Restart a killed node and wait until it serves as a replica, in sync. (A node
        that lost its slots comes back as a primary without any for a moment.)"""
        self.nodes.restart(port)
        wait_until(
            lambda: port in self.replicas() and len(self.primaries()) == len(self.ports) // 2,
            timeout,
            f"node {port} is a replica again",
        )
        self.wait_synced(len(self.ports) // 2, timeout)

    def wait_synced(self, replicas: int, timeout: float = 30) -> None:
        """Until ``replicas`` replicas are attached and in sync with their primaries."""

        def synced() -> bool:
            online = 0
            for port in self.primaries():
                online += redis_command(port, "INFO", "replication").count("state=online")
            return online >= replicas

        wait_until(synced, timeout, f"{replicas} replicas are in sync")


@contextlib.contextmanager
def redis_cluster(primaries: int = 3, replicas: int = 1) -> Iterator[RedisCluster]:
    """A Redis Cluster on loopback: ``primaries`` primaries with ``replicas`` replicas each."""
    redis_cli = _binary("redis-cli")
    count = primaries * (1 + replicas)
    ports = free_ports(count, bus=True)
    with tempfile.TemporaryDirectory(prefix="toast-redis-cluster-") as root:
        nodes = RedisNodes(Path(root))
        try:
            for port in ports:
                nodes.start(
                    port,
                    *server_arguments(port),
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(NODE_TIMEOUT_MS),
                    "--enable-debug-command",
                    "local",
                )
            created = subprocess.run(
                [
                    redis_cli,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{port}" for port in ports),
                    "--cluster-replicas",
                    str(replicas),
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-500:]}")
            cluster = RedisCluster(nodes, ports)
            cluster.wait_ok()
            wait_until(
                lambda: (
                    sum(1 for row in cluster.cluster_nodes() if "slave" in row["flags"])
                    == primaries * replicas
                ),
                30,
                "every replica is attached",
            )
            yield cluster
        finally:
            nodes.stop_all()


@dataclass
class RedisSentinels:
    nodes: RedisNodes
    primary: int
    replica: int
    sentinels: list[int]
    service: str = "toast"

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}"

    def current_primary(self) -> int | None:
        for port in self.sentinels:
            reply = redis_command(port, "SENTINEL", "get-master-addr-by-name", self.service)
            lines = reply.splitlines()
            if len(lines) == 2:
                return int(lines[1])
        return None


@contextlib.contextmanager
def redis_sentinels() -> Iterator[RedisSentinels]:
    """One primary, one replica and three Sentinels (quorum 2) on loopback."""
    primary, replica, *sentinels = free_ports(5)
    with tempfile.TemporaryDirectory(prefix="toast-redis-sentinel-") as root:
        nodes = RedisNodes(Path(root))
        try:
            nodes.start(primary, *server_arguments(primary))
            nodes.start(
                replica,
                *server_arguments(replica),
                "--replicaof",
                "127.0.0.1",
                str(primary),
            )
            setup = RedisSentinels(nodes, primary, replica, sentinels)
            for port in sentinels:
                config = Path(root) / f"sentinel-{port}.conf"
                config.write_text(
                    f"port {port}\n"
                    "bind 127.0.0.1\n"
                    "protected-mode no\n"
                    f"sentinel monitor {setup.service} 127.0.0.1 {primary} 2\n"
                    f"sentinel down-after-milliseconds {setup.service} 1000\n"
                    f"sentinel failover-timeout {setup.service} 5000\n"
                    f"sentinel parallel-syncs {setup.service} 1\n"
                )
                nodes.start(port, str(config), "--sentinel")
            wait_until(
                lambda: "master_link_status:up" in redis_command(replica, "INFO", "replication"),
                20,
                "the replica is in sync",
            )
            wait_until(
                lambda: all(
                    "num-other-sentinels"
                    in redis_command(port, "SENTINEL", "master", setup.service)
                    and _other_sentinels(port, setup.service) == len(sentinels) - 1
                    for port in sentinels
                ),
                20,
                "every Sentinel sees the others",
            )
            yield setup
        finally:
            nodes.stop_all()


def _other_sentinels(port: int, service: str) -> int:
    lines = redis_command(port, "SENTINEL", "master", service).splitlines()
    for name, value in zip(lines[::2], lines[1::2], strict=False):
        if name == "num-other-sentinels":
            return int(value)
    return -1


# --- PostgreSQL ------------------------------------------------------------------------------

PG_BIN = Path(os.environ.get("TOAST_PG_BIN", "/usr/lib/postgresql/15/bin"))


@dataclass
class PostgresPair:
    root: Path
    primary_port: int
    standby_port: int
    run_as: list[str]

    @property
    def url(self) -> str:
        return (
            f"postgresql://postgres@127.0.0.1:{self.primary_port},127.0.0.1:{self.standby_port}"
            "/postgres?target_session_attrs=read-write"
        )

    def pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.run_as, str(PG_BIN / "pg_ctl"), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def promote_standby(self) -> None:
        self.pg_ctl("promote", "-w", "-D", str(self.root / "standby"))

    def stop_primary(self) -> None:
        """A fast shutdown: sessions are cut, and the standby gets all WAL before the end."""
        self.pg_ctl("stop", "-m", "fast", "-D", str(self.root / "primary"))


def _postgres_user() -> list[str]:
    """How to run PostgreSQL's commands: as ourselves, or as ``postgres`` when we are root."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise Unavailable("running as root without runuser to become postgres")
    return [runuser, "-u", "postgres", "--"]


@contextlib.contextmanager
def postgres_pair() -> Iterator[PostgresPair]:
    """A PostgreSQL primary (initdb) and a streaming standby (pg_basebackup -R) on loopback."""
    for name in ("initdb", "pg_ctl", "pg_basebackup", "postgres"):
        if not (PG_BIN / name).exists():
            raise Unavailable(f"{PG_BIN / name} does not exist")
    run_as = _postgres_user()
    primary_port, standby_port = free_ports(2)
    root = Path(tempfile.mkdtemp(prefix="toast-pg-failover-"))
    if run_as:
        shutil.chown(root, "postgres", "postgres")
    pair = PostgresPair(root, primary_port, standby_port, run_as)

    def run(*args: str) -> None:
        done = subprocess.run([*run_as, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {done.stderr[-800:]}")

    def start(name: str, port: int) -> None:
        run(
            str(PG_BIN / "pg_ctl"),
            "start",
            "-w",
            "-D",
            str(root / name),
            "-l",
            str(root / f"{name}.log"),
            "-o",
            f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={root}",
        )

    try:
        run(
            str(PG_BIN / "initdb"),
            "-D",
            str(root / "primary"),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
        )
        with (root / "primary" / "pg_hba.conf").open("a") as hba:
            hba.write("host replication all 127.0.0.1/32 trust\n")
        start("primary", primary_port)
        run(
            str(PG_BIN / "pg_basebackup"),
            "-h",
            "127.0.0.1",
            "-p",
            str(primary_port),
            "-U",
            "postgres",
            "-D",
            str(root / "standby"),
            "-R",
            "-X",
            "stream",
            "--no-sync",
        )
        start("standby", standby_port)
        yield pair
    finally:
        for name in ("standby", "primary"):
            if (root / name / "postmaster.pid").exists():
                subprocess.run(
                    [
                        *run_as,
                        str(PG_BIN / "pg_ctl"),
                        "stop",
                        "-m",
                        "immediate",
                        "-D",
                        str(root / name),
                    ],
                    capture_output=True,
                    timeout=60,
                )
        shutil.rmtree(root, ignore_errors=True)
