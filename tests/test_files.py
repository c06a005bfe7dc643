"""Atomic writes and directory swaps: a failed write never replaces or half-writes the file under its final name, and a replaced directory is never missing."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qsae.files import (
    atomic_write,
    atomic_write_json,
    current_umask,
    new_staging_dir,
    replace_directory,
)


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


@pytest.mark.parametrize("exchange", [True, False])
def test_a_replaced_directory_holds_the_new_files_and_nothing_of_the_old(tmp_path, monkeypatch, exchange):
    """With the kernel's atomic exchange, and without it (the old one renamed aside first)."""
    import qsae.files

    if not exchange:
        monkeypatch.setattr(qsae.files, "_exchange", lambda a, b: False)
    final, new = tmp_path / "release", tmp_path / ".release-new"
    (final / "sub").mkdir(parents=True)
    (final / "old.txt").write_text("old")
    (final / "sub" / "stale.txt").write_text("stale")
    (new / "sub").mkdir(parents=True)
    (new / "sub" / "new.txt").write_text("new")
    replace_directory(new, final)
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*")) == ["sub", "sub/new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]  # neither the new name nor the old one left
    # where there was none, the new one is renamed in
    again = tmp_path / ".again"
    again.mkdir()
    replace_directory(again, tmp_path / "fresh")
    assert (tmp_path / "fresh").is_dir() and not again.exists()


def test_staging_directories_get_the_mode_of_a_plain_mkdir(tmp_path):
    staging = new_staging_dir(tmp_path, ".release-")
    assert staging.name.startswith(".release-")
    assert staging.stat().st_mode & 0o777 == 0o777 & ~current_umask()
