"""``python -m benchmarks [--quick] [--only SECTION] [--backend NAME] [--output FILE]``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.backends import Target, open_target
from benchmarks.sections import PREAMBLES, RUNNERS, SECTION_BACKENDS, SECTIONS
from benchmarks.services import BACKENDS, Services
from benchmarks.settings import FULL, QUICK, Settings


def _names(values: list[str] | None, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    if not values:
        return allowed
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return tuple(name for name in allowed if name in names)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="pydantic-toast against the raw drivers: PostgreSQL, Redis, S3 (moto), "
        "SQLite and memory.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="every section, tiny counts and payloads"
    )
    parser.add_argument(
        "--only", action="append", metavar="SECTION", help=f"run only these: {', '.join(SECTIONS)}"
    )
    parser.add_argument(
        "--backend", action="append", metavar="NAME", help=f"only these: {', '.join(BACKENDS)}"
    )
    parser.add_argument(
        "--output", type=Path, metavar="FILE", help="also write the JSON results here"
    )
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def run(args: argparse.Namespace) -> int:
    settings: Settings = QUICK if args.quick else FULL
    sections = _names(args.only, SECTIONS, "section")
    backends = _names(args.backend, BACKENDS, "backend")
    wanted = tuple(b for b in backends if any(b in SECTION_BACKENDS[s] for s in sections))
    results: dict[str, Any] = {
        "settings": dataclasses.asdict(settings),
        "sections": {section: [] for section in sections},
        "skipped": {},
        "errors": [],
    }
    services = Services()
    targets: dict[str, Target] = {}
    started = time.perf_counter()
    load_at_start = os.getloadavg()
    # SIGTERM cancels the run like Ctrl-C does, so the cleanup below still runs.
    task = asyncio.current_task()
    if task is not None and hasattr(signal, "SIGTERM"):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await services.start(wanted)
        log(f"benchmarks: services up in {time.perf_counter() - started:.1f} s")
        results["skipped"] = dict(services.missing)
        for name, why in services.missing.items():
            log(f"benchmarks: skipping {name}: {why}")
            if args.backend:  # asked for by name: its absence is an error
                results["errors"].append(f"{name}: {why}")
        for name in wanted:
            if name in services.urls:
                targets[name] = await open_target(name, services)
        for section in sections:
            preamble = PREAMBLES.get(section)
            if preamble is not None:
                results["sections"][section].extend(await preamble(settings))
            for name in SECTION_BACKENDS[section]:
                if name not in targets:
                    continue
                # Move what exists to the permanent generation: the collections the
                # measurements run then scan only their own garbage, not botocore's models.
                gc.collect()
                gc.freeze()
                began = time.perf_counter()
                try:
                    rows = await RUNNERS[section](targets[name], settings)
                except Exception as exc:  # noqa: BLE001 - report it, run the rest
                    traceback.print_exc()
                    results["errors"].append(f"{section} on {name}: {type(exc).__name__}: {exc}")
                else:
                    results["sections"][section].extend(rows)
                log(f"benchmarks: {section} on {name}: {time.perf_counter() - began:.1f} s")
            if results["sections"][section]:
                print(report.section_table(section, results["sections"][section]), end="\n\n")
                sys.stdout.flush()
    finally:
        for target in targets.values():
            for raw in target.raws.values():
                try:
                    await raw.close()
                except Exception as exc:  # noqa: BLE001 - close the others
                    log(f"benchmarks: closing {target.name} raw store: {exc}")
        await services.cleanup()
    results["targets"] = report.evaluate_targets(results["sections"])
    results["floor_targets"] = report.evaluate_floor_targets(results["sections"])
    results["meta"] = report.machine_info(services.versions)
    results["meta"]["seconds"] = round(time.perf_counter() - started, 1)
    results["meta"]["load_average_at_start"] = load_at_start
    if results["targets"]:
        print(report.targets_table(results["targets"]), end="\n\n")
    if results["floor_targets"]:
        floor = report.targets_table(
            results["floor_targets"], "Issue 11 targets (the floor)", ("pass", "miss")
        )
        print(floor, end="\n\n")
    for path in report.write_json(results, args.output, quick=settings.quick):
        log(f"benchmarks: results written to {path}")
    for error in results["errors"]:
        log(f"benchmarks: error: {error}")
    return 1 if results["errors"] else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get("PYTHONASYNCIODEBUG"):
        log("benchmarks: PYTHONASYNCIODEBUG is set; numbers will be slow")
    try:
        return asyncio.run(run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("benchmarks: interrupted (services cleaned up, no results written)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
