"""Durable file writes: the one helper every module that writes a file uses.

A write goes to a temporary file in the destination's folder, is fsynced, then renamed
over the destination (atomic on POSIX), and the folder is fsynced so the rename itself
survives a crash: a reader sees the old file or the new one, never a torn one.

- :func:`atomic_path` — a context manager yielding a temporary path for writers that
  want a file name (``safetensors.save_file``, ``fig.write_html``, kaleido); on a clean
  exit the file is fsynced and renamed into place, on an exception it is removed.
- :func:`atomic_write_text`, :func:`atomic_write_bytes`, :func:`atomic_write_json` —
  the common cases on top of it.
- :func:`replace_durably` — the rename + folder fsync, for a temp file made elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from thinklens.errors import ConfigError


def replace_durably(tmp: Path, final: Path) -> None:
    """Move a complete, fsynced temp file to its final name, and fsync the folder."""
    os.replace(tmp, final)
    if os.name == "posix":  # Windows cannot open folders; its renames need no folder fsync
        fd = os.open(Path(final).parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    """fsync a file written by someone else's writer (e.g. ``safetensors.save_file``)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path``; renamed over it, durably, when the block ends.

    Example::

        with atomic_path(folder / "fig.html") as tmp:
            fig.write_html(tmp)          # a kill here leaves the old fig.html (or none)
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {str(path)!r}: no folder {str(path.parent)!r}")
    # os.open with 0o666 honours the umask (mkstemp's 0o600 would hide a report from others)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        _fsync_file(tmp)
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, folder fsync)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent))


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["replace_durably", "atomic_path", "atomic_write_bytes", "atomic_write_text",
           "atomic_write_json", "sha256"]
