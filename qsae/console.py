"""What the user's console shows: qsae's own lines (stages, progress bars, warnings about the run,
errors). Once a run directory exists, everything else the process and its libraries print (Ray's
raylet and core-worker lines, Ray's copies of its workers' output, transformers' advice) goes to
<run>/run.log instead.

The redirection is at the file-descriptor level: fds 1 and 2 point at the log, so output written by
C++ code and by any library's stream lands there too, while qsae writes to duplicates of the
original descriptors. Outside `lines_to_log` qsae's lines go to sys.stdout / sys.stderr as usual.

SIGTERM ends a run as Ctrl-C does (Terminated, a KeyboardInterrupt): finished work kept, one line;
Ray installs a handler of its own in the driver that aborts the process, so it is put back after Ray
starts (handle_sigterm).
"""
from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from tqdm.auto import tqdm

from qsae.files import current_umask

_streams: dict[str, TextIO] = {}
_warned: set[str] = set()


class Terminated(KeyboardInterrupt):
    """SIGTERM: the run stops as for Ctrl-C."""


_signals: set[int] = set()


def _terminate(signum, frame) -> None:
    _signals.add(signum)  # remembered: a library may turn the exception into a plain KeyboardInterrupt
    raise Terminated


def terminated() -> bool:
    """Whether SIGTERM arrived."""
    return signal.SIGTERM in _signals


def handle_sigterm() -> None:
    """SIGTERM raises Terminated in the main thread (from here on, until replaced)."""
    signal.signal(signal.SIGTERM, _terminate)


def out() -> TextIO:
    return _streams.get("out", sys.stdout)


def err() -> TextIO:
    return _streams.get("err", sys.stderr)


def say(text: str) -> None:
    """One of qsae's own lines, above any progress bar."""
    tqdm.write(text, file=out())
    out().flush()


def warn(text: str) -> None:
    """A warning about the user's run, once per text."""
    if text not in _warned:
        _warned.add(text)
        tqdm.write(f"[qsae] warning: {text}", file=err())


def progress(**options) -> tqdm:
    """A progress bar on the console."""
    return tqdm(file=err(), **options)


@contextmanager
def lines_to_log(path: Path):
    """Within the block, everything but qsae's own lines goes to `path` (appended to)."""
    if _streams:  # already redirected
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {name: os.dup(fd) for name, fd in (("out", 1), ("err", 2))}
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666 & ~current_umask())
    try:
        for fd in (1, 2):
            os.dup2(log, fd)
    finally:
        os.close(log)
    _streams.update({name: os.fdopen(fd, "w", buffering=1, closefd=False) for name, fd in saved.items()})
    say(f"[qsae] other libraries' output goes to {path}")
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr, *_streams.values()):
            stream.flush()
        _streams.clear()
        for name, fd in (("out", 1), ("err", 2)):
            os.dup2(saved[name], fd)
            os.close(saved[name])
