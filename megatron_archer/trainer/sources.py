"""What a run was trained from, recorded in each checkpoint and checked on resume.

A resume that silently swaps the initial policy or the prompt set mixes two experiments in one
run directory (the reference model changes under the KL term; the sampler's position points
into another list). So each checkpoint records a fingerprint of ``model.path`` (and
``model.tokenizer``) and ``data.path``, and ``checkpoint.resume`` refuses a run whose sources
differ unless ``checkpoint.allow_source_change`` says so.

Fingerprints identify content, not location: a model directory moved or copied elsewhere
resumes. A data file is hashed whole (prompt sets are megabytes). A model directory is many
gigabytes, so each file contributes its relative path, its size and a SHA-256 of its first and
last MiB: safetensors headers and the first tensors differ between any two checkpoints one would
confuse; an edit confined to the middle of a large weight file is not detected.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_SAMPLE = 1 << 20


def _file_digest(path: Path, whole: bool) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if whole or size <= 2 * _SAMPLE:
            for block in iter(lambda: f.read(_SAMPLE), b""):
                digest.update(block)
        else:
            digest.update(f.read(_SAMPLE))
            f.seek(size - _SAMPLE)
            digest.update(f.read(_SAMPLE))
    return f"{size}:{digest.hexdigest()}"


def fingerprint(path: str | Path, whole: bool = False) -> str:
    """A short content fingerprint of a file or of every file under a directory."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        name = file.name if file == path else file.relative_to(path).as_posix()
        digest.update(f"{name}\0{_file_digest(file, whole)}\n".encode())
    return digest.hexdigest()[:16]


def run_sources(model_path: str, tokenizer_path: str | None, data_path: str) -> dict[str, dict]:
    """The fingerprint record of a run's sources, as saved in its checkpoints."""
    sources = {"model.path": {"path": str(Path(model_path).resolve()),
                              "fingerprint": fingerprint(model_path)},
               "data.path": {"path": str(Path(data_path).resolve()),
                             "fingerprint": fingerprint(data_path, whole=True)}}
    if tokenizer_path is not None:
        sources["model.tokenizer"] = {"path": str(Path(tokenizer_path).resolve()),
                                      "fingerprint": fingerprint(tokenizer_path)}
    return sources


def changed_sources(saved: dict[str, dict], current: dict[str, dict]) -> list[str]:
    """One line per source whose content differs between a checkpoint and this run."""
    lines = []
    for field in sorted(set(saved) | set(current)):
        before, now = saved.get(field), current.get(field)
        if before is None or now is None:
            lines.append(f"{field}: {'not set' if before is None else before['path']} when saved, "
                         f"{'not set' if now is None else now['path']} now")
        elif before["fingerprint"] != now["fingerprint"]:
            where = ("changed in place" if before["path"] == now["path"]
                     else f"was {before['path']}")
            lines.append(f"{field}: {now['path']} differs from what the checkpoint was trained "
                         f"from ({where}; fingerprint {before['fingerprint']} -> "
                         f"{now['fingerprint']})")
    return lines
