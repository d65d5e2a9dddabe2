"""Output files: what ``atomic_path`` and ``check_writable`` do with links, FIFOs, modes, folders.

Everything is made in ``tmp_path``; system files such as /dev/null are only ever reached through
a link made here, so a regression replaces that link, never the system's file.
"""

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from triton_softmax._atomic import (
    TERMINATED_STATUS,
    WriteError,
    atomic_path,
    check_not_input,
    check_writable,
    destination,
    sigterm_unwinds,
)


def _write(path, text: str = "new\n") -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def _reader(path: Path) -> tuple[threading.Thread, list[str]]:
    """A thread that opens the FIFO ``path`` for reading and keeps what it reads."""
    got: list[str] = []

    def read() -> None:
        with open(path) as f:
            got.append(f.read())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, got


def test_a_symlink_is_kept_and_its_target_replaced(tmp_path):
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "real.csv"
    target.write_text("old\n")
    target.chmod(0o640)
    (tmp_path / "hop").symlink_to("data/real.csv")  # relative, and a chain of two links
    link = tmp_path / "link.csv"
    link.symlink_to(tmp_path / "hop")
    _write(link)
    assert link.is_symlink() and (tmp_path / "hop").is_symlink()
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["real.csv"]


def test_a_dangling_symlink_gets_its_target_created(tmp_path):
    link = tmp_path / "link.csv"
    link.symlink_to("made.csv")
    _write(link)
    assert link.is_symlink() and (tmp_path / "made.csv").read_text() == "new\n"
    lost = tmp_path / "lost.csv"
    lost.symlink_to("no/such/folder/x.csv")
    for call in (check_writable, _write):
        with pytest.raises(
            WriteError, match=r"lost\.csv: links to .*x\.csv, whose folder is missing"
        ):
            call(lost)
    assert not (tmp_path / "no").exists()


def test_an_existing_file_keeps_its_mode(tmp_path):
    private = tmp_path / "private.csv"
    private.write_text("old\n")
    private.chmod(0o600)
    _write(private)
    assert private.read_text() == "new\n" and stat.S_IMODE(private.stat().st_mode) == 0o600
    fresh = tmp_path / "fresh.csv"
    _write(fresh)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask


def test_a_read_only_file_is_refused_unless_forced_and_stays_read_only(tmp_path):
    frozen = tmp_path / "frozen.csv"
    frozen.write_text("old\n")
    frozen.chmod(0o444)
    with pytest.raises(WriteError, match=r"frozen\.csv: is read-only \(mode 0444\); --force"):
        check_writable(frozen)
    assert destination(frozen).read_only
    check_writable(frozen, force=True)
    _write(frozen)
    assert frozen.read_text() == "new\n" and stat.S_IMODE(frozen.stat().st_mode) == 0o444


def test_a_fifo_is_written_through_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    check_writable(fifo)
    thread, got = _reader(fifo)
    _write(fifo, "through the pipe\n")
    thread.join(timeout=10)
    assert got == ["through the pipe\n"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no temporary file left
    assert destination(fifo).kind == "stream"


def test_a_link_to_a_character_device_is_written_through(tmp_path):
    link = tmp_path / "null"
    link.symlink_to(os.devnull)
    _write(link)
    assert link.is_symlink() and stat.S_ISCHR(os.stat(link).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]


def test_a_descriptor_link_appends_to_its_file_and_writes_into_its_pipe(tmp_path):
    # /dev/stdout is such a link (to /proc/self/fd/1); one made here reaches the same code.
    log = tmp_path / "log.txt"
    log.write_text("before\n")
    with open(log, "a") as f:
        link = tmp_path / "fd"
        link.symlink_to(f"/proc/self/fd/{f.fileno()}")
        _write(link, "after\n")
    assert log.read_text() == "before\nafter\n" and link.is_symlink()
    r, w = os.pipe()
    try:
        pipe_link = tmp_path / "pipe-fd"
        pipe_link.symlink_to(f"/proc/self/fd/{w}")
        _write(pipe_link, "piped\n")
        assert os.read(r, 100) == b"piped\n"
    finally:
        os.close(r)
        os.close(w)


def test_a_socket_is_refused(tmp_path):
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        for call in (check_writable, _write):
            with pytest.raises(WriteError, match=r"sock: is a socket; give a regular file"):
                call(path)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)


@pytest.mark.parametrize("name", ["newdir/", "newdir/.", "newdir/.."])
def test_a_trailing_separator_names_a_folder(tmp_path, monkeypatch, name):
    # Path("newdir/") is "newdir": a file of that name was written.
    monkeypatch.chdir(tmp_path)
    for call in (check_writable, _write):
        with pytest.raises(WriteError, match=rf"{name}: names a folder .*; give a file name"):
            call(name)
    assert not any(tmp_path.iterdir())


_TERMINATED_MID_WRITE = """
import os, signal, sys, time
from pathlib import Path
from triton_softmax._atomic import atomic_path
try:
    with atomic_path(sys.argv[1]) as tmp:
        Path(tmp).write_text("partial")
        print(tmp.name, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the signal ends the block here
finally:
    print("unwound", flush=True)
"""


def test_sigterm_mid_write_removes_the_temporary_file(tmp_path):
    # SIGTERM killed the process at once, leaving .out.csv.XXXX.tmp (Ctrl-C cleaned up).
    out = tmp_path / "out.csv"
    out.write_text("previous\n")
    done = subprocess.run(
        [sys.executable, "-c", _TERMINATED_MID_WRITE, str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    tmp_name, unwound = done.stdout.split()
    assert tmp_name.startswith(".out.csv.") and unwound == "unwound"
    assert done.returncode == TERMINATED_STATUS == 143 and done.stderr == ""
    assert sorted(os.listdir(tmp_path)) == ["out.csv"]
    assert out.read_text() == "previous\n"


def test_sigterm_handler_is_restored_and_others_left_alone():
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with sigterm_unwinds():
        ours = signal.getsignal(signal.SIGTERM)
        assert callable(ours)
        with sigterm_unwinds():  # nested: unchanged, and not restored early
            assert signal.getsignal(signal.SIGTERM) is ours
        assert signal.getsignal(signal.SIGTERM) is ours
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with sigterm_unwinds():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_output_may_not_be_an_input(tmp_path, monkeypatch):
    # `predict x.csv -o x.csv` replaced its input, `export m.safetensors -o m.safetensors` turned
    # the checkpoint into ONNX.
    monkeypatch.chdir(tmp_path)
    Path("x.csv").write_text("a\n")
    Path("other.csv").write_text("a\n")
    os.symlink("x.csv", "link.csv")
    os.link("x.csv", "hard.csv")
    with pytest.raises(WriteError, match=r"^x\.csv: is an input file of this command; "):
        check_writable("x.csv", inputs=["model.onnx", "x.csv"])
    for output in ("link.csv", "hard.csv", str(tmp_path / "x.csv")):
        with pytest.raises(WriteError, match=rf"^{output}: is an input .*\(x\.csv\)"):
            check_not_input(output, [None, "x.csv"])
    with pytest.raises(WriteError, match=r"^x\.csv: is an input .*\(link\.csv\)"):
        check_not_input("x.csv", ["link.csv"])
    check_writable("other.csv", inputs=["x.csv", None, "missing.csv"])
    check_not_input("new.csv", ["x.csv"])
    os.symlink(os.devnull, "null")  # devices are never compared: /dev/stdin may be /dev/stdout
    check_not_input("null", ["null"])
