"""Settings of the commands, each declared once.

A command declares its settings as a ``Settings`` struct (msgspec): one field per setting, with its
type, its default (none: required) and an ``Opt`` holding its help, whether it is secret, whether it
has a flag, and the bare environment variables that also set it. From that one declaration come:

* the flags: ``add_settings`` calls argparse's ``add_argument`` for each setting, every default
  ``None``, so a setting given on the command line is one whose value is not ``None`` after an
  ordinary ``parse_args`` (a flag always yields a value). argparse's abbreviations work as argparse
  reads them: ``--max-q 5`` is ``--max-queue 5`` and beats the file;
* the YAML file's keys (``--config FILE``): the long option names (``max-queue``, ``api-key``), each
  value checked against the field's type by msgspec, unknown keys refused;
* the environment: ``SHOAL_<COMMAND>_<OPTION>`` for every setting (``SHOAL_CLUSTER_MAX_QUEUE``), and
  the bare names a setting declares (``SHOAL_CLUSTER_SECRET`` for the worker's ``secret``,
  ``SHOAL_API_KEYS`` for the gateway's ``api-key``).

Precedence: flag > ``SHOAL_<COMMAND>_<OPTION>`` > file > default. A bare name stands in for a setting
that is otherwise unset or empty (it is the documented default: "default: $SHOAL_CENTRAL_PASSWORD");
for a list, its comma-separated items are added to the others'. Errors name the file or the variable
and the key; ``--print-config`` shows the settings in force, secrets masked.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import msgspec

# A parser's defaults that name the Settings declared on it; one per level ("central accounts add"
# under "central"), since a subparser's defaults override its parent's on the shared namespace.
_DECLARED = "_settings:"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class ConfigError(ValueError):
    """A file or variable that cannot be read as the settings; the message names where and the key."""


class MissingSetting(ConfigError):
    """A required setting that no flag, variable or file gave."""


@dataclass(frozen=True)
class Opt:
    """How one setting is given, beside its type and default (``Annotated[int, Opt(...)]``)."""

    help: str  # "%(default)s" is the declared default
    secret: bool = False  # masked by --print-config
    flag: bool = True  # False: no flag (file and environment only)
    environment: bool = True  # False: not from SHOAL_<COMMAND>_<OPTION> (the gateway's file-only blocks)
    env: tuple[str, ...] = ()  # bare variables standing in for it when unset or empty
    parse: Callable[[Any], Any] | None = None  # text or number -> value, where the type is not enough
    metavar: str | None = None
    group: str | None = None  # a titled group in --help


# The logging settings every server command has (shoal.aio.setup_logging reads them).
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
LOG_LEVEL = Opt("how much to log (default %(default)s)")
LOG_FORMAT = Opt("text lines, or one JSON object per line (default %(default)s)")


class Settings(msgspec.Struct, kw_only=True, rename="kebab"):
    """Base of a command's settings. A subclass sets ``COMMAND`` (which names its variables:
    ``SHOAL_<COMMAND>_<OPTION>``, words of a subcommand joined by ``_``) and passes ``kw_only=True``
    (msgspec does not inherit it) so that a required setting may follow optional ones."""

    COMMAND: ClassVar[str] = ""
    CONFIG_FILE: ClassVar[bool] = True  # has --config and --print-config


@dataclass(frozen=True)
class Field:
    name: str  # the attribute, argparse's dest
    key: str  # the file key, the long option without its dashes
    type: Any  # without Annotated and Optional
    opt: Opt
    default: Any  # msgspec.NODEFAULT: required
    variable: str  # SHOAL_<COMMAND>_<OPTION>
    optional: bool  # None is a value


@functools.cache
def fields(cls: type[Settings]) -> tuple[Field, ...]:
    out = []
    prefix = "SHOAL_" + "_".join(cls.COMMAND.upper().replace("-", "_").split()) + "_"
    for f in msgspec.structs.fields(cls):
        typ, opt = f.type, None
        if get_origin(typ) is Annotated:
            typ, *meta = get_args(typ)
            opt = next((m for m in meta if isinstance(m, Opt)), None)
        if opt is None:
            raise TypeError(f"{cls.__name__}.{f.name}: declare it as Annotated[type, Opt(help)]")
        args = get_args(typ)
        optional = get_origin(typ) in (Union, types.UnionType) and type(None) in args
        if optional:
            rest = [a for a in args if a is not type(None)]
            typ = rest[0] if len(rest) == 1 else Union[tuple(rest)]  # noqa: UP007 (built from a tuple)
        default = f.default_factory() if f.default_factory is not msgspec.NODEFAULT else f.default
        out.append(Field(f.name, f.encode_name, typ, opt, default, prefix + f.name.upper(), optional))
    return tuple(out)


def _item_type(typ: Any) -> Any:
    """The item type of a list setting, or None."""
    return get_args(typ)[0] if get_origin(typ) is list else None


def variables(cls: type[Settings]) -> set[str]:
    """Every environment variable that sets one of these settings."""
    return {f.variable for f in fields(cls) if f.opt.environment} | {v for f in fields(cls) for v in f.opt.env}


# ------------------------------------------------------------------------------------- the flags


def add_settings(parser: argparse.ArgumentParser, cls: type[Settings]) -> None:
    """A flag for each setting that has one (and ``--config``, ``--print-config``), all through
    argparse's public ``add_argument``; the declaration is recorded in the parser's defaults."""
    if cls.CONFIG_FILE:
        parser.add_argument(
            "--config",
            default=None,
            help="YAML file with any of these options (flags and SHOAL_* variables override it)",
        )
        parser.add_argument(
            "--print-config",
            action="store_true",
            help="print the settings in force (secrets masked) and exit",
        )
    groups: dict[str, Any] = {}
    for f in fields(cls):
        if not f.opt.flag:
            continue
        target: Any = parser
        if f.opt.group:
            if f.opt.group not in groups:
                groups[f.opt.group] = parser.add_argument_group(f.opt.group)
            target = groups[f.opt.group]
        target.add_argument("--" + f.key, dest=f.name, default=None, help=_help(f), **_flag_kind(f))
    parser.set_defaults(**{_DECLARED + cls.COMMAND: cls})


def _flag_kind(f: Field) -> dict[str, Any]:
    if f.type is bool:
        return {"action": "store_true"}
    item = _item_type(f.type)
    if item is not None:
        return {"action": "append", **_value_kind(item, f.opt)}
    return _value_kind(f.type, f.opt)


def _value_kind(typ: Any, opt: Opt) -> dict[str, Any]:
    kind: dict[str, Any] = {"metavar": opt.metavar} if opt.metavar else {}
    if opt.parse is not None:
        kind["type"] = opt.parse
    elif get_origin(typ) is Literal:
        kind["choices"] = get_args(typ)
    elif typ in (int, float):
        kind["type"] = typ
    return kind


def _help(f: Field) -> str:
    # The parser's defaults are None (not given), so the declared default is written in here.
    shown = "" if f.default is msgspec.NODEFAULT else str(f.default)
    text = shown.join(f.opt.help.split("%(default)s"))
    unnamed = [v for v in f.opt.env if f"${v}" not in text]
    if unnamed:
        text += " (also " + ", ".join(f"${v}" for v in unnamed) + ")"
    return text.replace("%", "%%")


# ------------------------------------------------------------------------------------- the values


def declared(args: argparse.Namespace) -> list[type[Settings]]:
    """The Settings declared on the parsers that read ``args``, the command's before a subcommand's."""
    found = [v for k, v in vars(args).items() if k.startswith(_DECLARED)]
    return sorted(found, key=lambda c: len(c.COMMAND.split()))


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> list[Settings]:
    """The settings in force for each declared level, from the flags in ``args``, the environment and
    the file; their values are also set on ``args`` (what the command's ``run`` reads)."""
    environ = os.environ if environ is None else environ
    out = []
    for cls in declared(args):
        path = getattr(args, "config", None) if cls.CONFIG_FILE else None
        doc = read_file(Path(path), cls) if path else {}
        values = {f.name: _value(f, getattr(args, f.name, None), environ, doc) for f in fields(cls)}
        missing = [f for f in fields(cls) if values[f.name] is msgspec.NODEFAULT]
        if missing:
            # argparse's own wording, naming the other places the setting may come from.
            raise MissingSetting(
                "the following arguments are required: "
                + ", ".join(f"--{f.key} (or '{f.key}' in --config, or ${f.variable})" for f in missing)
            )
        settings = cls(**values)
        for name, value in values.items():
            setattr(args, name, value)
        out.append(settings)
    return out


def _value(f: Field, flag: Any, environ: Mapping[str, str], doc: dict[str, Any]) -> Any:
    if flag is not None:
        value = flag
    elif f.opt.environment and f.variable in environ:
        value = _from_text(f, environ[f.variable], f"environment variable {f.variable}")
    elif f.name in doc:
        value = doc[f.name]
    else:
        value = list(f.default) if isinstance(f.default, list) else f.default  # not the shared one
    for name in f.opt.env:
        if name not in environ:
            continue
        bare = _from_text(f, environ[name], f"environment variable {name}")
        if isinstance(value, list):
            value = value + bare
        elif value is msgspec.NODEFAULT or not value:
            value = bare
    return value


def read_file(path: Path, cls: type[Settings]) -> dict[str, Any]:
    """A YAML file of these settings, by attribute name, each value checked against its type."""
    try:  # PyYAML comes with every server extra; the device side (the base install) may lack it
        import yaml
    except ImportError:
        raise ConfigError(f"{path}: reading a configuration file needs PyYAML: pip install pyyaml") from None
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: must be a map of options")
    by_key = {f.key: f for f in fields(cls)}
    out = {}
    for key, value in doc.items():
        f = by_key.get(str(key).replace("_", "-"))  # max_queue was always read as max-queue
        if f is None:
            raise ConfigError(f"{path}: unknown key '{key}' (known: {', '.join(sorted(by_key))})")
        out[f.name] = _from_document(f, value, f"{path}: key '{key}'")
    return out


def _from_text(f: Field, text: str, where: str) -> Any:
    """An environment variable's text as the setting's type (a list: comma separated)."""
    item = _item_type(f.type)
    if item is not None:
        return _items(item, f.opt, [v for v in text.split(",") if v], where)
    return _checked(f.type, f.opt, text, where)


def _from_document(f: Field, value: Any, where: str) -> Any:
    """A YAML value as the setting's type (a list also from one comma-separated string)."""
    if value is None and f.optional:
        return None
    item = _item_type(f.type)
    if item is not None:
        items = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
        return _items(item, f.opt, items, where)
    return _checked(f.type, f.opt, value, where)


def _items(typ: Any, opt: Opt, items: list[Any], where: str) -> list[Any]:
    return [_checked(typ, opt, v, f"{where}, item {i}") for i, v in enumerate(items, 1)]


def _checked(typ: Any, opt: Opt, value: Any, where: str) -> Any:
    if typ is bool and isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    if typ is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r:.80}")
    if get_origin(typ) is Literal and value not in get_args(typ):
        raise ConfigError(f"{where}: {value!r:.80} is not one of {', '.join(map(str, get_args(typ)))}")
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `version: 2` in YAML is a number
    if opt.parse is not None and isinstance(value, str):
        try:
            return opt.parse(value)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    if typ is Any:
        return value
    try:
        return msgspec.convert(value, typ, strict=False)  # lax: "64" in a variable is the int 64
    except msgspec.ValidationError as e:
        text, _, at = str(e).partition(" - at `$")
        text = text.replace("`", "")
        if not at:  # the value itself, rather than a part of it
            text = re.sub(r", got \w+$", f", got {value!r:.80}", text)
        raise ConfigError(f"{where}{at.rstrip('`')}: {text[:1].lower()}{text[1:]}") from None


# ------------------------------------------------------------------------------------- printing


def _mask_url_password(v: Any) -> Any:
    """``postgresql://user:pw@host/db`` -> ``postgresql://user:***@host/db``, anywhere in a value."""
    if isinstance(v, str):
        return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", v)
    if isinstance(v, list):
        return [_mask_url_password(x) for x in v]
    if isinstance(v, dict):
        return {k: _mask_url_password(x) for k, x in v.items()}
    return v


def printable(settings: list[Settings]) -> str:
    """The settings in force as YAML (a file ``--config`` reads), secrets masked."""
    out: dict[str, Any] = {}
    for s in settings:
        for f in fields(type(s)):
            v = _mask_url_password(getattr(s, f.name))
            if f.opt.secret and v:
                v = ["***"] * len(v) if isinstance(v, list) else "***"
            out[f.key] = v
    try:
        import yaml
    except ImportError:  # JSON is YAML too: a file --config reads back, once PyYAML is there
        return json.dumps(out, indent=2) + "\n"
    return yaml.safe_dump(out, sort_keys=False)
