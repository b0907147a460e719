"""``shoal central``: run the central directory, manage its accounts, migrate its database."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Annotated

from shoal.config import LOG_FORMAT, LOG_LEVEL, LogFormat, LogLevel, Opt, Settings, add_settings

HELP = "Run the central directory: accounts, live clusters, routes with signed tokens, status page."
EXAMPLE = """
SHOAL_OPERATOR_PASSWORD=... shoal central --http 0.0.0.0:7000 --db sqlite:///central.db --bootstrap-operator admin
SHOAL_PASSWORD=... shoal central accounts add cluster site-a --db sqlite:///central.db
shoal central accounts list --db postgresql://shoal@db.example/shoal
"""
DEFAULT_DB = "sqlite:///./shoal-central.db"


class CentralSettings(Settings, kw_only=True):
    """``shoal central``: its flags, the keys of its --config file, its SHOAL_CENTRAL_* variables."""

    COMMAND = "central"

    http: Annotated[str, Opt("address to serve HTTP on (default %(default)s)")] = "127.0.0.1:7000"
    db: Annotated[
        str,
        Opt(
            "database URL: sqlite:///PATH or postgresql://USER@HOST/DB "
            "(default %(default)s; also $SHOAL_CENTRAL_DB)"
        ),
    ] = DEFAULT_DB
    token_ttl: Annotated[float, Opt("lifetime of route tokens in seconds (default %(default)s)")] = 300.0
    session_ttl: Annotated[
        float, Opt("lifetime of device session tokens from /v1/login (default %(default)s)")
    ] = 3600.0
    report_interval: Annotated[
        float,
        Opt("seconds between cluster reports; 3 missed reports take a cluster out (default %(default)s)"),
    ] = 1.0
    webhook: Annotated[str | None, Opt("URL to POST the status (clusters, load) to, as JSON")] = None
    webhook_interval: Annotated[float, Opt("seconds between webhook posts (default %(default)s)")] = 10.0
    tls_cert: Annotated[str | None, Opt("certificate (PEM) to serve HTTPS")] = None
    tls_key: Annotated[str | None, Opt("private key (PEM) for --tls-cert")] = None
    bootstrap_operator: Annotated[
        str | None,
        Opt(
            "create this operator account on start if missing; password from $SHOAL_OPERATOR_PASSWORD",
            metavar="NAME",
        ),
    ] = None
    # No flag: a password on a command line is visible to every user of the machine.
    operator_password: Annotated[
        str | None,
        Opt("--bootstrap-operator's password", flag=False, secret=True, env=("SHOAL_OPERATOR_PASSWORD",)),
    ] = None
    db_timeout: Annotated[
        float,
        Opt("seconds a database query may take before the request is answered 503 (default %(default)s)"),
    ] = 5.0
    auth_cache: Annotated[
        float,
        Opt(
            "seconds a checked password is trusted without checking it again; a removed account or a "
            "changed password takes effect on other replicas within this (default %(default)s)"
        ),
    ] = 10.0
    startup_grace: Annotated[
        float | None,
        Opt(
            "seconds after start during which a route nobody serves yet is 503 'try again' rather than "
            "404, while clusters send their first reports (default: three report intervals)"
        ),
    ] = None
    max_wait: Annotated[
        float,
        Opt(
            "longest long poll (GET /v1/commands?wait=) a device may ask for, in seconds "
            "(default %(default)s)"
        ),
    ] = 60.0
    trace_endpoint: Annotated[
        str | None,
        Opt(
            "send traces of route requests to this OTLP/HTTP endpoint (e.g. "
            "http://collector:4318/v1/traces; needs shoal[trace]); default: no tracing"
        ),
    ] = None
    trace_ratio: Annotated[
        float,
        Opt(
            "share of routes traced among those asked for without a traceparent (those with one "
            "follow the device's choice); default %(default)s"
        ),
    ] = 1.0
    ports_file: Annotated[str | None, Opt("write {http, pid} as JSON here once listening")] = None
    log_level: Annotated[LogLevel, LOG_LEVEL] = "info"
    log_format: Annotated[LogFormat, LOG_FORMAT] = "text"


class AccountSettings(Settings, kw_only=True):
    """``shoal central accounts add``: the new account's password (otherwise a prompt)."""

    COMMAND = "central accounts add"
    CONFIG_FILE = False

    password: Annotated[
        str | None,
        Opt("the password (visible to other users: prefer the env)", secret=True, env=("SHOAL_PASSWORD",)),
    ] = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_settings(p, CentralSettings)
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
    add_settings(add, AccountSettings)
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
    return getattr(args, "sub_db", None) or args.db


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
        password = args.password or _read_password()
        if password is None:
            print(
                "shoal central: no password: set SHOAL_PASSWORD, give --password, or type it at a terminal",
                file=sys.stderr,
            )
            return 2
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
    from shoal.aio import settle_gc, setup_logging, split_hostport
    from shoal.httpserver import wait_for_stop_signal, write_ports_file

    setup_logging(args.log_level, "central", args.log_format)
    if args.central_command in ("accounts", "migrate"):
        from shoal.database import redact

        try:
            return aio_run(_accounts(args) if args.central_command == "accounts" else _migrate(args))
        except OSError as e:  # the database cannot be reached: one line that names it
            print(f"shoal central: database {redact(_db(args))}: {e}", file=sys.stderr)
            return 1

    from shoal.central.server import Central, CentralConfig

    host, port = split_hostport(args.http, 7000)
    bootstrap = None
    if args.bootstrap_operator:
        pw = args.operator_password or ""
        if not pw:
            print("shoal central: --bootstrap-operator needs the password in $SHOAL_OPERATOR_PASSWORD", file=sys.stderr)
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
        auth_cache_s=args.auth_cache,
        startup_grace_s=args.startup_grace,
        max_wait_s=args.max_wait,
        trace_endpoint=args.trace_endpoint,
        trace_ratio=args.trace_ratio,
    )
    try:
        central = Central(cfg)
    except ValueError as e:
        print(f"shoal central: {e}", file=sys.stderr)
        return 2

    async def main() -> int:
        try:
            await central.start()
        except ConnectionError as e:  # the database server did not answer (a port in use is an OSError)
            from shoal.database import redact

            raise ConnectionError(f"database {redact(cfg.db_url)}: {e}") from e
        settle_gc()
        write_ports_file(args.ports_file, {"http": central.http_port})
        await wait_for_stop_signal()
        await central.stop()
        return 0

    return aio_run(main())
