"""The ``mailstack`` administration command.

    mailstack init [--user ADDRESS]          create directories, certificate, first user
    mailstack user add|passwd|del|list ...   manage mailboxes
    mailstack alias add|del|list ...         manage aliases
    mailstack queue list|show|flush|remove   see and steer the mail queue (mailq, postqueue)
    mailstack dkim keygen DOMAIN             make a DKIM signing key and print its DNS record
    mailstack dns [DOMAIN]                   the DNS records to publish (zone file and table)
    mailstack check [DOMAIN]                 check DNS, ports and certificates now (for cron)

Every command takes ``--config FILE`` (default: $MAILSTACK_CONFIG or
/etc/mailstack/mailstack.toml). The daemon notices changes to the users and
aliases files by itself; no restart or reload is needed.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import sys
import time

from mailstack.addresses import BadAddress, canonical, canonical_domain
from mailstack.auth.aliases import Aliases
from mailstack.auth.users import Users
from mailstack.config import Config, ConfigError, load
from mailstack.queue.spool import Spool
from mailstack.store.maildir import MailRoot

DEFAULT_CONFIG = "/etc/mailstack/mailstack.toml"


class CommandError(Exception):
    """A failure to report in one line, with exit status 1."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        config = load(args.config)
        return args.run(config, args) or 0
    except (ConfigError, CommandError, BadAddress, KeyError, ValueError) as e:
        message = e.args[0] if isinstance(e, KeyError) else str(e)
    except OSError as e:
        # A permission or disk problem with the files the command edits.
        message = f"{e.filename}: {e.strerror}" if e.filename else str(e)
    print(f"mailstack: {message}", file=sys.stderr)
    return 1


def _parser() -> argparse.ArgumentParser:
    default = os.environ.get("MAILSTACK_CONFIG", DEFAULT_CONFIG)
    parser = argparse.ArgumentParser(prog="mailstack", description=__doc__.split("\n")[0])
    parser.add_argument("--config", "-c", default=default,
                        help="configuration file (default: %(default)s)")
    # Accepted after the command too. Without SUPPRESS the sub-parser's default
    # would overwrite a --config given before the command (argparse copies
    # every sub-parser default into the namespace).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS,
                        help=f"configuration file (default: {default})")
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("init", parents=[common], help="prepare a new instance")
    p.add_argument("--user", help="create this mailbox (and postmaster alias) with a random password")
    p.set_defaults(run=cmd_init)

    user = sub.add_parser("user", help="manage mailboxes").add_subparsers(metavar="ACTION")
    for action, func, text in (("add", cmd_user_add, "create a mailbox"),
                               ("passwd", cmd_user_passwd, "change a password")):
        p = user.add_parser(action, parents=[common], help=text)
        p.add_argument("address")
        p.add_argument("--password-stdin", action="store_true",
                       help="read the password from the first line of standard input")
        p.set_defaults(run=func)
    p = user.add_parser("del", parents=[common], help="remove a mailbox (its mail stays on disk)")
    p.add_argument("address")
    p.set_defaults(run=cmd_user_del)
    p = user.add_parser("list", parents=[common], help="list mailboxes")
    p.set_defaults(run=cmd_user_list)

    alias = sub.add_parser("alias", help="manage aliases").add_subparsers(metavar="ACTION")
    p = alias.add_parser("add", parents=[common], help="add targets to an alias (@domain: catch-all)")
    p.add_argument("source")
    p.add_argument("targets", nargs="+")
    p.set_defaults(run=cmd_alias_add)
    p = alias.add_parser("del", parents=[common], help="remove an alias")
    p.add_argument("source")
    p.set_defaults(run=cmd_alias_del)
    p = alias.add_parser("list", parents=[common], help="list aliases")
    p.set_defaults(run=cmd_alias_list)
    _add_queue_and_dkim(sub, common)
    from mailstack.setup.commands import add_commands
    add_commands(sub, common)
    return parser


