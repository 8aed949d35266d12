"""MTA-STS text formats, parsed strictly (RFC 8461 sections 3.1 and 3.2; pure).

Why a module of its own: the TXT record and the policy file come from
whoever controls the DNS answer or the web server, so their parsing is the
part an attacker talks to; kept pure (no I/O, no Twisted) it is tested
against every malformed input directly.  A malformed record means "no
policy"; a malformed policy file is a fetch failure (:class:`PolicyError`,
whose text says why), so a cached policy stays in use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_AGE_LIMIT = 31557600  # RFC 8461 section 3.2: max_age at most about one year
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_FIELD = re.compile(r"[A-Za-z0-9_-]{1,32}")
_VALUE = re.compile(r"[\x21-\x7e \t]*")
# an mx pattern: a host name, or "*." and a host name (one leftmost label)
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_MX = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})+\.?")


class PolicyError(ValueError):
    """A policy file that cannot be used (the text says why)."""


@dataclass(frozen=True)
class Record:
    """The parsed `_mta-sts` TXT record: its policy ``id``."""

    id: str


def parse_record(texts: list[str]) -> Record | str:
    """The record among the TXT strings of ``_mta-sts.<domain>``, or the
    reason there is none: exactly one string starting "v=STSv1" must exist
    and be valid (RFC 8461 section 3.1; several mean no policy)."""
    sts = [t for t in texts if t.startswith("v=STSv1")]
    if not sts:
        return "no v=STSv1 TXT record"
    if len(sts) > 1:
        return f"{len(sts)} v=STSv1 TXT records (exactly one is allowed)"
    fields = [f.strip(" \t") for f in sts[0].split(";")]
    if fields[-1] == "":
        fields.pop()
    if fields[0] != "v=STSv1":
        return "the TXT record does not start with v=STSv1;"
    ident: str | None = None
    for f in fields[1:]:
        name, eq, value = f.partition("=")
        if not eq or not _FIELD.fullmatch(name):
            return "a malformed field in the TXT record"
        if name == "id":
            if not _ID.fullmatch(value):
                return "the TXT record's id is not 1 to 32 letters and digits"
            if ident is None:
                ident = value
    if ident is None:
        return "the TXT record has no id"
    return Record(ident)


@dataclass(frozen=True)
class Parsed:
    """A valid policy file's fields."""

    mode: str
    mx: tuple[str, ...]
    max_age: int


def parse_policy(body: bytes) -> Parsed:
    """The policy file (RFC 8461 section 3.2): "key: value" lines ending in
    CRLF or LF; version STSv1, mode enforce|testing|none, max_age 0..31557600,
    at least one mx line unless mode is none; unknown keys ignored, the first
    of a repeated key wins (the RFC says so).  Raises PolicyError."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("the policy is not UTF-8") from None
    fields: dict[str, str] = {}
    mx: list[str] = []
    for n, line in enumerate(_lines(text), 1):
        if line == "":
            continue
        key, colon, value = line.partition(":")
        if not colon or not _FIELD.fullmatch(key):
            raise PolicyError(f"line {n} of the policy is not \"key: value\"")
        value = value.strip(" \t")
        if not _VALUE.fullmatch(value):
            raise PolicyError(f"line {n} of the policy has a control character")
        if key == "mx":
            if not _MX.fullmatch(value):
                raise PolicyError(f"line {n} of the policy: the mx pattern is not a host name or *.name")
            mx.append(value.rstrip(".").lower())
        else:
            fields.setdefault(key, value)
    return _check(fields, mx)


def _lines(text: str) -> list[str]:
    lines = text.split("\n")
    out = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    if out and out[-1] == "":
        out.pop()
    for ln in out:
        if "\r" in ln:
            raise PolicyError("a bare CR in the policy")
    return out


def _check(fields: dict[str, str], mx: list[str]) -> Parsed:
    if fields.get("version") != "STSv1":
        raise PolicyError("the policy's version is not STSv1")
    mode = fields.get("mode")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError("the policy's mode is not enforce, testing or none")
    age = fields.get("max_age")
    if age is None or not age.isdigit() or len(age) > 10 or int(age) > MAX_AGE_LIMIT:
        raise PolicyError(f"the policy's max_age is not a number of seconds from 0 to {MAX_AGE_LIMIT}")
    if not mx and mode != "none":
        raise PolicyError("the policy has no mx line")
    return Parsed(mode, tuple(dict.fromkeys(mx)), int(age))
