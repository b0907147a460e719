"""Declarations checked by msgspec, with errors that name where: ``<where>.models.m.min: Expected
`int`, got `str```. One place for the conversion every configuration block and document uses."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

T = TypeVar("T")


def convert(value: Any, typ: type[T], where: str, error: type[Exception] = ValueError) -> T:
    """``value`` (decoded JSON or YAML) as ``typ``; ``error`` naming the field path otherwise."""
    try:
        return msgspec.convert(value, typ, str_keys=True)
    except msgspec.ValidationError as e:
        msg = str(e)
        text, sep, path = msg.rpartition(" - at `$")
        if not sep:
            raise error(f"{where}: {msg}") from None
        raise error(f"{where}{path.rstrip('`')}: {text}") from None
