"""The small JSON records that make an ablation resumable: a stage is finished when its record
exists, and a record is written atomically (a temporary file renamed), so a stage that stopped
part-way leaves none. Each record holds the fingerprint of the settings that made it; finding one
made with other settings is an error (nothing is silently reused or overwritten)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from megatron_archer.analysis.report import write_json


def fingerprint(*parts) -> str:
    """SHA-256 of the parts as canonical JSON (what a record's results depend on)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_record(path: Path, expected: str, what: str) -> dict | None:
    """The record at ``path`` when it exists and was made with the fingerprint ``expected``;
    None when absent; ValueError when it was made with other settings."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("fingerprint") != expected:
        raise ValueError(f"{what} in {path.parent} was made with other settings (fingerprint "
                         f"{str(record.get('fingerprint'))[:12]}, now {expected[:12]}): delete "
                         f"that directory to redo it, or choose another out")
    return record


def write_record(path: Path, record: dict) -> Path:
    """``record`` as JSON at ``path``, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    write_json(record, tmp)
    os.replace(tmp, path)
    return path
