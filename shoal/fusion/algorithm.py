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


def _where(cond: Any, x: Any, y: Any) -> Any:
    """``np.where`` for numpy arrays, ``torch.where`` for tensors (torch is never imported here)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(cond, torch.Tensor):
        return torch.where(cond, x, y)
    return np.where(cond, x, y)


def fuse(a: Any, b: Any, f: float | Any) -> tuple[Any, Any]:
    """Fuse two peers' weights exactly as Algorithm 1; returns the new ``(A, B)``, inputs untouched.

    For each weight ``w``:

    - if ``A[w] == 0``: ``A[w] = B[w]`` (B keeps its value);
    - else if ``B[w] == 0``: ``B[w] = A[w]`` (A keeps its value);
    - else ``A[w] = (1-F) A[w] + F B[w]`` and then ``B[w] = (1-F) B[w] + F A[w]`` with the *updated*
      ``A[w]``, so B moves toward A's new value, not its old one.

    What the paper leaves open and what shoal chose:

    - The zero test is exact (``== 0``), on the values the pair holds when it fuses, i.e. after any
      earlier fusion of the same round. In the zero branches nothing is averaged: the copy uses the
      *pre-fusion* value of the non-zero side, so both peers leave with that value whatever ``F``.
      When both are zero, both stay zero.
    - ``F`` may be a scalar or an array broadcastable to the weights (one rate per replica, used by
      the batched runner's sweeps).
    - Like the paper's rule, this does not preserve the pair's mean (unless ``F`` is 0): with
      ``A=1, B=3, F=0.5`` the pair becomes ``(2, 2.5)``. The pair's difference shrinks by exactly
      ``(1-F)**2``: ``B' - A' = (1-F)(B - A') = (1-F)**2 (B - A)``.
    """
    a_zero = a == 0
    b_zero = b == 0
    a_avg = (1.0 - f) * a + f * b
    b_avg = (1.0 - f) * b + f * a_avg  # the updated A, as Algorithm 1 orders the two lines
    new_a = _where(a_zero, b, _where(b_zero, a, a_avg))
    new_b = _where(a_zero, b, _where(b_zero, a, b_avg))
    return new_a, new_b


def mixing_matrix(n: int, pair: Pair, f: float) -> np.ndarray:
    """The ``n x n`` matrix ``M`` of one fusion of ``pair`` at rate ``f`` on weights that are all non-zero.

    Stacking one weight of every peer in a vector ``x``, the fusion maps ``x`` to ``M @ x``:
    ``A' = (1-F) A + F B`` and ``B' = F(1-F) A + (1-F+F^2) B``; other peers are untouched.
    """
    i, j = pair
    if i == j:
        raise ValueError(f"a peer cannot fuse with itself: {pair}")
    m = np.eye(n)
    m[i, i], m[i, j] = 1.0 - f, f
    m[j, i], m[j, j] = f * (1.0 - f), 1.0 - f + f * f
    return m


def schedule_matrix(n: int, schedule: Sequence[Pair], f: float) -> np.ndarray:
    """The product of the per-fusion mixing matrices of a schedule (later fusions on the left)."""
    m = np.eye(n)
    for pair in schedule:
        m = mixing_matrix(n, pair, f) @ m
    return m


def apply_schedule(peers: Sequence[Sequence[Any]], schedule: Sequence[Pair], f: float) -> list[list[Any]]:
    """Run one fusion round: fuse each pair of ``schedule`` in order, each fusion seeing the previous ones.

    ``peers[p]`` is peer ``p``'s list of weight arrays (same shapes for every peer). Returns new lists;
    the input arrays are not modified.
    """
    out = [list(p) for p in peers]
    for i, j in schedule:
        if i == j:
            raise ValueError(f"a peer cannot fuse with itself: {(i, j)}")
        fused = [fuse(wa, wb, f) for wa, wb in zip(out[i], out[j], strict=True)]
        out[i] = [x for x, _ in fused]
        out[j] = [y for _, y in fused]
    return out
