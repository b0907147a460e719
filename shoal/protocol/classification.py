"""The classification extension of the Open Inference Protocol (as Triton serves it): an output
requested with ``parameters.classification: k`` comes back as its top ``k`` classes instead of its
values, each a BYTES string ``score:index`` or ``score:index:label``, highest score first, labels from
the model's manifest (``labels``, by output name). Pure functions.

Shapes as Triton's: for a model that batches, each row of the output is one entry and its classes
are the row's elements (the output ``[B, 10]`` with ``k`` 3 becomes ``[B, 3]``); for a model that does
not, the whole output is one entry (``[k]``). ``k`` larger than the classes gives them all. Scores
are written as Triton writes them (C++ ``std::to_string``: six decimals for floats, integers as
they are).
"""

from __future__ import annotations

from typing import Any

import numpy as np

MAX_CLASSES = 1 << 16  # a k beyond this is refused: the answer would be larger than any label set
# Strings one request's classification may make (rows times k): each is a Python object made on the
# gateway's event loop, about half a microsecond apiece; 64 Ki of them is a few tens of milliseconds.
MAX_STRINGS = 1 << 16


class ClassificationError(ValueError):
    """A classification the output cannot give (the message says why; a 400)."""


def class_count(value: Any, output: str) -> int | None:
    """The ``classification`` parameter of a requested output, checked: None when absent (or 0, as
    tritonclient's default ``class_count``), else a count of 1 to ``MAX_CLASSES``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CLASSES:
        raise ClassificationError(
            f"output '{output}': 'classification' must be an integer from 0 to {MAX_CLASSES}, got {value!r:.40}"
        )
    return value or None


def _score(v: Any, integer: bool) -> str:
    return str(int(v)) if integer else f"{float(v):f}"


def top_k(values: np.ndarray, k: int, batched: bool, labels: list[str] | None = None) -> np.ndarray:
    """The top ``k`` classes of each entry of ``values`` as a BYTES array (object array of bytes)."""
    if values.dtype == object or values.dtype.kind not in "biuf":
        raise ClassificationError(f"classification needs a numeric output, this one is {values.dtype}")
    if batched:
        if values.ndim == 0:
            raise ClassificationError("classification of a batched output needs a batch dimension")
        rows = values.reshape(values.shape[0], -1)
    else:
        rows = values.reshape(1, -1)
    n = rows.shape[1]
    kk = min(k, n)
    if rows.shape[0] * kk > MAX_STRINGS:
        raise ClassificationError(
            f"{rows.shape[0]} rows of top {kk} would make {rows.shape[0] * kk} strings; at most {MAX_STRINGS}"
        )
    integer = values.dtype.kind in "biu"
    # Highest first; equal scores in index order (a stable sort of the negated scores).
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :kk]
    out = np.empty((rows.shape[0], kk), dtype=object)
    for r in range(rows.shape[0]):
        for j, i in enumerate(order[r]):
            text = f"{_score(rows[r, i], integer)}:{int(i)}"
            if labels is not None and int(i) < len(labels):
                text += f":{labels[int(i)]}"
            out[r, j] = text.encode()
    return out if batched else out.reshape(kk)


def classify(
    outputs: dict[str, np.ndarray],
    counts: dict[str, int],
    batched: bool,
    labels: dict[str, list[str]],
) -> dict[str, np.ndarray]:
    """``outputs`` with each output named in ``counts`` replaced by its top classes."""
    out = dict(outputs)
    for name, k in counts.items():
        try:
            out[name] = top_k(outputs[name], k, batched, labels.get(name))
        except ClassificationError as e:
            raise ClassificationError(f"output '{name}': {e}") from None
    return out
