"""The files twistd opens as root: refused where another user could plant a link.

``twistd relay`` started as root opens its log file (``--logfile``, by
default ``twistd.log`` when it daemonizes) and writes its pid file
(``--pidfile``, by default ``twistd.pid``) before it switches to ``-u``/``-g``,
with plain ``open()``: it follows a symbolic link.  If the directory of
either belongs to the relay's user (the account that faces the network),
whoever holds that account can put a link there and have root append log
lines to, or write a pid over, any file (``/etc/cron.d/...``,
``/etc/ld.so.preload``).  twistd offers no way to open them link-safely,
so the relay refuses to start instead, naming the option, the path and
the user who controls it; the fix is a root-owned directory, ``--logfile -``
(the journal under systemd, as etc/relay.service does), ``--syslog`` or
``--pidfile=``.  The rule is ``relay.common.privdrop.controller``'s: every
directory on the way, and the file itself if it exists, must be root's
and not writable by others (a sticky directory such as /tmp is safe only
for names that exist already).
"""

from __future__ import annotations

import os
import pwd
from typing import Any

from relay.common.privdrop import UnsafePath, controller


def twistd_files(options: Any) -> list[tuple[str, str]]:
    """(option, path) of the files twistd will open itself, from the twistd
    options (``options.parent`` of the plugin's options)."""
    parent = getattr(options, "parent", None)
    get = getattr(parent, "get", None)
    if get is None:
        return []
    files = []
    if not (get("logger") or get("syslog")):
        name = get("logfile", "") or ""
        if name != "-" and not (get("nodaemon", False) and not name):
            files.append(("--logfile", name or "twistd.log"))
    pid = get("pidfile", "twistd.pid")
    if pid:
        files.append(("--pidfile", pid))
    return files


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def unsafe_twistd_files(options: Any, euid: int | None = None) -> list[str]:
    """One problem per file twistd would open as root in a place another
    user controls; [] when not root or when all are safe."""
    if (os.geteuid() if euid is None else euid) != 0:
        return []
    problems = []
    for option, path in twistd_files(options):
        full = os.path.abspath(path)
        try:
            uid, _ = controller(full)
        except UnsafePath as e:
            problems.append(f"{option} {full}: {e}")
            continue
        except OSError as e:
            problems.append(f"{option} {full}: cannot check it: {e.strerror or e}")
            continue
        if uid != 0:
            problems.append(
                f"{option} {full}: it or a directory above it belongs to {_user(uid)}, and twistd opens it "
                "as root following links: use a directory only root can write, --logfile - or --syslog "
                "for the log, --pidfile= for no pid file")
    return problems
