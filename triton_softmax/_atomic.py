"""Safe file writes: a temporary file in the destination folder, renamed over the destination.

Used by the checkpoint writer (``regression.checkpoint``), the ONNX exporter
(``export.onnx_export``) and the command line (``cli``). Errors name the destination the caller
asked for, never the temporary file.

What a destination is decides how it is written (``destination``):

- a regular file, or a new one: written to a temporary file in its folder, then renamed over it,
  so a failure never leaves a partial file. A file that existed keeps its permission bits (a 0600
  file stays 0600) and, where the process may set them, its owner and group; a new one gets the
  usual 0o666 less the umask.
- a symbolic link: the same, applied to the file the link points to; the link itself is kept.
- a FIFO, a character device (``/dev/null``, a terminal) or a file descriptor's link
  (``/dev/stdout``, ``/dev/fd/N``, ``/proc/self/fd/N``): written through, never replaced. The data
  goes to a temporary file elsewhere first, then is copied in one go once complete; a regular file
  reached through a descriptor's link is appended to, as the descriptor's owner (a shell's ``>``
  or ``>>``) expects. Opening a FIFO waits for a reader, as a shell's ``>`` does.
- a block device or a socket: refused.

While a write is in progress, SIGTERM (when its handler is the default, in the main thread) ends
the process through ``Terminated`` rather than at once, so the temporary file is removed as on
Ctrl-C; ``sigterm_unwinds`` does the same around any block. ``check_writable(..., inputs=...)``
refuses an output that is one of the command's input files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Symbolic links followed before giving up, as the kernel's own limit (``ELOOP``).
MAX_SYMLINKS = 40


#: The exit status of a process ended by SIGTERM through ``Terminated``, as a shell reports one
#: killed by it.
TERMINATED_STATUS = 128 + signal.SIGTERM


class Terminated(SystemExit):
    """SIGTERM received inside ``sigterm_unwinds``: unwinds the stack (``finally`` blocks and
    context managers run), then the interpreter exits with ``TERMINATED_STATUS`` and no
    traceback. ``except Exception`` does not catch it."""

    def __init__(self) -> None:
        super().__init__(TERMINATED_STATUS)


_unwinding = threading.local()


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` instead of killing the process at once.

    Only where SIGTERM has its default action and in the main thread (the only one that may set
    handlers); elsewhere, and when nested, nothing changes. The previous handler is restored
    when the outermost block ends, also when it ends by ``Terminated``.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or getattr(_unwinding, "active", False)
        or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
    ):
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    _unwinding.active = True
    try:
        yield
    finally:
        _unwinding.active = False
        signal.signal(signal.SIGTERM, previous)


class WriteError(OSError):
    """The destination cannot be written; the message names it and says why."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Destination:
    """Where a write to a path ends up (see the module's docstring).

    Attributes:
        path: the path as given.
        target: the file renamed over: ``path`` itself, or the file its symbolic links point to;
            for a ``"stream"``, ``path``.
        kind: ``"new"`` (nothing there yet), ``"file"`` (an existing regular file, replaced) or
            ``"stream"`` (a FIFO, a character device or a descriptor's link, written through).
        mode: the permission bits of an existing regular file, else ``None``.
        read_only: an existing regular file with no write permission bit set, or that this
            process may not write.
    """

    path: Path
    target: Path
    kind: str
    mode: int | None = None
    read_only: bool = False


def destination(path: str | os.PathLike[str]) -> Destination:
    """Classify the file a write to ``path`` reaches, following symbolic links.

    Args:
        path: the destination file. As a string, a trailing separator (``newdir/``) or a last
            component of ``.`` or ``..`` names a folder and is refused.

    Returns:
        The destination.

    Raises:
        WriteError: ``path`` names a folder, is (or points to) a block device or a socket, or its
            links loop.
    """
    text = os.fspath(path)
    out = Path(text)
    if out.is_dir():
        raise WriteError(f"{text}: is a folder; give a file name")
    if os.path.basename(text) in ("", ".", ".."):
        raise WriteError(f"{text}: names a folder (it ends with {text[-1]!r}); give a file name")
    current, through_fd = out, False
    for _ in range(MAX_SYMLINKS):
        if not current.is_symlink():
            break
        # A link that lives in /proc (/proc/self/fd/1, reached from /dev/stdout or /dev/fd/1)
        # names an open descriptor, not a path: its text ("pipe:[123]") cannot be followed.
        if os.path.realpath(current.parent).startswith("/proc/"):
            through_fd = True
            break
        current = current.parent / os.readlink(current)
    else:
        raise WriteError(f"{text}: too many levels of symbolic links")
    try:
        st = os.stat(current)
    except (FileNotFoundError, NotADirectoryError):  # the latter: a file where a folder is
        return Destination(out, current, "new")
    except OSError as e:
        raise WriteError(f"{text}: {e.strerror}", e.errno) from None
    kind = _kind(st.st_mode)
    if kind == "folder":
        raise WriteError(f"{text}: is a folder; give a file name")
    if kind in ("block device", "socket", "special file"):
        raise WriteError(
            f"{text}: is a {kind}; give a regular file, a FIFO or a character device such as "
            "/dev/null"
        )
    if through_fd or kind != "regular file":
        return Destination(out, out, "stream")
    mode = stat.S_IMODE(st.st_mode)
    read_only = not mode & 0o222 or not os.access(current, os.W_OK)
    return Destination(out, current, "file", mode, read_only)


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "folder"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return kind
    return "special file"


