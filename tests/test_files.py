"""Atomic writes: a failed write never replaces or half-writes the file under its final name."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qsae.files import atomic_write, atomic_write_json


def test_failing_write_leaves_nothing_under_the_final_name(tmp_path):
    target = tmp_path / "sub" / "file.bin"

    def write(tmp):
        Path(tmp).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, write)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_failing_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "file.bin"
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"complete"))

    def write(tmp):
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, write)
    assert target.read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_atomic_write_json_round_trips(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"shards": {"a": 1}})
    assert json.loads((tmp_path / "m.json").read_text()) == {"shards": {"a": 1}}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_atomic_write_gives_the_mode_a_plain_write_would(tmp_path):
    previous = os.umask(0o022)
    try:
        (tmp_path / "plain.txt").write_text("x")
        atomic_write_json(tmp_path / "atomic.json", {})
    finally:
        os.umask(previous)
    plain, atomic = ((tmp_path / name).stat().st_mode & 0o777 for name in ("plain.txt", "atomic.json"))
    assert atomic == plain == 0o644  # not mkstemp's private 0600
