"""The services a run uses, in namespaces of its own, and their cleanup.

PostgreSQL and Redis are the local servers (``TOAST_BENCH_POSTGRES``/``TOAST_TEST_POSTGRES``,
``TOAST_BENCH_REDIS``/``TOAST_TEST_REDIS`` override the URLs); S3 is moto's standalone server,
started here on a free loopback port and stopped at the end. Every run works in a namespace no
test uses: table ``bench<hex>``, Redis key prefix ``bench<hex>``, bucket ``bench<hex>``, a
temporary SQLite directory and ``memory://bench<hex>``. `Services.cleanup` removes them all,
and runs even when the benchmark fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic_toast
from pydantic_toast.backends.memory import MemoryBackend

BACKENDS = ("memory", "sqlite", "postgresql", "redis", "s3")

POSTGRES_URL = os.environ.get(
    "TOAST_BENCH_POSTGRES",
    os.environ.get("TOAST_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"),
)
REDIS_URL = os.environ.get(
    "TOAST_BENCH_REDIS", os.environ.get("TOAST_TEST_REDIS", "redis://127.0.0.1:6379/0")
)
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _die_with_parent() -> None:
    """In the moto child: get SIGTERM when the benchmark dies, even if it is killed."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass
class Services:
    """Storage URLs of the backends this run can use, and why the others are missing."""

    namespace: str = field(default_factory=lambda: f"bench{uuid.uuid4().hex[:12]}")
    urls: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    s3_endpoint: str = ""
    _tmpdir: Path | None = None
    _moto: subprocess.Popen[bytes] | None = None

    async def start(self, wanted: tuple[str, ...]) -> None:
        ns = self.namespace
        if "memory" in wanted:
            self.urls["memory"] = f"memory://{ns}"
        if "sqlite" in wanted:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="pydantic-toast-bench-"))
            self.urls["sqlite"] = f"sqlite:///{self._tmpdir / 'bench.db'}?table={ns}"
            self.versions["sqlite"] = __import__("sqlite3").sqlite_version
        if "postgresql" in wanted:
            await self._probe("postgresql", self._probe_postgres, f"{POSTGRES_URL}?table={ns}")
        if "redis" in wanted:
            await self._probe("redis", self._probe_redis, f"{REDIS_URL}?prefix={ns}")
        if "s3" in wanted:
            try:
                # From this (the main) thread: the child's death signal follows the thread
                # that started it, and nothing else runs yet.
                endpoint = self._start_moto()
            except Exception as exc:  # noqa: BLE001 - any failure means "not available"
                self.missing["s3"] = f"moto's S3 server: {type(exc).__name__}: {exc}"
            else:
                self.s3_endpoint = endpoint
                self.urls["s3"] = f"s3://{ns}/models?endpoint_url={endpoint}"

    async def _probe(self, name: str, probe: Any, url: str) -> None:
        try:
            self.versions[name] = await asyncio.wait_for(probe(), 10)
        except Exception as exc:  # noqa: BLE001 - any failure means "not available"
            self.missing[name] = f"{type(exc).__name__}: {exc}"
        else:
            self.urls[name] = url

    @staticmethod
    async def _probe_postgres() -> str:
        import asyncpg  # type: ignore[import-untyped]

        connection = await asyncpg.connect(POSTGRES_URL, timeout=5)
        try:
            return str(await connection.fetchval("SHOW server_version"))
        finally:
            await connection.close()

    @staticmethod
    async def _probe_redis() -> str:
        from redis.asyncio import Redis

        client = Redis.from_url(REDIS_URL, socket_timeout=5)
        try:
            info = await client.info("server")
            return str(info.get("redis_version", "?"))
        finally:
            await client.aclose()

    def _start_moto(self) -> str:
        import boto3  # type: ignore[import-untyped]

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(AWS_ENV)
        self._moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if self._moto.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"it did not start on port {port}") from None
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        client: Any = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=self.namespace)
        self.versions["s3"] = "moto " + __import__("moto").__version__
        return endpoint

    async def cleanup(self) -> None:
        """Close the library's connections and remove every namespace; never raises."""
        errors: list[str] = []
        for step in (self._close_library, self._drop_table, self._delete_keys):
            try:
                await asyncio.wait_for(step(), 30)
            except Exception as exc:  # noqa: BLE001 - clean up the rest, then report
                errors.append(f"{step.__name__}: {type(exc).__name__}: {exc}")
        if self._moto is not None:
            self._moto.terminate()
            try:
                self._moto.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._moto.kill()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        if "memory" in self.urls:
            MemoryBackend.clear(self.urls["memory"])
        for error in errors:
            print(f"benchmarks: cleanup: {error}", file=sys.stderr)

    async def _close_library(self) -> None:
        await pydantic_toast.aclose()

    async def _drop_table(self) -> None:
        if "postgresql" not in self.urls:
            return
        import asyncpg

        connection = await asyncpg.connect(POSTGRES_URL, timeout=10)
        try:
            await connection.execute(f'DROP TABLE IF EXISTS "{self.namespace}"')
        finally:
            await connection.close()

    async def _delete_keys(self) -> None:
        if "redis" not in self.urls:
            return
        from redis.asyncio import Redis

        client = Redis.from_url(REDIS_URL)
        try:
            batch: list[bytes] = []
            async for key in client.scan_iter(match=f"{self.namespace}:*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    await client.unlink(*batch)
                    batch = []
            if batch:
                await client.unlink(*batch)
        finally:
            await client.aclose()
