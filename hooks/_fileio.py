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
- :func:`append_jsonl` / :func:`read_jsonl` — journals: rows appended as JSON lines and
  fsynced before returning; reading drops a torn last line (what a killed writer leaves)
  and, with ``repair=True``, cuts it off the file so the next append starts a clean line.
- :func:`kill_point` — a test hook, not for use: with ``THINKLENS_TEST_KILL_AT="STEP:N"``
  in the environment the process SIGKILLs itself the N-th time it reaches the named step,
  so kill-and-resume tests kill at a known point instead of racing a timer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
from collections import Counter
from collections.abc import Iterable, Iterator
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


def append_jsonl(path: str | os.PathLike[str], rows: Iterable[Any]) -> None:
    """Append each of ``rows`` to ``path`` as one JSON line; fsynced before returning.

    A new file's folder is fsynced too, so the file itself survives a crash. A kill during
    the write leaves at most a torn last line, which :func:`read_jsonl` drops.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {str(path)!r}: no folder {str(path.parent)!r}")
    new = not path.exists()
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if new and os.name == "posix":
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_jsonl(path: str | os.PathLike[str], *, repair: bool = False) -> list[Any]:
    """The JSON value of every complete, non-blank line of ``path``.

    The last line counts only when it ends in a newline (an unfinished one is what a
    killed writer left); a bad line elsewhere raises a ConfigError with its line number.
    ``repair=True`` also cuts the unfinished line off the file, durably, so that rows
    appended next start on a line of their own.
    """
    path = Path(path)
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if repair and end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    rows = []
    for n, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{str(path)!r}: line {n} is not JSON ({e}); each line must be "
                              "one JSON value") from e
    return rows


KILL_AT = "THINKLENS_TEST_KILL_AT"
_reached: Counter[str] = Counter()


def kill_point(step: str) -> None:
    """Test hook: SIGKILL this process the N-th time it reaches ``step`` when
    ``$THINKLENS_TEST_KILL_AT`` is ``"step:N"``; does nothing otherwise."""
    want = os.environ.get(KILL_AT)
    if not want:
        return
    _reached[step] += 1
    name, _, count = want.rpartition(":")
    if name == step and count.isdigit() and _reached[step] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["replace_durably", "atomic_path", "atomic_write_bytes", "atomic_write_text",
           "atomic_write_json", "sha256", "append_jsonl", "read_jsonl", "KILL_AT",
           "kill_point"]