def check_not_input(
    path: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str] | None]
) -> None:
    """Refuse to write ``path`` when it is one of ``inputs`` (``predict x.csv -o x.csv``).

    The same file is the same device and inode once symbolic links are followed, so a link to
    an input or a second hard link to it counts. Only regular files are compared: a terminal
    or pipe may well be both ``/dev/stdin`` and ``/dev/stdout``.

    Args:
        path: the output file.
        inputs: the files the command reads; ``None`` entries and missing files are skipped.

    Raises:
        WriteError: ``path`` is one of ``inputs``; the message names both.
    """
    try:
        out = os.stat(path)
    except OSError:
        return  # nothing there yet (or not reachable): it cannot be an input
    if not stat.S_ISREG(out.st_mode):
        return
    for source in inputs:
        if source is None:
            continue
        try:
            st = os.stat(source)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino):
            same = "" if os.fspath(source) == os.fspath(path) else f" ({source})"
            raise WriteError(
                f"{os.fspath(path)}: is an input file of this command{same}; writing it would "
                "replace what is being read; give another output file"
            )


def check_writable(
    path: str | os.PathLike[str],
    *,
    folder: bool = False,
    force: bool = False,
    inputs: Sequence[str | os.PathLike[str] | None] = (),
) -> Path:
    """Check, without writing anything there, that ``path`` can be created or replaced.

    The nearest existing ancestor must be a folder in which a file can be created (checked by
    creating and deleting a temporary file there, which works for root and read-only mounts too).

    Args:
        path: the destination file, or with ``folder=True`` the destination folder.
        folder: whether ``path`` is a folder to write files into.
        force: accept an existing read-only file (it is replaced and stays read-only).
        inputs: the files the command reads; ``path`` must not be one of them
            (``check_not_input``).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        WriteError: ``path`` is a folder where a file is wanted (or a file where a folder is), an
            ancestor is a file, the place is not writable, or the file is read-only and ``force``
            is false, or it is one of ``inputs``; see also ``destination``.
    """
    out = Path(path)
    check_not_input(path, inputs)
    if folder:
        if out.exists() and not out.is_dir():
            raise WriteError(f"{out}: exists and is not a folder")
        existing = out
    else:
        dest = destination(path)
        if dest.kind == "stream":
            if not os.access(dest.path, os.W_OK):
                raise WriteError(f"{out}: cannot write to it (permission denied)")
            return out
        if dest.target != dest.path and not dest.target.parent.is_dir():
            raise WriteError(f"{out}: links to {dest.target}, whose folder is missing")
        if dest.read_only and not force:
            raise WriteError(
                f"{out}: is read-only (mode {dest.mode:04o}); --force replaces it, keeping the mode"
            )
        existing = dest.target.parent
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
    """Yield a temporary path to write to; on success it becomes ``path`` (see the module doc).

    On any exception the temporary file is removed and ``path`` is left as it was, so a failed
    write never leaves a partial file. A regular file keeps its permission bits; a symbolic link
    is kept and its target replaced; a FIFO or character device is written through.

    Args:
        path: the destination file; missing parent folders are created (not those of a symbolic
            link's target).

    Yields:
        The temporary path to write to.

    Raises:
        WriteError: ``path`` is a folder, its folder cannot be created, or it is not writable; the
            message names ``path`` (an ``OSError`` from the caller's own writing that names the
            temporary file is reported the same way).
    """
    dest = destination(path)
    out = dest.path
    with sigterm_unwinds():
        # SIGTERM held back from making the file until the block that removes it is entered.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            tmp = _temporary(dest)
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            raise
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            try:
                yield tmp
                if dest.kind == "stream":
                    _copy_through(tmp, out)
                else:
                    _take_over(tmp, dest)
                    os.replace(tmp, dest.target)
            except OSError as e:
                if isinstance(e, WriteError):
                    raise
                if str(tmp) in (e.filename, e.filename2) or str(tmp) in str(e):
                    raise WriteError(f"{out}: {e.strerror or 'write failed'}", e.errno) from None
                raise
        finally:
            tmp.unlink(missing_ok=True)


def _temporary(dest: Destination) -> Path:
    """A new empty file beside ``dest.target`` (in the temporary folder for a stream)."""
    out = dest.path
    try:
        if dest.kind == "stream":
            folder = Path(tempfile.gettempdir())
        else:
            folder = dest.target.parent
            if dest.target == out:
                folder.mkdir(parents=True, exist_ok=True)
            elif not folder.is_dir():
                raise WriteError(f"{out}: links to {dest.target}, whose folder is missing")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(f"{out}: cannot write there ({e.strerror or e})", e.errno) from None
    os.close(fd)
    return Path(tmp_name)


def _take_over(tmp: Path, dest: Destination) -> None:
    """Give ``tmp`` the permissions (and, where allowed, owner) of the file it will replace."""
    if dest.mode is None:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
        return
    st = os.stat(dest.target)
    if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
        with contextlib.suppress(PermissionError):  # only root may give a file away
            os.chown(tmp, st.st_uid, st.st_gid)
    tmp.chmod(dest.mode)  # after chown, which clears the set-user-ID bit


def _copy_through(tmp: Path, out: Path) -> None:
    """Copy the finished ``tmp`` into the FIFO, device or descriptor ``out``; never replace it."""
    flags = os.O_WRONLY | os.O_NOCTTY
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.stat(out).st_mode):  # a regular file behind /dev/stdout: append
            flags |= os.O_APPEND
    try:
        fd = os.open(out, flags)
        with open(tmp, "rb") as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst)
    except BrokenPipeError:
        raise  # the reader went away (`-o /dev/stdout | head`): the caller stops quietly
    except OSError as e:
        raise WriteError(f"{out}: {e.strerror or 'write failed'}", e.errno) from None
