"""twistd plugin: ``twistd relay [--config FILE]``.

Kept tiny on purpose: twistd imports every plugin module to list them, so
the real work is imported only when the relay is started.
"""

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the twisted-relay mail relay. The config is --config FILE, else "
        "$RELAY_CONFIG, else ./relay.toml if it exists, else built-in defaults "
        "(SMTP on 127.0.0.1:2525, spool ./spool, local domain localhost)."
    )
    optParameters = [["config", "c", None, "Path of the TOML config file."]]


@implementer(IServiceMaker, IPlugin)
class RelayServiceMaker:
    tapname = "relay"
    description = "Mail relay: SMTP in, durable queue, relay by MX/smarthost, Maildir, POP3."
    options = Options

    def makeService(self, options):
        from relay.config import ConfigError, load_effective
        from relay.runtime.rootpaths import unsafe_twistd_files
        from relay.runtime.service import StartupError, make_service

        unsafe = unsafe_twistd_files(options)
        if unsafe:
            raise SystemExit("twisted-relay: not starting:\n" + "\n".join(unsafe))
        try:
            config = load_effective(options["config"])
            if config.workers > 1:
                from relay.runtime.master import RelayMaster

                svc = RelayMaster(config, log_target=_worker_log_target(options))  # relay/runtime/master.py
            else:
                svc = make_service(config)
        except (ConfigError, StartupError) as e:
            raise SystemExit(f"twisted-relay: not starting:\n{e}")
        svc.exit_on_error = True
        svc.handle_signals = True
        from relay.runtime.preload import preload

        preload()  # while still privileged: see relay/runtime/preload.py
        from relay.runtime.logs import for_twistd

        return for_twistd(svc, config, options)  # [log] format = "json": see relay/runtime/logs.py


def _worker_log_target(options) -> str:
    """Where the workers of a multi-process relay write their log lines: where
    twistd writes the master's (stdout in -n mode, else its log file), or
    "pipe" (events sent to the master) for --syslog and --logger."""
    import os

    parent = getattr(options, "parent", None)
    get = getattr(parent, "get", None)
    if get is None or get("logger") or get("syslog"):
        return "pipe"
    name = get("logfile", "") or ""
    if name == "-" or (get("nodaemon", False) and not name):
        return "stdout"
    return os.path.abspath(name or "twistd.log")


serviceMaker = RelayServiceMaker()
