"""Every code block of README.md and docs/ runs as it is, or says that it is a fragment.

Each Python block is run as a program of its own, in a subprocess whose working directory is
a temporary directory shared by the blocks of one page, in their order (so a page can show two
programs run one after the other, as two deployments would). A block that is only a piece of a
program has ``<!-- fragment -->`` on the line just before its opening fence, and is not run.
A block that includes a file (``--8<-- "examples/x.py"``, the docs build inlines it) is that
example, which tests/test_examples.py runs.

Storage URLs in a runnable block: the embedded ones need nothing (``sqlite:///name.db`` lands
in the page's directory); the servers are the test servers, as CI has them:

- ``postgresql://postgres@localhost/test``: the tables the block names (``?table=``, else
  ``external_models``) are dropped before it runs;
- ``redis://localhost:6379/0``: the keys under the prefix the block names (``?prefix=``, else
  ``pydantic_toast``) are deleted before it runs;
- ``s3://bucket/prefix``: on moto's S3 server (``AWS_ENDPOINT_URL`` and test credentials in
  the environment, as the usual AWS environment would give them), the bucket created empty.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

import pydantic_toast

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FRAGMENT = "<!-- fragment -->"
PYTHON = {"python", "py", "python3"}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[^\s`{]*)")
INCLUDE = re.compile(r'^--8<-- "(?P<path>[^"]+)"$')
URLS = {
    "postgresql": re.compile(r"postgres(?:ql)?://[^\s\"'`]+"),
    "redis": re.compile(r"rediss?://[^\s\"'`]+"),
    "s3": re.compile(r"s3://[^\s\"'`]+"),
}
OTHER_SERVERS = re.compile(r"amqp://|redis\+(?:cluster|sentinel)://|rediss\+cluster://")
LOCAL_HOSTS = {"localhost", "127.0.0.1"}
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    fragment: bool

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def urls(self, kind: str) -> list[str]:
        return URLS[kind].findall(self.code)

    @property
    def includes(self) -> list[str]:
        lines = [line.strip() for line in self.code.splitlines() if line.strip()]
        matches = [INCLUDE.match(line) for line in lines]
        return [match["path"] for match in matches if match] if all(matches) and lines else []

    @property
    def needs_server(self) -> bool:
        return any(self.urls(kind) for kind in URLS) or bool(OTHER_SERVERS.search(self.code))


def blocks_of(page: Path) -> Iterator[Block]:
    lines = page.read_text().splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        end = index + 1
        while end < len(lines) and not (
            lines[end].startswith(indent)
            and lines[end].strip().startswith(fence)
            and not lines[end].strip().strip(fence[0])
        ):
            end += 1
        assert end < len(lines), f"{page.relative_to(ROOT)}:{index + 1}: unclosed code block"
        previous = lines[index - 1].strip() if index else ""
        code = textwrap.dedent("\n".join(lines[index + 1 : end])) + "\n"
        yield Block(page, index + 1, opening["lang"].lower(), code, previous == FRAGMENT)
        index = end + 1


BLOCKS = [block for page in PAGES for block in blocks_of(page)]
RUNNABLE = [b for b in BLOCKS if b.lang in PYTHON and not b.fragment and not b.includes]


def test_the_pages_have_runnable_blocks() -> None:
    """The extraction finds what it is meant to: no silent pass on a parser that finds nothing."""
    assert {block.page.name for block in RUNNABLE} >= {"README.md", "tutorial.md"}
    assert len(RUNNABLE) >= 15


def test_every_block_names_its_language() -> None:
    unnamed = [block.where for block in BLOCKS if not block.lang]
    assert not unnamed, f"code blocks without a language (```python, ```bash ...): {unnamed}"


def test_every_fragment_mark_stands_just_before_a_block() -> None:
    opening_lines = {(block.page, block.line) for block in BLOCKS}
    stray = [
        f"{page.relative_to(ROOT)}:{number}"
        for page in PAGES
        for number, line in enumerate(page.read_text().splitlines(), start=1)
        if line.strip() == FRAGMENT and (page, number + 1) not in opening_lines
    ]
    assert not stray, f"{FRAGMENT} marks no code block (it goes on the line just before): {stray}"


def test_included_files_are_examples_that_the_tests_run() -> None:
    included = [(block.where, path) for block in BLOCKS for path in block.includes]
    assert included, "the backend guide includes its examples"
    for where, path in included:
        assert (ROOT / path).is_file(), f"{where} includes {path}, which does not exist"
        assert Path(path).parent == Path("examples"), f"{where} includes {path}: not an example"


def test_the_version_lives_in_pyproject_and_the_changelog_names_it() -> None:
    with open(ROOT / "pyproject.toml", "rb") as file:
        version = tomllib.load(file)["project"]["version"]
    assert pydantic_toast.__version__ == version
    assert "__version__" not in pydantic_toast.__all__
    changelog = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\]", changelog, flags=re.MULTILINE)
    assert headings[0] == "Unreleased"
    assert version in headings, f"CHANGELOG.md has no section for {version}: {headings}"


# --- running the blocks -------------------------------------------------------------------


@pytest.fixture(scope="session")
def page_directories(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, Path]:
    return {page: tmp_path_factory.mktemp(page.stem) for page in PAGES}


async def _drop_tables(server: str, tables: list[str]) -> None:
    import asyncpg

    connection = await asyncpg.connect(server, timeout=10)
    try:
        for table in tables:
            await connection.execute(f'DROP TABLE IF EXISTS "{table}"')
    finally:
        await connection.close()


def _prepare_postgresql(block: Block, request: pytest.FixtureRequest) -> None:
    request.getfixturevalue("postgres_server")
    for url in block.urls("postgresql"):
        parts = urlsplit(url)
        assert parts.hostname in LOCAL_HOSTS, f"{block.where}: {url} is not the local server"
        tables = parse_qs(parts.query).get("table", ["external_models"])
        assert all(IDENTIFIER.fullmatch(table) for table in tables), (block.where, tables)
        asyncio.run(_drop_tables(parts._replace(query="").geturl(), tables))


def _prepare_redis(block: Block, request: pytest.FixtureRequest) -> None:
    request.getfixturevalue("redis_server")
    import redis

    for url in block.urls("redis"):
        parts = urlsplit(url)
        assert parts.hostname in LOCAL_HOSTS, f"{block.where}: {url} is not the local server"
        prefix = parse_qs(parts.query).get("prefix", ["pydantic_toast"])[0]
        client = redis.Redis.from_url(parts._replace(query="").geturl())
        try:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


def _prepare_s3(block: Block, request: pytest.FixtureRequest) -> dict[str, str]:
    endpoint: str = request.getfixturevalue("s3_endpoint")
    import boto3

    client: Any = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for url in block.urls("s3"):
        bucket = urlsplit(url).netloc
        existing = {entry["Name"] for entry in client.list_buckets()["Buckets"]}
        if bucket in existing:
            for entry in client.list_objects_v2(Bucket=bucket).get("Contents", []):
                client.delete_object(Bucket=bucket, Key=entry["Key"])
        else:
            client.create_bucket(Bucket=bucket)
    return {"AWS_ENDPOINT_URL": endpoint}


def _param(block: Block) -> Any:
    marks = [pytest.mark.server] if block.needs_server else []
    return pytest.param(block, id=block.where, marks=marks)


@pytest.mark.parametrize("block", [_param(block) for block in RUNNABLE])
def test_python_block_runs(
    block: Block, request: pytest.FixtureRequest, page_directories: dict[Path, Path]
) -> None:
    extra: dict[str, str] = {}
    if block.urls("postgresql"):
        _prepare_postgresql(block, request)
    if block.urls("redis"):
        _prepare_redis(block, request)
    if block.urls("s3"):
        extra.update(_prepare_s3(block, request))  # after the fixture set the AWS environment
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, **extra}
    env.pop("PYTHONWARNINGS", None)  # warnings as a reader would see them, and then refused
    result = subprocess.run(
        [sys.executable, "-c", block.code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=page_directories[block.page],
        env=env,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{block.where} failed (mark it {FRAGMENT}?):\n{output}"
    assert result.stderr == "", f"{block.where} printed to stderr:\n{result.stderr}"
