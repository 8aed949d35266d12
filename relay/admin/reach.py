"""How relayctl reaches a relay: its control socket, or its stopped spool.

Each verb (relay.admin.commands, relay.admin.queueverbs) first tries the
running relay's control socket (relay.control.server); when nothing listens
there and no relay holds the spool lock, the queue verbs work on the spool
directly (relay.admin.offline).  A relay that holds the spool but does not
answer on its socket is reported as such, never silently bypassed: writing
its spool behind its back would race its scheduler.  Here too: the exit
statuses, the errors a verb reports (CtlError) and ``RELAYCTL_TIMEOUT``
(seconds, default 10), the bound on the wait for the relay's answers.
"""

from __future__ import annotations

import os
import sys
import time

from relay import config as configmod
from relay.admin import client as cc
from relay.admin.offline import NoSuchMessage, OfflineError, OfflineSpool, RelayRunning
from relay.config.workerpaths import worker_config
from relay.control import proto

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class CtlError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAIL):
        super().__init__(message)
        self.code = code


def err(msg: str) -> None:
    print(f"relayctl: {msg}", file=sys.stderr)


def answer_timeout() -> float:
    raw = os.environ.get("RELAYCTL_TIMEOUT", "")
    if not raw:
        return 10.0
    try:
        t = float(raw)
        if t <= 0:
            raise ValueError
        return t
    except ValueError:
        raise CtlError(f"RELAYCTL_TIMEOUT: expected a number of seconds, got {raw!r}", EXIT_USAGE)


def verb(fn):
    """Run a verb: CtlError -> message on stderr and its exit status."""

    def run(args) -> int:
        try:
            return fn(args)
        except CtlError as e:
            err(str(e))
            return e.code
        except BrokenPipeError:
            # the reader went away (relayctl queue | head): not an error
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_OK

    return run


def load_config(args) -> configmod.Config:
    try:
        return configmod.load_effective(args.config)
    except configmod.ConfigError as e:
        raise CtlError("bad config:\n" + str(e))


# -- reaching the relay ----------------------------------------------------------------------


class Live:
    """The running relay, over its control socket."""

    def __init__(self, client: cc.Client, path: str):
        self.client = client
        self.path = path

    def close(self) -> None:
        self.client.close()


class Offline:
    """No relay runs: the spool itself."""

    def __init__(self, spool: OfflineSpool):
        self.spool = spool

    def close(self) -> None:
        pass


def open_relay(cfg: configmod.Config) -> Live | Offline:
    path = cfg.control_socket
    timeout = answer_timeout()
    off = OfflineSpool(cfg)
    # A relay starting up holds the spool lock a moment before its socket
    # listens: give it that moment before calling it unresponsive.
    deadline = time.monotonic() + min(timeout, 5.0)
    while True:
        try:
            client = cc.Client.connect(path, timeout)
        except cc.NotListening as e:
            reason = e
        except cc.PermissionDenied as e:
            raise CtlError(f"{e} (run relayctl as the user the relay runs as, or root)")
        except cc.ControlError as e:
            raise CtlError(str(e))
        else:
            try:
                client.call(proto.HELLO)
            except cc.ControlError as e:
                client.close()
                raise CtlError(str(e))
            return Live(client, path)
        try:
            off.check_not_running()
            return Offline(off)
        except RelayRunning as e:
            if time.monotonic() >= deadline:
                raise CtlError(f"{e} but does not answer on its control socket ({reason})")
            time.sleep(0.1)
        except OfflineError as e:
            raise CtlError(str(e))


def worker_configs(cfg: configmod.Config) -> list[configmod.Config]:
    """One config per queue: the relay's, or each worker's (workers > 1,
    relay.runtime.master): every worker has its own spool and control socket."""
    if cfg.workers <= 1:
        return [cfg]
    return [worker_config(cfg, i) for i in range(cfg.workers)]


def open_relays(cfg: configmod.Config) -> list[Live | Offline]:
    out: list[Live | Offline] = []
    try:
        for c in worker_configs(cfg):
            if cfg.workers > 1 and not os.path.isdir(c.spool):
                continue  # a worker that never ran has no queue
            out.append(open_relay(c))
    except BaseException:
        for r in out:
            r.close()
        raise
    return out


def close_all(relays) -> None:
    for r in relays:
        r.close()


def remote(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except cc.RemoteError as e:
        raise CtlError(e.description or e.code)
    except cc.ControlError as e:
        raise CtlError(str(e))


def offline(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except RelayRunning as e:
        raise CtlError(f"{e}: it started meanwhile; run the command again")
    except (OfflineError, NoSuchMessage) as e:
        raise CtlError(str(e))
    except PermissionError as e:
        raise CtlError(f"{e.filename or ''}: {e.strerror} (run relayctl as the relay's user or root)")
    except OSError as e:
        raise CtlError(f"{e.filename or ''}: {e.strerror or e}")
