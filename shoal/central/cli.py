"""``shoal central``: run the central directory, manage its accounts, migrate its database."""

from __future__ import annotations

import argparse
import os
import re
import sys

from shoal.aio import add_logging_arguments
from shoal.config import add_config_arguments

HELP = "Run the central directory: accounts, live clusters, routes with signed tokens, status page."
EXAMPLE = """
SHOAL_OPERATOR_PASSWORD=... shoal central --http 0.0.0.0:7000 --db sqlite:///central.db --bootstrap-operator admin
SHOAL_PASSWORD=... shoal central accounts add cluster site-a --db sqlite:///central.db
shoal central accounts list --db postgresql://shoal@db.example/shoal
"""
DEFAULT_DB = "sqlite:///./shoal-central.db"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http", default="127.0.0.1:7000", help="address to serve HTTP on (default %(default)s)")
    p.add_argument(
        "--db",
        default=None,
        help=f"database URL: sqlite:///PATH or postgresql://USER@HOST/DB (default {DEFAULT_DB}; also $SHOAL_CENTRAL_DB)",
    )
    p.add_argument(
        "--token-ttl",
        type=float,
        default=300.0,
        help="lifetime of route tokens in seconds (default %(default)s)",
    )
    p.add_argument(
        "--session-ttl",
        type=float,
        default=3600.0,
        help="lifetime of device session tokens from /v1/login (default %(default)s)",
    )
    p.add_argument(
        "--report-interval",
        type=float,
        default=1.0,
        help="seconds between cluster reports; 3 missed reports take a cluster out (default %(default)s)",
    )
    p.add_argument("--webhook", default=None, help="URL to POST the status (clusters, load) to, as JSON")
    p.add_argument(
        "--webhook-interval",
        type=float,
        default=10.0,
        help="seconds between webhook posts (default %(default)s)",
    )
    p.add_argument("--tls-cert", default=None, help="certificate (PEM) to serve HTTPS")
    p.add_argument("--tls-key", default=None, help="private key (PEM) for --tls-cert")
    p.add_argument(
        "--bootstrap-operator",
        default=None,
        metavar="NAME",
        help="create this operator account on start if missing; password from $SHOAL_OPERATOR_PASSWORD",
    )
    p.add_argument(
        "--db-timeout",
        type=float,
        default=5.0,
        help="seconds a database query may take before the request is answered 503 (default %(default)s)",
    )
    p.add_argument(
        "--startup-grace",
        type=float,
        default=None,
        help="seconds after start during which a route nobody serves yet is 503 'try again' rather than "
        "404, while clusters send their first reports (default: three report intervals)",
    )
    p.add_argument(
        "--max-wait",
        type=float,
        default=60.0,
        help="longest long poll (GET /v1/commands?wait=) a device may ask for, in seconds (default %(default)s)",
    )
    p.add_argument("--ports-file", default=None, help="write {http, pid} as JSON here once listening")
    add_logging_arguments(p)
    add_config_arguments(p)
    sub = p.add_subparsers(dest="central_command", metavar="{accounts,migrate}")
    acc = sub.add_parser(
        "accounts",
        help="add, list or remove accounts",
        description="Manage accounts (devices, clusters, operators) in the central database.",
        epilog="example:\n  SHOAL_PASSWORD=... shoal central accounts add device cam-17 --db sqlite:///central.db\n"
        "  shoal central accounts list --kind device\n  shoal central accounts remove device cam-17",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    asub = acc.add_subparsers(dest="accounts_command", metavar="{add,list,remove}", required=True)
    add = asub.add_parser(
        "add",
        help="add an account (password: --password, $SHOAL_PASSWORD, or a prompt)",
        epilog="example:\n  shoal central accounts add cluster site-a --db sqlite:///central.db",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add.add_argument("kind", choices=["device", "cluster", "operator"])
    add.add_argument("name")
    add.add_argument("--password", default=None, help="the password (visible to other users: prefer the env)")
    ls = asub.add_parser(
        "list",
        help="list accounts (names and kinds, never secrets)",
        epilog="example:\n  shoal central accounts list --kind cluster --db sqlite:///central.db",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ls.add_argument("--kind", choices=["device", "cluster", "operator"], default=None)
    rm = asub.add_parser(
        "remove",
        help="remove an account",
        epilog="example:\n  shoal central accounts remove device cam-17 --db sqlite:///central.db",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rm.add_argument("kind", choices=["device", "cluster", "operator"])
    rm.add_argument("name")
    mig = sub.add_parser(
        "migrate",
        help="bring the database schema to the newest revision (the server also does it on start)",
        epilog="example:\n  shoal central migrate --db postgresql://shoal@db.example/shoal",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for q in (add, ls, rm, mig):
        q.add_argument("--db", dest="sub_db", default=None, help="database URL (as for shoal central)")


def _db(args: argparse.Namespace) -> str:
    return getattr(args, "sub_db", None) or args.db or os.environ.get("SHOAL_CENTRAL_DB") or DEFAULT_DB


def _read_password() -> str | None:
    import getpass

    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        return line.rstrip("\n") or None
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        print("shoal central: the two passwords differ", file=sys.stderr)
        return None
    return first


async def _accounts(args: argparse.Namespace) -> int:
    from shoal.central import passwords
    from shoal.central.db import AccountExists, Store
    from shoal.protocol.central_messages import NAME_PATTERN

    store = Store(_db(args))
    try:
        await store.open()
        if args.accounts_command == "list":
            rows = await store.list_accounts(args.kind)
            for r in rows:
                print(f"{r.kind:9s} {r.name}")
            if not rows:
                print("(no accounts)", file=sys.stderr)
            return 0
        if args.accounts_command == "remove":
            if not await store.remove_account(args.kind, args.name):
                print(f"shoal central: no {args.kind} account named {args.name!r}", file=sys.stderr)
                return 1
            print(f"removed {args.kind} {args.name}")
            return 0
        if not re.match(NAME_PATTERN, args.name):
            print(f"shoal central: {args.name!r} is not a valid name", file=sys.stderr)
            return 2
        password = args.password or os.environ.get("SHOAL_PASSWORD") or _read_password()
        why = passwords.check_new_password(password)
        if why:
            print(f"shoal central: {why}", file=sys.stderr)
            return 2
        assert password is not None
        try:
            await store.add_account(args.kind, args.name, passwords.hash_password(password))
        except AccountExists as e:
            print(f"shoal central: {e}", file=sys.stderr)
            return 1
        print(f"added {args.kind} {args.name}")
        return 0
    finally:
        await store.close()


async def _migrate(args: argparse.Namespace) -> int:
    from shoal.central.db import Store
    from shoal.database import redact

    store = Store(_db(args))
    try:
        await store.migrate()
    finally:
        await store.close()
    print(f"database {redact(_db(args))} is at the newest schema")
    return 0


def run(args: argparse.Namespace) -> int:
    from shoal.aio import run as aio_run
    from shoal.aio import setup_logging, split_hostport
    from shoal.httpserver import wait_for_stop_signal, write_ports_file

    setup_logging(args.log_level, "central", args.log_format)
    if args.central_command == "accounts":
        return aio_run(_accounts(args))
    if args.central_command == "migrate":
        return aio_run(_migrate(args))

    from shoal.central.server import Central, CentralConfig

    host, port = split_hostport(args.http, 7000)
    bootstrap = None
    if args.bootstrap_operator:
        pw = os.environ.get("SHOAL_OPERATOR_PASSWORD", "")
        if not pw:
            print("shoal central: --bootstrap-operator needs the password in $SHOAL_OPERATOR_PASSWORD")
            return 2
        bootstrap = (args.bootstrap_operator, pw)
    cfg = CentralConfig(
        http_host=host,
        http_port=port,
        db_url=_db(args),
        token_ttl_s=args.token_ttl,
        session_ttl_s=args.session_ttl,
        report_interval_s=args.report_interval,
        webhook_url=args.webhook,
        webhook_interval_s=args.webhook_interval,
        webhook_timeout_s=min(5.0, args.webhook_interval),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        bootstrap_operator=bootstrap,
        db_timeout_s=args.db_timeout,
        startup_grace_s=args.startup_grace,
        max_wait_s=args.max_wait,
    )
    try:
        central = Central(cfg)
    except ValueError as e:
        print(f"shoal central: {e}")
        return 2

    async def main() -> int:
        await central.start()
        write_ports_file(args.ports_file, {"http": central.http_port})
        await wait_for_stop_signal()
        await central.stop()
        return 0

    return aio_run(main())
