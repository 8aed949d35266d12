"""relay-sendmail's exit statuses (sendmail's, from sysexits.h) and the
error that ends it with one: kept apart so that each part of relay-sendmail
(relay.intake.sendmail, relay.intake.msgread, relay.intake.submit) can end
the run with the status sendmail would.
"""

from __future__ import annotations

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_CONFIG = 78


class Fatal(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message
