"""Configuration for every component: a YAML file, overridden by environment variables, overridden by
flags. The file's keys are the command's long option names (``http``, ``max-queue``, ``api-key`` ...),
plus a few blocks that have no flag (the gateway's ``pipelines``). Environment variables are
``SHOAL_<COMMAND>_<OPTION>`` (``SHOAL_CLUSTER_MAX_QUEUE=64``). Errors name the file and the key;
``--print-config`` shows the settings in force, secrets masked.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml

SECRET_WORDS = ("secret", "password", "key")
SECRET_NAMES = ("token",)


class ConfigError(ValueError):
    pass


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=None,
        help="YAML file with any of these options (flags and SHOAL_* variables override it)",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the settings in force (secrets masked) and exit"
    )


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    out = {}
    for a in parser._actions:  # argparse keeps its actions here; there is no public accessor
        if a.option_strings and a.dest not in ("help", "config", "print_config"):
            out[a.dest] = a
    return out


def _given_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The options the command line set, as argparse itself reads them (so ``--max-q 5``, an
    abbreviation argparse accepts, counts as ``--max-queue``): a parser with the same options and
    every default suppressed parses the command line; what it returns was given."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=parser.allow_abbrev)
    for a in parser._actions:  # argparse has no public accessor for a parser's actions
        if a.option_strings and not isinstance(a, argparse._HelpAction):
            quiet = copy.copy(a)
            quiet.default = argparse.SUPPRESS
            quiet.required = False
            probe._add_action(quiet)
    try:
        given, _ = probe.parse_known_args(argv)
    except SystemExit:  # cannot happen for a command line the real parser accepted
        return set()
    return set(vars(given))


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
        return [_convert_one(action, v, where) for v in items]
    return _convert_one(action, value, where)


def _convert_one(action: argparse.Action, value: Any, where: str) -> Any:
    t = action.type
    try:
        v = t(value) if t is not None and not isinstance(value, t if isinstance(t, type) else ()) else value
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {getattr(t, '__name__', t)}, got {value!r}") from None
    if t is None and isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if action.choices is not None and v not in action.choices:
        raise ConfigError(f"{where}: {v!r} is not one of {', '.join(map(str, action.choices))}")
    return v


def apply_config(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    argv: list[str],
    command: str,
    blocks: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Fill ``args`` from the file and the environment where no flag was given. Returns the blocks
    (keys without a flag, such as ``pipelines``) found in the file."""
    actions = _actions(parser)
    given = _given_dests(parser, argv)
    extra: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: must be a map of options")
        for key, value in doc.items():
            dest = str(key).replace("-", "_")
            if str(key) in blocks:
                extra[str(key)] = value
                continue
            action = actions.get(dest)
            if action is None:
                known = sorted({a.option_strings[-1].lstrip("-") for a in actions.values()} | set(blocks))
                raise ConfigError(f"{path}: unknown key '{key}' (known: {', '.join(known)})")
            if dest not in given:
                setattr(args, dest, _convert(action, value, f"{path}: key '{key}'"))
    prefix = f"SHOAL_{command.upper()}_"
    for dest, action in actions.items():
        env = prefix + dest.upper()
        if env in os.environ and dest not in given:
            setattr(args, dest, _convert(action, os.environ[env], f"environment variable {env}"))
    return extra


def _mask_url_password(v: Any) -> Any:
    """``postgresql://user:pw@host/db`` -> ``postgresql://user:***@host/db``."""
    if isinstance(v, str):
        return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", v)
    if isinstance(v, list):
        return [_mask_url_password(x) for x in v]
    return v


def printable(args: argparse.Namespace, parser: argparse.ArgumentParser, blocks: dict[str, Any]) -> str:
    out: dict[str, Any] = {}
    for dest, action in _actions(parser).items():
        v = _mask_url_password(getattr(args, dest, None))
        if v and (any(w in dest for w in SECRET_WORDS) or dest in SECRET_NAMES):
            v = ["***"] * len(v) if isinstance(v, list) else "***"
        out[action.option_strings[-1].lstrip("-")] = v
    out.update(blocks)
    return yaml.safe_dump(out, sort_keys=False)
