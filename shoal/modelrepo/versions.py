"""The order of model versions, one definition for the repository, the gateway and central.

Numeric versions sort by value ("10" after "9") and above every named version ("beta",
"2026-05-01"), which sort by name among themselves. So the newest of 2, 10 and beta is 10: a named
version is served when a request names it, or when named versions are all there is. (Numbers as
versions are the model repository's convention; a name is a label, not a promise of being newer.)
"""

from __future__ import annotations

from collections.abc import Iterable


def is_number(v: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also says yes to "²" and other digits ``int`` refuses."""
    return v.isascii() and v.isdigit()


def version_key(v: str) -> tuple[int, int, str]:
    return (1, int(v), "") if is_number(v) else (0, 0, v)


def newest_version(versions: Iterable[str]) -> str | None:
    return max(versions, key=version_key, default=None)
