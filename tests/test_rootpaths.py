"""twistd's own files (log, pid) are refused where another user could plant a link.

twistd opens them as root before it drops to -u/-g and follows links; a
relay account that owns their directory could make root write into any
file.  Unit tests of the rule, and one real ``twistd relay`` start as root
with the log file in a directory of another user, which must refuse to
start and leave the link's target untouched.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys

import pytest

from relay.runtime.rootpaths import twistd_files, unsafe_twistd_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")


class _Opts:
    def __init__(self, **parent):
        self.parent = parent


def _nobody() -> int:
    return pwd.getpwnam("nobody").pw_uid


def test_which_files_twistd_opens():
    assert twistd_files(_Opts(logfile="-", pidfile="")) == []
    assert twistd_files(_Opts(nodaemon=True, logfile=None, pidfile="")) == []
    assert twistd_files(_Opts(nodaemon=False, logfile=None, pidfile="")) == [("--logfile", "twistd.log")]
    assert twistd_files(_Opts(syslog=True, logfile="x.log", pidfile="p.pid")) == [("--pidfile", "p.pid")]
    assert twistd_files(_Opts(logfile="/var/log/r.log")) == [("--logfile", "/var/log/r.log"),
                                                             ("--pidfile", "twistd.pid")]


def test_not_root_is_not_checked(tmp_path):
    assert unsafe_twistd_files(_Opts(logfile=str(tmp_path / "x.log"), pidfile=""), euid=1000) == []


@as_root
def test_root_owned_directory_is_fine(tmp_path):
    d = tmp_path / "logs"
    d.mkdir(mode=0o755)
    assert unsafe_twistd_files(_Opts(logfile=str(d / "relay.log"), pidfile=str(d / "relay.pid"))) == []


@as_root
def test_directory_of_another_user_is_refused(tmp_path):
    d = tmp_path / "spool"
    d.mkdir(mode=0o755)
    os.chown(d, _nobody(), -1)
    problems = unsafe_twistd_files(_Opts(logfile=str(d / "relay.log"), pidfile=str(d / "relay.pid")))
    assert len(problems) == 2
    assert problems[0].startswith(f"--logfile {d}/relay.log: ")
    assert "nobody" in problems[0] and "--logfile -" in problems[0]
    assert problems[1].startswith(f"--pidfile {d}/relay.pid: ")


@as_root
def test_group_writable_directory_is_refused(tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o775)
    (problem,) = unsafe_twistd_files(_Opts(logfile=str(d / "relay.log"), pidfile=""))
    assert "writable by its group or by others" in problem


@as_root
def test_twistd_as_root_refuses_a_log_file_in_another_users_directory(tmp_path):
    """The attack: the relay account owns the log directory and links the
    log name to a root file; root's twistd must not start (nor write)."""
    target = tmp_path / "precious"
    target.write_text("root's file\n")
    d = tmp_path / "logs"
    d.mkdir(mode=0o755)
    os.chown(d, _nobody(), -1)
    os.symlink(target, d / "relay.log")
    spool = tmp_path / "spool"
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'spool = "{spool}"\n[smtp]\nlisten = ["tcp:0:interface=127.0.0.1"]\n')
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                        "-n", "--pidfile=", "--logfile", str(d / "relay.log"), "relay", "--config", str(cfg)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert "not starting" in out and f"--logfile {d}/relay.log" in out, out
    assert target.read_text() == "root's file\n"
    assert not spool.exists()
