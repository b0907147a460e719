"""Weighted-average model fusion (paper 003, Algorithm 1) as pure functions.

No engine lives here: the in-process runner (``shoal.fusion.runner``) and the Flower app
(``shoal.fusion.flower_app``) both call these functions, like a Flower ``Strategy`` is separate from
the transport that runs it. Everything works on numpy arrays and, unchanged, on torch tensors.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

Pair = tuple[int, int]

# The two readings of Algorithm 1's update order. "sequential" is the pseudo-code as printed: B moves
# toward A's *new* value. "simultaneous" moves both toward each other's old value, which keeps the
# pair's mean (what the paper's prose about F above and below 0.5 describes).
UPDATES = ("sequential", "simultaneous")


def _where(cond: Any, x: Any, y: Any) -> Any:
    """``np.where`` for numpy arrays, ``torch.where`` for tensors (torch is never imported here)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(cond, torch.Tensor):
        return torch.where(cond, x, y)
    return np.where(cond, x, y)


def check_update(update: str) -> str:
    if update not in UPDATES:
        raise ValueError(f"unknown update order {update!r}: use one of {', '.join(UPDATES)}")
    return update


def fuse(a: Any, b: Any, f: float | Any, update: str = "sequential") -> tuple[Any, Any]:
    """Fuse two peers' weights as Algorithm 1; returns the new ``(A, B)``, inputs untouched.

    For each weight ``w``:

    - if ``A[w] == 0``: ``A[w] = B[w]`` (B keeps its value);
    - else if ``B[w] == 0``: ``B[w] = A[w]`` (A keeps its value);
    - else ``A[w] = (1-F) A[w] + F B[w]`` and ``B[w] = (1-F) B[w] + F A[w]``, where the second line's
      ``A[w]`` is, by ``update``:

      - ``"sequential"`` (the default, Algorithm 1 as printed): the *updated* ``A[w]``. The pair's
        mean moves (``A=1, B=3, F=0.5`` gives ``(2, 2.5)``) and the difference shrinks by exactly
        ``(1-F)**2``: ``B' - A' = (1-F)(B - A') = (1-F)**2 (B - A)``.
      - ``"simultaneous"``: the old ``A[w]``. The pair's mean is kept (``(2, 2)`` above) and the
        difference shrinks by ``|1-2F|``.

    What the paper leaves open and what shoal chose: the zero test is exact (``== 0``), on the values
    the pair holds when it fuses, i.e. after any earlier fusion of the same round. In the zero
    branches nothing is averaged: the copy uses the *pre-fusion* value of the non-zero side, so both
    peers leave with that value whatever ``F``. When both are zero, both stay zero. ``F`` may be a
    scalar or an array broadcastable to the weights (one rate per replica, used by the batched
    runner's sweeps).
    """
    check_update(update)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        # The engines fuse whole peers at once: lerp is one pass instead of three, and the zero rule
        # (rare in trained weights) is applied only when a zero is present.
        a_avg = torch.lerp(a, b, f)
        b_avg = torch.lerp(b, a_avg if update == "sequential" else a, f)
        a_zero, b_zero = a == 0, b == 0
        if not (bool(a_zero.any()) or bool(b_zero.any())):
            return a_avg, b_avg
    else:
        a_zero, b_zero = a == 0, b == 0
        a_avg = (1.0 - f) * a + f * b
        b_avg = (1.0 - f) * b + f * (a_avg if update == "sequential" else a)
    new_a = _where(a_zero, b, _where(b_zero, a, a_avg))
    new_b = _where(a_zero, b, _where(b_zero, a, b_avg))
    return new_a, new_b


def mixing_matrix(n: int, pair: Pair, f: float, update: str = "sequential") -> np.ndarray:
    """The ``n x n`` matrix ``M`` of one fusion of ``pair`` at rate ``f`` on weights that are all non-zero.

    Stacking one weight of every peer in a vector ``x``, the fusion maps ``x`` to ``M @ x``; other
    peers are untouched. Sequential: ``A' = (1-F) A + F B`` and ``B' = F(1-F) A + (1-F+F^2) B``
    (columns do not sum to one: the peers' mean is not kept). Simultaneous: ``B' = F A + (1-F) B``
    (doubly stochastic).
    """
    check_update(update)
    i, j = pair
    if i == j:
        raise ValueError(f"a peer cannot fuse with itself: {pair}")
    m = np.eye(n)
    m[i, i], m[i, j] = 1.0 - f, f
    if update == "sequential":
        m[j, i], m[j, j] = f * (1.0 - f), 1.0 - f + f * f
    else:
        m[j, i], m[j, j] = f, 1.0 - f
    return m


def schedule_matrix(n: int, schedule: Sequence[Pair], f: float, update: str = "sequential") -> np.ndarray:
    """The product of the per-fusion mixing matrices of a schedule (later fusions on the left)."""
    m = np.eye(n)
    for pair in schedule:
        m = mixing_matrix(n, pair, f, update) @ m
    return m


def influence(m: np.ndarray) -> np.ndarray:
    """Each peer's share of the long-run consensus when the round ``m`` repeats forever.

    ``m**k`` tends to ``1 w`` where ``w`` is ``m``'s left eigenvector for eigenvalue 1, normalised to
    sum 1 (``m`` is row-stochastic and, for a connected schedule, primitive): every peer ends at
    ``sum_p w_p x_p``. Equal shares (``1/n``) mean no peer's data counts more than another's; the
    sequential rule does not give equal shares.
    """
    vals, vecs = np.linalg.eig(m.T)
    w = np.real(vecs[:, int(np.argmin(np.abs(vals - 1.0)))])
    return w / w.sum()


def apply_schedule(
    peers: Sequence[Sequence[Any]], schedule: Sequence[Pair], f: float, update: str = "sequential"
) -> list[list[Any]]:
    """Run one fusion round: fuse each pair of ``schedule`` in order, each fusion seeing the previous ones.

    ``peers[p]`` is peer ``p``'s list of weight arrays (same shapes for every peer). Returns new lists;
    the input arrays are not modified.
    """
    check_update(update)
    out = [list(p) for p in peers]
    for i, j in schedule:
        if i == j:
            raise ValueError(f"a peer cannot fuse with itself: {(i, j)}")
        fused = [fuse(wa, wb, f, update) for wa, wb in zip(out[i], out[j], strict=True)]
        out[i] = [x for x, _ in fused]
        out[j] = [y for _, y in fused]
    return out
