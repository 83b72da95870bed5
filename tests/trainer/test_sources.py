"""Source fingerprints (trainer.sources): content, not location; what changed is named."""

from __future__ import annotations

import shutil

from megatron_archer.trainer.sources import _SAMPLE, changed_sources, fingerprint, run_sources


def _weights(middle: bytes = b"m", last: bytes = b"t") -> bytes:
    """Three MiB: the first and the last are sampled, the middle one is not."""
    return b"h" * _SAMPLE + middle * _SAMPLE + b"t" * (_SAMPLE - 1) + last


def _model(path, last: bytes = b"t"):
    path.mkdir()
    (path / "config.json").write_text('{"hidden_size": 8}')
    (path / "model.safetensors").write_bytes(_weights(last=last))
    return path


def test_fingerprints_follow_content_not_location(tmp_path):
    model = _model(tmp_path / "a")
    copy = tmp_path / "b"
    shutil.copytree(model, copy)
    assert fingerprint(model) == fingerprint(copy)
    (copy / "config.json").write_text('{"hidden_size": 9}')
    assert fingerprint(model) != fingerprint(copy)
    other = _model(tmp_path / "c", last=b"T")  # the last MiB of a large file is sampled
    assert fingerprint(model) != fingerprint(other)
    (other / "model.safetensors").write_bytes(_weights(middle=b"M"))
    assert fingerprint(model) == fingerprint(other)  # the middle of a large file is not
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"x" * (3 * _SAMPLE))
    before = fingerprint(data, whole=True)
    data.write_bytes(b"x" * _SAMPLE + b"y" + b"x" * (2 * _SAMPLE - 1))
    assert fingerprint(data, whole=True) != before  # data files are hashed whole


def test_changed_sources_names_each_field(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1"}\n')
    saved = run_sources(str(_model(tmp_path / "a")), None, str(data))
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "a", moved)
    assert changed_sources(saved, run_sources(str(moved), None, str(data))) == []
    data.write_text('{"prompt": "2+2"}\n')
    lines = changed_sources(saved, run_sources(str(moved), str(moved), str(data)))
    assert len(lines) == 2
    assert lines[0].startswith(f"data.path: {data} differs from what the checkpoint was trained "
                               "from (changed in place; fingerprint ")
    assert lines[1] == f"model.tokenizer: not set when saved, {moved} now"
