"""Argument checks shared by the task families (private)."""

from __future__ import annotations

import math
import operator

import numpy as np


def sizes(n_ctx, n_tgt, fn: str) -> tuple[int, int]:
    """``(n_ctx, n_tgt)`` as non-negative ints, or a clear error naming ``fn``."""
    try:
        n_ctx, n_tgt = operator.index(n_ctx), operator.index(n_tgt)
    except TypeError:
        raise TypeError(f"{fn}(): n_ctx and n_tgt must be ints, got n_ctx={n_ctx!r}, "
                        f"n_tgt={n_tgt!r}.") from None
    if n_ctx < 0 or n_tgt < 0:
        raise ValueError(f"{fn}(): n_ctx and n_tgt must be >= 0, got n_ctx={n_ctx}, n_tgt={n_tgt}.")
    return n_ctx, n_tgt


def number(value, name: str, fn: str, *, positive: bool = False) -> float:
    """A finite float (``> 0`` with ``positive``; ``>= 0`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{fn}(): {name} must be a number, got {value!r} of type {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        need = "> 0" if positive else ">= 0"
        raise ValueError(f"{fn}(): {name} must be a finite number {need}, got {value!r}.")
    return value


def interval(value, name: str, fn: str, *, positive: bool = False, fixed_ok: bool = True) -> tuple:
    """A number (a fixed value, when ``fixed_ok``) or a ``(low, high)`` pair -> ``(low, high)``."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        low, high = value
        if isinstance(low, bool) or isinstance(high, bool) or not all(
                isinstance(v, (int, float, np.integer, np.floating)) for v in (low, high)):
            raise TypeError(f"{fn}(): {name} must be a (low, high) pair of numbers, got {value!r}.")
        low, high = float(low), float(high)
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"{fn}(): {name}={value!r} must be finite.")
        if low > high:
            raise ValueError(f"{fn}(): {name}={value!r} is empty (low > high); write ({high}, {low}).")
        if positive and low <= 0:
            raise ValueError(f"{fn}(): {name}={value!r} must lie above 0.")
        return low, high
    if not fixed_ok:
        raise TypeError(f"{fn}(): {name} must be a (low, high) pair of numbers, got {value!r}.")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{fn}(): {name} must be a number or a (low, high) pair, got {value!r}.")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{fn}(): {name} must be a finite number{' > 0' if positive else ''}, "
                         f"got {value!r}.")
    return value, value
