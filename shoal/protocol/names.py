"""What a model name or version may be: one definition for every place a name enters shoal (HTTP paths,
the repository API, manifests, ``shoal worker --model/--version``, pipeline steps, autoscale blocks,
engines, federation publishing, a worker's HELLO, central's routes).

A name becomes a folder of the model repository (``<repo>/<model>/<version>/``), a Prometheus label
and part of a URL, so it is held to what is safe in all three: ASCII letters, digits, ``_``, ``.`` and
``-``, starting with a letter or a digit (so never ``.``, ``..`` or a hidden file), at most 128
characters. No ``/``, ``\\``, ``%``, NUL or anything a second decoding could turn into one. Pure.
"""

from __future__ import annotations

import re

MAX_NAME = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")  # used with fullmatch: no "$" newline slip
# The same rule as a JSON Schema pattern (OpenAPI documents, msgspec's Meta): msgspec matches with
# re.search, whose "$" also matches before a final newline, hence the look-ahead.
PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}(?!\n)$"
RULE = f"1-{MAX_NAME} ASCII letters, digits, '_', '.', '-', starting with a letter or digit"


class InvalidName(ValueError):
    """A model name or version that shoal will not use; the message says what is allowed."""


def valid_name(s: object) -> bool:
    return isinstance(s, str) and len(s) <= MAX_NAME and _NAME.fullmatch(s) is not None


def check_name(s: object, what: str = "model name") -> str:
    """``s`` when it is a valid model name or version, else ``InvalidName`` naming ``what`` and the rule
    (the offending value shortened and escaped: it may be hostile)."""
    if valid_name(s):
        return s  # type: ignore[return-value]
    shown = repr(s)[:80] + ("..." if len(repr(s)) > 80 else "")
    raise InvalidName(f"invalid {what} {shown}: must be {RULE}")
