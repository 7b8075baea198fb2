"""The CSV files of the toy benchmarks (guardrl.toy.benchmark and guardrl.toy.learning): read, write
atomically, append rows, and drop rows on resume."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence


def _read_csv(path: str) -> list[dict[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path: str, columns: Sequence[str], rows: list[dict]) -> None:
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)


def _append_csv(path: str, columns: Sequence[str], rows: list[dict]) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def _truncate_csv(path: str, columns: Sequence[str], keep) -> None:
    if os.path.exists(path):
        _write_csv(path, columns, [row for row in _read_csv(path) if keep(row)])
