"""relayctl dkim: make a signing key, and check the records published for the configured ones.

``relayctl dkim keygen DOMAIN SELECTOR [--algorithm A] [--bits N] [--key FILE]``
writes a new private key (mode 0600, never over an existing file) and
prints the DNS TXT record to publish and the config lines to add.  Run as
root, the key is written as the user who controls its directory
(relay.common.privdrop: a link planted there is followed with that user's
rights only) and given to the spool's owner, the relay's user, who must
read it.  The default file is ``dkim/DOMAIN.SELECTOR.pem`` beside the
config file.

``relayctl dkim check [DOMAIN]`` loads each configured key (as the relay
does at start), looks its selector's TXT record up with the relay's
delivery.nameservers and says, per selector: matches, missing, does not
match, revoked, ... and what to do.  Exit 0 only if every one matches.
"""

from __future__ import annotations

import os
import sys

from relay import config as configmod
from relay.admin.reach import EXIT_FAIL, EXIT_OK, CtlError, load_config, verb
from relay.config.values import DKIM_ALGORITHMS

# The DKIM modules (cryptography, dnspython) and relay.runtime.parts (Twisted) are imported in
# the verbs only: the parser is built for every relayctl command, and the queue verbs must stay
# free of Twisted (tests/test_relayctl.py Imports, tests/test_control.py LiveImports).
RSA_BITS = 2048


def add_commands(sub) -> None:
    d = sub.add_parser("dkim", help="DKIM: make a key (keygen), check the published records (check)")
    parser_class = type(d)
    ds = d.add_subparsers(dest="dkim_cmd", metavar="ACTION", parser_class=parser_class)
    ds.required = True
    k = ds.add_parser("keygen", help="write a new signing key; print the DNS record and the config lines")
    k.add_argument("domain", metavar="DOMAIN")
    k.add_argument("selector", metavar="SELECTOR")
    k.add_argument("--algorithm", choices=DKIM_ALGORITHMS, default=DKIM_ALGORITHMS[0])
    k.add_argument("--bits", type=int, default=RSA_BITS, help="RSA key size (2048 to 4096)")
    k.add_argument("--key", metavar="FILE", help="where to write it (default: dkim/DOMAIN.SELECTOR.pem beside "
                                                 "the config file)")
    k.set_defaults(func=cmd_keygen)
    c = ds.add_parser("check", help="look up each configured selector's record: does it match the key?")
    c.add_argument("domain", metavar="DOMAIN", nargs="?")
    c.set_defaults(func=cmd_check)


def _names(args) -> tuple[str, str]:
    from relay.intake import dkim

    domain = dkim.normalize_domain(args.domain)
    if domain is None:
        raise CtlError(f"{args.domain!r} is not a domain name", 2)
    selector = args.selector.strip().lower()
    if not selector or dkim.normalize_domain(selector) != selector:
        raise CtlError(f"{args.selector!r} is not a selector (DNS labels: letters, digits, hyphens)", 2)
    return domain, selector


def _key_path(args, cfg: configmod.Config, domain: str, selector: str) -> str:
    if args.key:
        return os.path.abspath(args.key)
    base = os.path.dirname(cfg.path) if cfg.path else os.getcwd()
    return os.path.join(base, "dkim", f"{domain}.{selector}.pem")


def _relay_user(cfg: configmod.Config) -> tuple[int, int] | None:
    """Root: (uid, gid) of the spool's owner, who must read the key; None otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(cfg.spool)
    except OSError:
        return None  # no spool yet: the key stays root's (say so)
    return st.st_uid, st.st_gid


@verb
def cmd_keygen(args) -> int:
    from relay.common import fileio, privdrop
    from relay.intake import dkimkeys

    cfg = load_config(args)
    domain, selector = _names(args)
    path = _key_path(args, cfg, domain, selector)
    owner = _relay_user(cfg)
    try:
        key = dkimkeys.generate_key(args.algorithm, args.bits)
    except ValueError as e:
        raise CtlError(str(e), 2)
    try:
        with privdrop.as_controller(path) as who:
            chown = owner if owner is not None and owner[0] != who[0] else None
            folder = os.path.dirname(path)
            if not os.path.isdir(folder):
                fileio.makedirs_durable(folder, 0o700)
                if chown is not None:  # made just now, by us: the relay's user must reach the key
                    os.chown(folder, *chown, follow_symlinks=False)
            dkimkeys.write_key(path, key, owner=chown)
    except FileExistsError as e:
        raise CtlError(str(e))
    except privdrop.UnsafePath as e:
        raise CtlError(str(e))
    except OSError as e:
        raise CtlError(f"{e.filename or path}: {e.strerror}")
    record = dkimkeys.public_record(key)
    name = dkimkeys.record_name(domain, selector)
    strings = " ".join(f'"{s}"' for s in dkimkeys.txt_strings(record))
    print(f"wrote {path} (mode 0600)", file=sys.stderr)
    if os.geteuid() == 0 and owner is None:
        print(f"note: {path} is root's: the relay's user must be able to read it (chown it)", file=sys.stderr)
    print(f"# 1. publish this TXT record in the DNS zone of {domain}:")
    print(f"{name}. IN TXT ( {strings} )")
    print("# 2. add to the relay's config, then `relayctl reload`:")
    print("[[dkim.keys]]")
    print(f'domain = "{domain}"')
    print(f'selector = "{selector}"')
    print(f'key = "{path}"')
    print(f'algorithm = "{args.algorithm}"')
    print(f"# 3. once the record is published: relayctl dkim check {domain}")
    return EXIT_OK


@verb
def cmd_check(args) -> int:
    from relay.intake import dkim, signing
    from relay.runtime import parts

    cfg = load_config(args)
    try:
        keys = parts.load_dkim_keys(cfg)
    except parts.PartError as e:
        raise CtlError(str(e))
    if args.domain:
        want = dkim.normalize_domain(args.domain)
        keys = tuple(k for k in keys if k.domain == want)
        if not keys:
            raise CtlError(f"no [[dkim.keys]] for {args.domain} in {cfg.source}")
    elif not keys:
        raise CtlError(f"no [[dkim.keys]] in {cfg.source}: make one with `relayctl dkim keygen DOMAIN SELECTOR`")
    results = signing.check_keys(keys, signing.make_resolver(cfg.delivery.nameservers))
    for r in results:
        verdict = "no answer" if r.check is None else r.check.status
        print(f"{r.key.domain} selector {r.key.selector}: {verdict}: {r.text}")
    return EXIT_OK if all(r.check is not None and r.check.ok for r in results) else EXIT_FAIL
