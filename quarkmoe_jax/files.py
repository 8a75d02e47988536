"""Reading small files a user points us at: regular files only (a FIFO or device never blocks a read), JSON
size-capped. The bottom of the import graph: config parsing and checkpoint I/O both read through it."""

from __future__ import annotations

import json
import os
import pathlib
import stat

from quarkmoe_jax.errors import CheckpointError

__all__ = ["MAX_JSON_BYTES", "open_regular_file", "read_json_file"]

MAX_JSON_BYTES = 16 * 1024 * 1024
"""The largest ``config.json`` / index file read (real ones take kilobytes to a few megabytes)."""


def open_regular_file(path: pathlib.Path, what: str = "checkpoint file"):
    """``path`` opened for reading if it is a regular file; a FIFO, device or folder raises (never blocks)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO would block a plain open
    except OSError as e:
        raise CheckpointError(f"{path}: expected a readable {what}, found {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CheckpointError(f"{path}: expected a regular {what}, found {_file_kind(mode)}")
    return os.fdopen(fd, "rb")


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def read_json_file(path: str | os.PathLike, what: str):
    """The JSON value of a small regular file (``config.json``, an index), size-capped; errors name it."""
    path = pathlib.Path(path)
    with open_regular_file(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: {size} bytes, expected a {what} of at most {MAX_JSON_BYTES}")
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: expected valid JSON, found {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: expected valid JSON, found JSON nested too deeply") from None
