"""Iteration counts of the full run and of ``--quick`` (every section, tiny counts, seconds)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    quick: bool
    # Single operations: payload size -> (recorded blocks, calls per block), after one warm-up
    # block. S3 on moto is ~10x slower per call, so its blocks are `slow_divisor` times shorter.
    single: dict[str, tuple[int, int]]
    slow_divisor: int
    # Batches: records per batch, rounds (S3: its own size and rounds).
    batch_size: int
    batch_rounds: int
    s3_batch_size: int
    s3_batch_rounds: int
    # Concurrency: tasks, operations per task, rounds (S3: its own operations per task).
    tasks: int
    ops_per_task: int
    s3_ops_per_task: int
    concurrency_rounds: int
    # Sync against async: (blocks, calls per block) at 200 B.
    sync: tuple[int, int]
    # External[T]: items per order, rounds.
    external_items: int
    external_rounds: int
    # Peak memory: payload sizes.
    memory_sizes: tuple[str, ...]
    # TOAST: payload sizes for compression, (blocks, calls per block), lines of the order.
    toast_sizes: tuple[str, ...]
    toast_blocks: int
    toast_block_size: int
    toast_lines: int
    # Encryption at rest: payload sizes (blocks and calls per block as for single operations).
    crypto_sizes: tuple[str, ...]

    def single_counts(self, backend: str, size: str) -> tuple[int, int]:
        blocks, block_size = self.single[size]
        if backend == "s3":
            block_size = max(1, block_size // self.slow_divisor)
        return blocks, block_size


FULL = Settings(
    quick=False,
    single={"200B": (10, 50), "10KB": (10, 30), "1MB": (6, 5)},
    slow_divisor=5,
    batch_size=1000,
    batch_rounds=11,
    s3_batch_size=250,
    s3_batch_rounds=2,
    tasks=64,
    ops_per_task=20,
    s3_ops_per_task=2,
    concurrency_rounds=5,
    sync=(10, 50),
    external_items=1000,
    external_rounds=5,
    memory_sizes=("1MB", "50MB"),
    toast_sizes=("10KB", "1MB"),
    toast_blocks=6,
    toast_block_size=5,
    toast_lines=1000,
    crypto_sizes=("200B", "10KB", "1MB"),
)

QUICK = Settings(
    quick=True,
    single={"200B": (2, 5), "10KB": (2, 3)},
    slow_divisor=3,
    batch_size=20,
    batch_rounds=1,
    s3_batch_size=10,
    s3_batch_rounds=1,
    tasks=16,
    ops_per_task=1,
    s3_ops_per_task=1,
    concurrency_rounds=1,
    sync=(2, 5),
    external_items=20,
    external_rounds=1,
    memory_sizes=("10KB", "100KB"),
    toast_sizes=("10KB",),
    toast_blocks=2,
    toast_block_size=2,
    toast_lines=20,
    crypto_sizes=("200B", "10KB"),
)
