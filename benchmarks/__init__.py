"""pydantic-toast's benchmark suite: the library against the raw drivers, in the same run.

    make bench                       # starts PostgreSQL/Redis if needed, runs the full suite
    .venv/bin/python -m benchmarks   # the same, with the services already running
    .venv/bin/python -m benchmarks --quick --only single --backend redis --output run.json

Every section interleaves library and raw-driver measurements in blocks, so machine noise hits
both sides alike, and reports medians. The tables go to stdout; the full results (with machine
info) to ``benchmarks/results/latest.json`` (``quick.json`` for ``--quick``) and, with
``--output FILE``, to that file too.

Modules: `settings` (iteration counts of the full and quick runs), `models` (the payloads),
`services` (PostgreSQL, Redis and moto's S3 server, and the namespaces cleaned up afterwards),
`backends` (the library's side and the raw driver doing the same work), `timing` (interleaved
blocks, throughput, peak memory), `sections` (what is measured), `report` (tables, targets,
JSON).
"""
