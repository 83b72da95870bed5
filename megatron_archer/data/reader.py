"""Read a local .jsonl or .parquet prompt file into PromptRecords, reporting malformed rows by position.

jsonl is read line by line with the standard json module: `datasets` refuses a whole file when one
line is not JSON, and it unifies column types across rows, which would hide a row of the wrong type;
reading it ourselves gives each bad row its exact (1-based) line number. Blank lines are skipped.
parquet has one typed schema for the whole file, so it is read with `datasets` (local files only,
nothing is downloaded); its rows are named by their 0-based index.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_archer.data.records import PromptRecord, RowError, detect_schema, parse_row

SUFFIXES = (".jsonl", ".parquet")
ON_MALFORMED = ("skip", "error")
_SHOWN = 20  # malformed rows listed in an error message


@dataclass(frozen=True)
class MalformedRow:
    """A row that was not loaded: where it is ("line 7", "row 6") and why."""

    location: str
    reason: str

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}"


class MalformedDataError(ValueError):
    """Raised with ``on_malformed="error"``; ``rows`` lists every malformed row of the file."""

    def __init__(self, path: Path, rows: tuple[MalformedRow, ...]):
        self.path, self.rows = path, rows
        listed = "; ".join(map(str, rows[:_SHOWN]))
        more = f"; and {len(rows) - _SHOWN} more" if len(rows) > _SHOWN else ""
        super().__init__(f"{path}: {len(rows)} malformed row(s): {listed}{more}")


@dataclass(frozen=True)
class RecordSet:
    """The well-formed records of a file, its malformed rows, the schema used and the row count."""

    records: tuple[PromptRecord, ...]
    malformed: tuple[MalformedRow, ...]
    schema: str
    rows: int


def read_records(
    path: str | os.PathLike, schema: str = "auto", on_malformed: str = "skip", cache_dir: str | None = None,
) -> RecordSet:
    """Records of `path` under `schema` (``auto`` detects it from the first row or the columns).

    Malformed rows are skipped and listed (``on_malformed="skip"``) or, with ``"error"``, the whole
    file is checked and MalformedDataError lists them all. `cache_dir` is `datasets`' cache (parquet).
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"prompt file {path} must end in {' or '.join(SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if on_malformed not in ON_MALFORMED:
        raise ValueError(f"on_malformed must be one of {', '.join(ON_MALFORMED)}; got {on_malformed!r}")
    if path.suffix == ".jsonl":
        rows = list(_jsonl_rows(path))
        first = next((row for _, row in rows if isinstance(row, dict)), {})
    else:
        dataset = _parquet_dataset(path, cache_dir)
        rows = [(f"row {i}", row) for i, row in enumerate(dataset)]
        first = dataset.column_names
    if schema == "auto":
        schema = detect_schema(first)
    records, malformed = [], []
    for location, row in rows:
        if isinstance(row, MalformedRow):
            malformed.append(row)
            continue
        try:
            records.append(parse_row(row, schema, location))
        except RowError as error:
            malformed.append(MalformedRow(location, str(error)))
    if malformed and on_malformed == "error":
        raise MalformedDataError(path, tuple(malformed))
    return RecordSet(tuple(records), tuple(malformed), schema, len(rows))


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, parsed row or MalformedRow) for every non-blank line."""
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            location = f"line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                reason = f"not UTF-8 text ({error.reason} at byte offset {error.start})"
                yield location, MalformedRow(location, reason)
                continue
            if not line.strip():
                continue
            try:
                yield location, json.loads(line)
            except json.JSONDecodeError as error:
                yield location, MalformedRow(location, f"invalid JSON ({error.msg} at column {error.colno})")


def _parquet_dataset(path: Path, cache_dir: str | None):
    """The file as a `datasets.Dataset` (imported here: it is slow to import and only parquet needs it)."""
    import datasets

    return datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=cache_dir)
