"""Atomic file writes: write a temporary file in the destination folder, then rename it.

Used by the checkpoint writer (``regression.train``), the ONNX exporter (``export.onnx_export``)
and the command line (``cli``). Errors name the destination the caller asked for, never the
temporary file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


class WriteError(OSError):
    """The destination cannot be written; the message names it and says why."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    def __str__(self) -> str:
        return str(self.args[0])


def check_writable(path: str | os.PathLike[str], *, folder: bool = False) -> Path:
    """Check, without writing anything there, that ``path`` can be created or replaced.

    The nearest existing ancestor must be a folder in which a file can be created (checked by
    creating and deleting a temporary file there, which works for root and read-only mounts too).

    Args:
        path: the destination file, or with ``folder=True`` the destination folder.
        folder: whether ``path`` is a folder to write files into.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        WriteError: ``path`` is a folder where a file is wanted (or a file where a folder is), an
            ancestor is a file, or the place is not writable.
    """
    out = Path(path)
    if out.exists():
        if folder and not out.is_dir():
            raise WriteError(f"{out}: exists and is not a folder")
        if not folder and out.is_dir():
            raise WriteError(f"{out}: is a folder; give a file name")
    existing = out if folder and out.is_dir() else out.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise WriteError(f"{out}: cannot be created, {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise WriteError(f"{out}: cannot write in {existing} ({e.strerror})", e.errno) from None
    return out


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was, so a failed
    write never leaves a partial file. The file gets the usual permissions (0o666 less the umask),
    not ``mkstemp``'s 0o600.

    Args:
        path: the destination file; missing parent folders are created.

    Yields:
        The temporary path to write to.

    Raises:
        WriteError: ``path`` is a folder, its folder cannot be created, or it is not writable; the
            message names ``path`` (an ``OSError`` from the caller's own writing that names the
            temporary file is reported the same way).
    """
    out = Path(path)
    if out.is_dir():
        raise WriteError(f"{out}: is a folder; give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as e:
        raise WriteError(f"{out}: cannot write there ({e.strerror or e})", e.errno) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o666 & ~umask)
            os.replace(tmp, out)
        except OSError as e:
            if tmp_name in (e.filename, e.filename2) or tmp_name in str(e):
                raise WriteError(f"{out}: {e.strerror or 'write failed'}", e.errno) from None
            raise
    finally:
        tmp.unlink(missing_ok=True)
