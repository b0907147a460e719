"""The ``shoal`` command. Each subcommand lives in its own module, imported only when it runs, so
``shoal --help`` and the serving commands never import torch.

A subcommand module exposes ``HELP`` (one line), ``EXAMPLE`` (shown under ``--help``),
``add_arguments(parser)`` and ``run(args) -> int``. A command whose settings are declared
(``shoal.config.add_settings``) gets them in force on ``args``: flags, variables and file resolved.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from shoal.command import command_parser, execute

# name -> module; add a line here to add a command.
COMMANDS: dict[str, str] = {
    "demo": "shoal.demo",
    "cluster": "shoal.gateway.cli",
    "worker": "shoal.worker.cli",
    "infer": "shoal.client.cli",
    "bench": "shoal.bench.cli",
    "certs": "shoal.security.cli",
    "train": "shoal.train.cli",
    "predict": "shoal.train.predict",
    "fuse": "shoal.fusion.cli",
    "federation": "shoal.fusion.federation",
    "central": "shoal.central.cli",
    "multihead": "shoal.multihead.cli",
    "devices": "shoal.devices",
    "models": "shoal.client.models_cli",
    "lab": "shoal.lab.cli",
}
# The extra (pyproject.toml) each command needs beyond the base install, the device side.
EXTRAS: dict[str, str] = {
    "demo": "demo",
    "cluster": "gateway",
    "worker": "worker",
    "bench": "demo",
    "certs": "tls",
    "train": "train",
    "predict": "train",
    "fuse": "fusion",
    "federation": "fusion",
    "central": "central",
    "multihead": "train",
    "lab": "demo",
}


# What each command cannot run without: a few packages its extra brings, looked for before anything
# is imported or parsed, so the command says what to install whatever its arguments.
NEEDS: dict[str, tuple[str, ...]] = {
    "cluster": ("uvicorn", "starlette", "yaml"),
    "worker": ("yaml", "PIL"),
    "central": ("uvicorn", "starlette", "sqlalchemy"),
    "demo": ("uvicorn", "onnxruntime", "PIL"),
    "bench": ("uvicorn", "onnxruntime", "PIL"),
    "lab": ("uvicorn", "sqlalchemy", "matplotlib"),
}


def missing_extra(command: str, e: ModuleNotFoundError) -> str:
    extra = EXTRAS.get(command)
    what = f"pip install 'shoal[{extra}]'" if extra else "pip install shoal again"
    missing = (e.name or "?").split(".")[0]
    return f"shoal {command} needs packages this install leaves out (no module named '{missing}'): {what}"


def _absent(command: str) -> str | None:
    """The first package ``command`` needs that is not installed, or None."""
    return next((m for m in NEEDS.get(command, ()) if importlib.util.find_spec(m) is None), None)


def _missing(e: ImportError) -> bool:
    """A third-party package is not installed (not a bug of shoal's own imports)."""
    return isinstance(e, ModuleNotFoundError) and not (e.name or "shoal").startswith("shoal")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal",
        description="shoal: elastic, distributed AI compute for edge devices.",
        epilog="Run 'shoal COMMAND --help' for a command's options and an example.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"see 'shoal {name} --help'")
            continue
        try:
            absent = _absent(name)
            if absent is not None:
                raise ModuleNotFoundError(name=absent)
            mod = importlib.import_module(modname)
        except ImportError as e:
            if not _missing(e):
                raise
            p = sub.add_parser(
                name, help=f"(needs 'shoal[{EXTRAS.get(name)}]')", description=missing_extra(name, e)
            )
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            p.set_defaults(_missing=missing_extra(name, e))
            continue
        p = sub.add_parser(
            name,
            help=mod.HELP,
            description=mod.HELP,
            epilog="example:\n  " + mod.EXAMPLE.strip().replace("\n", "\n  "),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command_parser(name, mod, p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the module of the command being run (others stay unimported).
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    args._argv = list(argv)  # a command that runs copies of itself (shoal cluster --processes) reuses them
    if getattr(args, "_missing", None):
        print(args._missing, file=sys.stderr)
        return 2
    if not getattr(args, "_module", None):
        parser.print_help()
        return 0 if not argv else 2
    try:
        return execute(args)
    except ImportError as e:  # a command imports what its extra brings when it runs
        if not _missing(e):
            raise
        print(missing_extra(args.command, e), file=sys.stderr)  # type: ignore[arg-type]
        return 2


if __name__ == "__main__":
    sys.exit(main())
