"""The public API's types, as ``mypy --strict`` sees them in user code: precise where they
can be, and refusing the mistakes `tests/typing/public_api.py` marks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api", reason="mypy is in the dev extras")

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "tests" / "typing" / "public_api.py"
_MARK = re.compile(r"#\s*E:\s*(.+)$")
_ERROR = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): error: (?P<message>.*)$")


def _expected() -> dict[int, str]:
    lines = CASES.read_text().splitlines()
    return {n: m.group(1).strip() for n, text in enumerate(lines, 1) if (m := _MARK.search(text))}


def test_public_api_types() -> None:
    stdout, stderr, _ = mypy_api.run(
        ["--strict", "--no-error-summary", "--show-error-codes", "--config-file=", str(CASES)]
    )
    assert not stderr, stderr
    errors: dict[int, list[str]] = {}
    for line in stdout.splitlines():
        match = _ERROR.match(line)
        assert match is not None or ": note: " in line, line
        if match is not None:
            errors.setdefault(int(match["line"]), []).append(match["message"])
    expected = _expected()
    assert len(expected) > 10  # the marks are read
    missing = {
        n: fragment
        for n, fragment in expected.items()
        if not any(fragment in message for message in errors.get(n, []))
    }
    unexpected = {n: messages for n, messages in errors.items() if n not in expected}
    assert not missing, f"mypy accepted wrong code (line: the error expected): {missing}"
    assert not unexpected, f"mypy refused correct code (line: its errors): {unexpected}"