def _add_queue_and_dkim(sub, common) -> None:
    queue = sub.add_parser("queue", help="see and steer the mail queue").add_subparsers(
        metavar="ACTION")
    p = queue.add_parser("list", parents=[common], help="queued messages and why (like mailq)")
    p.set_defaults(run=cmd_queue_list)
    p = queue.add_parser("show", parents=[common], help="one message: envelope and headers")
    p.add_argument("queue_id")
    p.set_defaults(run=cmd_queue_show)
    p = queue.add_parser("flush", parents=[common],
                         help="ask the running server to try every message now")
    p.set_defaults(run=cmd_queue_flush)
    p = queue.add_parser("remove", parents=[common], help="delete a message from the queue")
    p.add_argument("queue_id")
    p.set_defaults(run=cmd_queue_remove)

    dkim = sub.add_parser("dkim", help="DKIM signing keys").add_subparsers(metavar="ACTION")
    p = dkim.add_parser("keygen", parents=[common],
                        help="write a signing key and print the DNS record to publish")
    p.add_argument("domain")
    p.add_argument("--selector", default=None,
                   help="DKIM selector (default: mailstack<YYYYMM> for rsa, "
                        "mailstack<YYYYMM>e for ed25519)")
    p.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    p.set_defaults(run=cmd_dkim_keygen)


def _read_password(args) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise CommandError("the passwords do not match")
    if len(password) < 8:
        raise CommandError("the password must have at least 8 characters")
    return password


def _check_domain(config: Config, address: str) -> str:
    """``address`` (or ``@domain``) in canonical form, if its domain is local."""
    if address.startswith("@"):
        address = "@" + canonical_domain(address[1:])
    else:
        address = canonical(address)
    if address.rpartition("@")[2] not in config.server.domains:
        raise CommandError(f"{address}: the domain is not in server.domains of {config.source}")
    return address


def cmd_init(config: Config, args) -> None:
    server = config.server
    MailRoot(server.mail_root).ensure()
    Spool(server.spool_dir).ensure()
    for path in (server.mail_root, server.spool_dir):
        # A directory made before, by hand or by a checkout, may be open to all.
        mode = os.stat(path).st_mode & 0o777
        if mode & 0o077:
            os.chmod(path, 0o700)
            print(f"Made {path} private (mode 0700, was {mode:04o})")
    tls = config.tls
    if tls.certificate is not None and not tls.certificate.exists():
        from mailstack.tls import make_self_signed

        make_self_signed(server.hostname, tls.certificate, tls.private_key)
        print(f"Created a self-signed certificate for {server.hostname} in {tls.certificate}")
    if args.user:
        address = _check_domain(config, args.user)
        users = Users(server.users_file)
        if users.exists(address):
            print(f"{address} exists already; its password is unchanged.")
        else:
            password = secrets.token_urlsafe(12)
            users.set_password(address, password, create=True)
            print(f"Created {address} with the password: {password}")
            print("(This is shown once. Change it with: mailstack user passwd " f"{address})")
        aliases = Aliases(server.aliases_file)
        known = {source for source, _ in aliases.items()}
        for domain in server.domains:
            if f"postmaster@{domain}" not in known:
                aliases.add(f"postmaster@{domain}", [address])
    _first_dkim_keys(config)
    print(f"Instance ready: mail root {server.mail_root}, spool {server.spool_dir}")


def _first_dkim_keys(config: Config) -> None:
    """A DKIM key for each local domain that has none yet, so mail is signed from day one."""
    from mailstack.queue.dkimsign import generate_key, load_keys, txt_record_name

    for domain in config.server.domains:
        if load_keys(config.dkim.keys_dir, domain):
            continue
        selector = time.strftime("mailstack%Y%m")
        path, txt = generate_key(config.dkim.keys_dir, domain, selector, "rsa")
        print(f"Created the DKIM key {path}; publish: {txt_record_name(domain, selector)}. "
              f"TXT \"{txt}\" (`mailstack dkim keygen` explains)")


def cmd_user_add(config: Config, args) -> None:
    address = _check_domain(config, args.address)
    Users(config.server.users_file).set_password(address, _read_password(args), create=True)
    print(f"Created {address}")


def cmd_user_passwd(config: Config, args) -> None:
    address = canonical(args.address)
    Users(config.server.users_file).set_password(address, _read_password(args), create=False)
    print(f"Changed the password of {address}")


def cmd_user_del(config: Config, args) -> None:
    address = canonical(args.address)
    Users(config.server.users_file).remove(address)
    print(f"Removed {address}; its Maildir stays under {config.server.mail_root}")


def cmd_user_list(config: Config, args) -> None:
    for address in Users(config.server.users_file).addresses():
        print(address)


def cmd_alias_add(config: Config, args) -> None:
    source = _check_domain(config, args.source)
    targets = [canonical(t) for t in args.targets]
    Aliases(config.server.aliases_file).add(source, targets)
    print(f"{source} -> {', '.join(targets)}")


