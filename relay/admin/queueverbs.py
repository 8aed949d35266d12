"""relayctl's queue verbs: list, show, and the actions (delete, hold,
release, retry, bounce), on the running relay or on a stopped relay's spool,
and on every worker's queue when there are several.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from typing import Any

from relay.admin import client as cc
from relay.admin import drain as drainverb
from relay.admin import fleet
from relay.admin.offline import NoSuchMessage, OfflineError, OfflineSpool
from relay.admin.reach import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    CtlError,
    Live,
    answer_timeout,
    close_all,
    err,
    load_config,
    offline,
    open_relays,
    remote,
    verb,
)
from relay.control import proto
from relay.queue import view as queueview

PAGE = 2000  # messages per listing page asked of the relay
ID_BATCH = 1000  # queue ids per request (an AMP value holds 64 KiB)


def _live_pages(client: cc.Client):
    """JSON-lines pages from the relay; the next page is asked for before
    this one is handled, so the relay builds it while we print."""
    pending = client.send(proto.QUEUE_LIST, start=True, limit=PAGE)
    warned = False
    while True:
        box = client.result(pending)
        more = box["more"]
        if box["loading"] and not warned:
            warned = True
            err("the relay is still reading its spool at start-up: this listing is incomplete")
        if more:
            pending = client.send(proto.QUEUE_LIST, start=False, limit=PAGE)
        yield box["lines"]
        if not more:
            return


def _offline_pages(off: OfflineSpool, problems: list[str]):
    buf: list[bytes] = []
    for line in off.lines(problems):
        buf.append(line)
        if len(buf) >= PAGE:
            yield b"".join(buf)
            buf = []
    if buf:
        yield b"".join(buf)


def _pages_of(relays, problems):
    for relay in relays:
        if isinstance(relay, Live):
            yield from _live_pages(relay.client)
        else:
            yield from _offline_pages(relay.spool, problems)


def queue_list(relay, as_json: bool) -> int:
    problems: list[str] = []
    relays = relay if isinstance(relay, list) else [relay]
    pages = _pages_of(relays, problems)
    out = sys.stdout
    if as_json:
        raw = out.buffer
        for page in _guard(pages):
            raw.write(page)
        raw.flush()
    else:
        table = queueview.Table(out)
        for page in _guard(pages):
            table.add_page(page)
        table.finish()
        out.flush()
    for p in problems:
        err(p)
    return EXIT_OK


def _guard(pages):
    """Iterate pages, turning transport/offline errors into CtlError."""
    it = iter(pages)
    while True:
        try:
            page = next(it)
        except StopIteration:
            return
        except cc.RemoteError as e:
            raise CtlError(e.description or e.code)
        except cc.ControlError as e:
            raise CtlError(str(e))
        except (OfflineError, OSError) as e:
            raise CtlError(str(e))
        yield page


def queue_show(relay, qid: str, as_json: bool) -> int:
    qid = qid.strip().upper()
    relays = relay if isinstance(relay, list) else [relay]
    if not relays:  # workers > 1, none of which has run yet: no queue at all
        raise CtlError(f"{qid}: no such message in the queue")
    d: Any = None  # the message's details, as JSON data
    for i, r in enumerate(relays):
        try:
            if isinstance(r, Live):
                box = remote(r.client.call, proto.QUEUE_SHOW, id=qid)
                d = json.loads(box["message"])
            else:
                d = offline(r.spool.details, qid)
            break
        except CtlError:
            if i == len(relays) - 1:
                raise
    if as_json:
        sys.stdout.write(json.dumps(d, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(queueview.format_details(d))
    return EXIT_OK


_DONE_WORDS = {"delete": "deleted", "hold": "put on hold", "release": "released", "retry": "retried",
               "bounce": "returned"}


def queue_action(relay, action: str, ids: list[str], every: bool) -> int:
    if isinstance(relay, list):
        return _queue_action_workers(relay, action, ids, every)
    results: list[dict] = []
    totals = {"done": 0, "failed": 0, "skipped": 0}
    if isinstance(relay, Live):
        timeout = answer_timeout()
        if every:
            box = remote(relay.client.call, proto.QUEUE_ACTION, action=action, ids=[], all=True,
                          timeout=timeout * 60)
            res = json.loads(box["result"])
            _merge(res, results, totals)
        else:
            for i in range(0, len(ids), ID_BATCH):
                batch = ids[i : i + ID_BATCH]
                box = remote(relay.client.call, proto.QUEUE_ACTION, action=action, ids=batch, all=False,
                              timeout=timeout * 6)
                _merge(json.loads(box["result"]), results, totals)
    else:
        off = relay.spool
        offline(_offline_action, off, action, ids, every, results, totals)
    for r in results:
        if r["ok"]:
            print(f"{r['id']}: {r['text']}", file=sys.stderr)
        else:
            err(f"{r['id']}: {r['text']}")
    if every:
        n = totals["done"]
        msg = f"{_DONE_WORDS[action]} {n} message{'s' if n != 1 else ''}"
        if totals["skipped"]:
            msg += f" ({totals['skipped']} skipped: on hold or being delivered)"
        print(msg, file=sys.stderr)
    return EXIT_FAIL if totals["failed"] else EXIT_OK


def _queue_action_workers(relays, action: str, ids: list[str], every: bool) -> int:
    """Several workers, each with its own queue: --all goes to each; an id is
    done by the worker that has it (only "no such message" everywhere fails)."""
    if len(relays) == 1:
        return queue_action(relays[0], action, ids, every)
    if every:
        code = EXIT_OK
        for r in relays:
            code = max(code, queue_action(r, action, ids, every))
        return code
    failed = False
    for qid in ids:
        # no relay (workers > 1, none of which has run yet): no queue has it
        outcome = (EXIT_FAIL, f"relayctl: {qid.strip().upper()}: no such message in the queue\n")
        for r in relays:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    rc = queue_action(r, action, [qid], False)
                except CtlError as e:
                    rc = EXIT_FAIL
                    err.write(f"relayctl: {e}\n")
            text = err.getvalue()
            if rc == EXIT_OK:
                outcome = (rc, text)
                break
            if r is relays[0] or "no such message" not in text:
                outcome = (rc, text)
        rc, text = outcome
        sys.stderr.write(text)
        failed = failed or rc != EXIT_OK
    return EXIT_FAIL if failed else EXIT_OK


def _merge(res: dict, results: list[dict], totals: dict) -> None:
    results.extend(res.get("results", []))
    for k in totals:
        totals[k] += int(res.get(k, 0))


def _offline_action(off: OfflineSpool, action: str, ids: list[str], every: bool,
                    results: list[dict], totals: dict) -> None:
    with off.locked():
        targets = off.ids() if every else [i.strip().upper() for i in ids]
        for qid in targets:
            if every and action == "retry":
                try:
                    if off.load(qid).state.hold:
                        totals["skipped"] += 1
                        continue
                except NoSuchMessage:
                    continue
            ok, text = off.act(action, qid)
            queueview.tally_action(results, totals, qid, ok, text, every)


@verb
def cmd_queue(args) -> int:
    action = args.queue_cmd or "list"
    if getattr(args, "fleet", False):
        return fleet.cmd_queue(args)
    if action == "drain":
        return drainverb.cmd_drain(args)
    if action in proto.ACTIONS_ON_ALL:
        if args.all and args.ids:
            raise CtlError(f"queue {action}: give queue ids or --all, not both", EXIT_USAGE)
        if not args.all and not args.ids:
            raise CtlError(f"queue {action}: give one or more queue ids, or --all", EXIT_USAGE)
    cfg = load_config(args)
    relays = open_relays(cfg)
    relay = relays if len(relays) != 1 else relays[0]
    try:
        if action == "list":
            return queue_list(relay, args.json)
        if action == "show":
            return queue_show(relay, args.id, getattr(args, "show_json", False) or args.json)
        return queue_action(relay, action, list(args.ids), bool(getattr(args, "all", False)))
    finally:
        close_all(relays)
