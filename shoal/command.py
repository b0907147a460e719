"""Running one ``shoal`` command from its module: parse its arguments, put its declared settings in
force (flags, then ``SHOAL_*`` variables, then ``--config``'s file: ``shoal.config``) and run it.
``shoal.cli`` uses this for every command; a process that becomes a worker (the local engine's
pre-started interpreter, a Ray actor) uses it for ``shoal worker`` without the whole command table.

A command module exposes ``HELP`` (one line), ``EXAMPLE``, ``add_arguments(parser)`` and
``run(args) -> int``, and may expose ``check(args) -> str | None``: what is wrong with its settings
beyond their types (a block of its file that does not hold together), checked before ``--print-config``
prints them and before ``run``.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType


def command_parser(name: str, module: ModuleType, parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """``parser`` (a new one for ``shoal NAME`` when None) with the command's arguments."""
    if parser is None:
        parser = argparse.ArgumentParser(prog=f"shoal {name}", description=module.HELP)
    module.add_arguments(parser)
    parser.set_defaults(_module=module, _parser=parser, command=name)
    return parser


def execute(args: argparse.Namespace) -> int:
    """Run a parsed command: its settings resolved first (``--print-config`` prints them and stops)."""
    from shoal.config import ConfigError, MissingSetting, declared, printable, resolve

    if declared(args):
        try:
            settings = resolve(args)
        except MissingSetting as e:
            args._parser.error(str(e))  # as argparse says it, with the usage line
        except ConfigError as e:
            print(f"shoal {args.command}: {e}", file=sys.stderr)
            return 2
        check = getattr(args._module, "check", None)
        problem = check(args) if check is not None else None
        if problem:
            print(f"shoal {args.command}: {problem}", file=sys.stderr)
            return 2
        if getattr(args, "print_config", False):
            print(printable(settings), end="")
            return 0
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


def run_command(name: str, module: ModuleType, argv: list[str]) -> int:
    """``shoal NAME ARGV...`` in this process."""
    return execute(command_parser(name, module).parse_args(argv))