def cmd_alias_del(config: Config, args) -> None:
    Aliases(config.server.aliases_file).remove(args.source)
    print(f"Removed {args.source}")


def cmd_alias_list(config: Config, args) -> None:
    for source, targets in Aliases(config.server.aliases_file).items():
        print(f"{source}: {', '.join(targets)}")



def _spools(config: Config) -> list[Spool]:
    """The main spool and those of SMTP workers ([smtp] processes), which hold
    what a worker accepted and has not delivered yet."""
    from mailstack.workers import worker_spools

    return [Spool(config.server.spool_dir)] + [Spool(d) for d in
                                               worker_spools(config.server.spool_dir)]


def _spool_of(config: Config, queue_id: str) -> Spool:
    for spool in _spools(config):
        if (spool.queue / f"{queue_id}.env").exists():
            return spool
    raise CommandError(f"{queue_id}: no such message in the queue")


def _queued(config: Config) -> list:
    envelopes = []
    for spool in _spools(config):
        for path in sorted(spool.queue.glob("*.env")) if spool.queue.is_dir() else []:
            try:
                envelopes.append(spool.load(path.stem))
            except FileNotFoundError:
                continue  # delivered while we looked
    return sorted(envelopes, key=lambda env: env.id)


def cmd_queue_list(config: Config, args) -> None:
    envelopes = _queued(config)
    if not envelopes:
        print("Mail queue is empty")
        return
    print(f"{'Queue ID':<22} {'Size':>8} {'Arrival':<19}  Sender/Recipient")
    for env in envelopes:
        arrival = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(env.arrival))
        print(f"{env.id:<22} {env.size:>8} {arrival:<19}  <{env.sender}>")
        for _, rcpt in env.pending():
            where = "local" if rcpt.local else f"attempts={rcpt.attempts}"
            print(f"{'':<52}<{rcpt.address}> ({where})")
            if rcpt.reply:
                print(f"{'':<54}{rcpt.reply}")
    print(f"-- {len(envelopes)} message(s)")


def cmd_queue_show(config: Config, args) -> None:
    spool = _spool_of(config, args.queue_id)
    try:
        env = spool.load(args.queue_id)
        with open(spool.message_path(args.queue_id), "rb") as f:
            head = f.read(64 * 1024).split(b"\n\n", 1)[0]
    except FileNotFoundError:
        raise CommandError(f"{args.queue_id}: no such message in the queue") from None
    print(f"Queue ID: {env.id}\nSender: <{env.sender}>\nClient: {env.client} helo={env.helo}")
    print(f"Arrival: {time.ctime(env.arrival)}\nSize: {env.size}")
    for rcpt in env.recipients:
        print(f"Recipient: <{rcpt.address}> (for <{rcpt.original}>) {rcpt.status}"
              f"{'' if rcpt.local else f', attempts={rcpt.attempts}'} {rcpt.reply}".rstrip())
    print()
    print(head.decode("utf-8", "replace"))


def cmd_queue_flush(config: Config, args) -> None:
    spool = Spool(config.server.spool_dir)
    if not spool.dir.is_dir():
        raise CommandError(f"{spool.dir}: no spool directory")
    (spool.dir / "flush").touch()
    print("Flush requested: the running server tries every queued message within a second")


def cmd_queue_remove(config: Config, args) -> None:
    _spool_of(config, args.queue_id).remove(args.queue_id)
    print(f"{args.queue_id}: removed")


def cmd_dkim_keygen(config: Config, args) -> None:
    from mailstack.queue.dkimsign import KeyExists, generate_key, txt_record_name

    domain = canonical_domain(args.domain)
    if domain not in config.server.domains:
        raise CommandError(f"{domain}: the domain is not in server.domains of {config.source}")
    selector = args.selector or time.strftime("mailstack%Y%m") + (
        "e" if args.algorithm == "ed25519" else "")
    try:
        path, txt = generate_key(config.dkim.keys_dir, domain, selector, args.algorithm)
    except KeyExists as e:
        raise CommandError(str(e)) from None
    chunks = " ".join(f'"{txt[i:i + 255]}"' for i in range(0, len(txt), 255))
    print(f"Wrote the private key {path} (mode 0600). Mail from {domain} is signed with it.")
    print("Publish this DNS record (zone-file syntax):")
    print(f"{txt_record_name(domain, selector)}. 3600 IN TXT {chunks}")


if __name__ == "__main__":
    sys.exit(main())
