"""The power-loss file system (tests/support/powerfs.py): what survives a cut
is exactly what was made durable, per file and per directory."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from tests.support.powerfs import PowerFS, available

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


def _write(path: str, data: bytes, *, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        if sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def fs(tmp_path):
    with PowerFS(str(tmp_path)) as p:
        yield p


def test_unsynced_data_and_names_are_lost_synced_ones_kept(fs):
    m = fs.mnt
    os.mkdir(f"{m}/d")
    _fsync_dir(m)
    _write(f"{m}/d/synced", b"durable", sync=True)
    _write(f"{m}/d/data-only", b"data but no name", sync=True)
    _fsync_dir(f"{m}/d")
    _write(f"{m}/d/name-only", b"a name but no data", sync=False)
    os.rename(f"{m}/d/data-only", f"{m}/d/data-renamed")
    _write(f"{m}/d/gone", b"x", sync=True)
    os.unlink(f"{m}/d/gone")
    # the directory is fsynced: name-only, data-renamed and the unlink are durable
    _fsync_dir(f"{m}/d")
    # none of the rest is
    _write(f"{m}/d/nothing", b"neither", sync=False)
    os.rename(f"{m}/d/data-renamed", f"{m}/d/data-renamed-again")
    _write(f"{m}/d/synced", b"changed, not synced", sync=False)
    _write(f"{m}/d/data-no-name", b"data, no name", sync=True)
    _write(f"{m}/late", b"late", sync=True)  # root never fsynced after
    summary = fs.cut()
    assert summary["cut"] is True
    assert not os.path.ismount(fs.mnt)
    fs.mount()
    assert sorted(os.listdir(m)) == ["d"]
    assert sorted(os.listdir(f"{m}/d")) == ["data-renamed", "name-only", "synced"]
    assert _read(f"{m}/d/synced") == b"durable"
    assert _read(f"{m}/d/data-renamed") == b"data but no name"
    assert _read(f"{m}/d/name-only") == b""  # the name survived, its contents did not
    assert summary["empty_never_synced"] == 1 and summary["reverted"] == 1


def test_the_state_file_pattern_rename_durable_data_not(fs):
    """Temp file without fdatasync renamed over a synced file, then the
    directory fsynced for another file: the rename survives, the data not."""
    m = fs.mnt
    _write(f"{m}/state", b"delivered", sync=True)
    _fsync_dir(m)
    _write(f"{m}/state.tmp", b"deferred", sync=False)
    os.rename(f"{m}/state.tmp", f"{m}/state")
    _write(f"{m}/other", b"other", sync=True)
    _fsync_dir(m)
    fs.cut()
    fs.mount()
    assert _read(f"{m}/state") == b""


def test_unlink_without_directory_fsync_comes_back(fs):
    m = fs.mnt
    _write(f"{m}/msg", b"message", sync=True)
    _fsync_dir(m)
    os.unlink(f"{m}/msg")
    fs.cut()
    fs.mount()
    assert _read(f"{m}/msg") == b"message"
    os.unlink(f"{m}/msg")
    _fsync_dir(m)
    fs.cut()
    fs.mount()
    assert os.listdir(m) == []


def test_a_new_directory_without_parent_fsync_is_lost_with_its_files(fs):
    m = fs.mnt
    os.mkdir(f"{m}/a")
    os.mkdir(f"{m}/a/b")
    _fsync_dir(f"{m}/a")  # a/b's name is durable in a, but a's own name is not in /
    _write(f"{m}/a/b/f", b"f", sync=True)
    _fsync_dir(f"{m}/a/b")
    fs.cut()
    fs.mount()
    assert os.listdir(m) == []


def test_files_present_at_mount_are_durable_and_kept_when_changed(fs):
    m = fs.mnt
    _write(f"{m}/old", b"old contents", sync=True)
    os.link(f"{m}/old", f"{m}/old-link")
    _fsync_dir(m)
    fs.cut()
    fs.mount()  # now "old" is present at mount
    assert os.stat(f"{m}/old").st_nlink == 2
    _write(f"{m}/old", b"new, never synced", sync=False)
    os.unlink(f"{m}/old-link")
    fs.cut()
    fs.mount()
    assert _read(f"{m}/old") == b"old contents"
    assert _read(f"{m}/old-link") == b"old contents"
    assert os.stat(f"{m}/old").st_ino == os.stat(f"{m}/old-link").st_ino


def test_clean_unmount_keeps_everything(fs):
    m = fs.mnt
    _write(f"{m}/f", b"not synced", sync=False)
    fs.unmount()
    fs.mount()
    assert _read(f"{m}/f") == b"not synced"


def test_many_threads_and_processes(fs):
    """Robust under concurrent use: threads writing, syncing, renaming and
    listing at once, then a cut keeps exactly the synced-and-named files."""
    m = fs.mnt
    os.mkdir(f"{m}/q")
    _fsync_dir(m)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        try:
            for i in range(60):
                tmp, final = f"{m}/q/{k}-{i}.tmp", f"{m}/q/{k}-{i}"
                _write(tmp, f"{k}-{i}".encode() * 100, sync=True)
                os.rename(tmp, final)
                with lock:  # a directory fsync after each rename, as the spool does
                    _fsync_dir(f"{m}/q")
                os.listdir(f"{m}/q")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    # meanwhile another process reads the files
    q = m + "/q"
    reader = ("import os, sys\nq = sys.argv[1]\nfor _ in range(20):\n"
              "    [open(os.path.join(q, n), 'rb').read() for n in os.listdir(q) if not n.endswith('.tmp')]")
    subprocess.run([sys.executable, "-c", reader, q], check=True, timeout=120)
    for t in threads:
        t.join(120)
    assert not errors, errors
    fs.cut()
    fs.mount()
    names = sorted(os.listdir(f"{m}/q"))
    assert names == sorted(f"{k}-{i}" for k in range(6) for i in range(60))
    for n in names:
        assert _read(f"{m}/q/{n}") == n.encode() * 100


def test_unix_sockets_work_and_a_stale_one_can_be_replaced(fs):
    """The relay's control socket lives in the spool."""
    import socket

    path = os.path.join(fs.mnt, "control.sock")
    for _ in range(2):
        if os.path.exists(path):
            os.unlink(path)  # the relay removes a socket left by a crash
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
        srv.listen(1)
        cli = socket.socket(socket.AF_UNIX)
        cli.connect(path)
        conn, _ = srv.accept()
        cli.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        for s in (conn, cli, srv):
            s.close()
        fs.unmount()  # a clean stop keeps the stale socket file
        fs.mount()
        assert os.path.exists(path)
