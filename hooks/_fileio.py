"""Durable file writes shared by the trace and store modules.

A write goes to a temporary file in the destination's folder, is fsynced, then renamed
over the destination (atomic on POSIX), and the folder is fsynced so the rename itself
survives a crash: a reader sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from thinklens.errors import ConfigError


def replace_durably(tmp: Path, final: Path) -> None:
    """Move a complete, fsynced temp file to its final name, and fsync the folder."""
    os.replace(tmp, final)
    if os.name == "posix":  # Windows cannot open folders; its renames need no folder fsync
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename)."""
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {str(path)!r}: no folder {str(path.parent)!r}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        replace_durably(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
