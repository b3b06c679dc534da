"""Argument checks shared by every module (private, shared on purpose).

One message shape everywhere: `"fn(): name must be <what>, got <value>."`,
with a `TypeError` for a value of the wrong type and a `ValueError` for a
value of the right type outside its range. Numpy integers count as ints and
numpy floats as numbers; `bool` is never an int here, even though Python
says it is.

Examples:
    >>> from metabatch import _validate
    >>> _validate.integer(3, "steps", "adapt", low=0)
    3
    >>> _validate.integer(1.5, "steps", "adapt")
    Traceback (most recent call last):
    ...
    TypeError: adapt(): steps must be an int, got 1.5 (float).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import optree
import torch

__all__ = ["callable_", "choice", "flag", "int_range", "integer", "interval", "number", "rate", "sizes"]

#: The largest size (points per task, tasks per batch, ...) any check accepts: far above what fits
#: in memory, low enough that numpy and torch never overflow on it.
MAX_SIZE = 2**40


def _got(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def is_int(value: Any) -> bool:
    """Whether `value` is a Python or numpy int (not a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def integer(value: Any, name: str, fn: str, *, low: int | None = None, high: int | None = None) -> int:
    """`value` as a Python int in `[low, high]`.

    Raises:
        TypeError: `value` is not an int (a bool, a float such as `1.0`, a string).
        ValueError: `value` lies outside `[low, high]`.
    """
    if not is_int(value):
        raise TypeError(f"{fn}(): {name} must be an int, got {_got(value)}.")
    value = operator.index(value)
    if low is not None and value < low:
        raise ValueError(f"{fn}(): {name} must be >= {low}, got {value}.")
    if high is not None and value > high:
        raise ValueError(f"{fn}(): {name} must be <= {high}, got {value}.")
    return value


def number(value: Any, name: str, fn: str, *, low: float | None = None, high: float | None = None,
           strict_low: bool = False, finite: bool = True) -> float:
    """`value` (an int or float, Python or numpy, or a 0-d numeric array) as a float.

    Raises:
        TypeError: `value` is not a real number.
        ValueError: it is NaN or infinite (with `finite`), or outside the bounds
            (`> low` with `strict_low`, else `>= low`; `<= high`).
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        if not (isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf"):
            raise TypeError(f"{fn}(): {name} must be a number, got {_got(value)}.")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{fn}(): {name} must be a finite number, got {value!r}.")
    if low is not None and (value <= low if strict_low else value < low):
        raise ValueError(f"{fn}(): {name} must be {'>' if strict_low else '>='} {low}, got {value!r}.")
    if high is not None and value > high:
        raise ValueError(f"{fn}(): {name} must be <= {high}, got {value!r}.")
    return value


def flag(value: Any, name: str, fn: str) -> bool:
    """`value` as a bool; only `True`/`False` (and numpy bools) are accepted."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fn}(): {name} must be True or False, got {_got(value)}.")
    return bool(value)


def choice(value: Any, name: str, fn: str, choices: Sequence[Any]) -> Any:
    """`value` if it is one of `choices`, else a ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{fn}(): {name} must be one of {', '.join(map(repr, choices))}, got {value!r}.")
    return value


def callable_(value: Any, name: str, fn: str) -> Any:
    """`value` if it is callable, else a TypeError."""
    if not callable(value):
        raise TypeError(f"{fn}(): {name} must be callable, got {_got(value)}.")
    return value


def sizes(n_ctx: Any, n_tgt: Any, fn: str) -> tuple[int, int]:
    """`(n_ctx, n_tgt)` as ints in `[0, MAX_SIZE]`."""
    return (integer(n_ctx, "n_ctx", fn, low=0, high=MAX_SIZE),
            integer(n_tgt, "n_tgt", fn, low=0, high=MAX_SIZE))


def int_range(value: Any, name: str, fn: str, *, low: int = 0, high: int = MAX_SIZE) -> tuple[int, int]:
    """An int or an inclusive `(low, high)` pair of ints -> `(low, high)`, within `[low, high]`.

    Raises:
        TypeError: `value` is neither an int nor a pair of ints.
        ValueError: a bound lies outside `[low, high]`, or the pair is empty (`low > high`).
    """
    if is_int(value):
        first = last = integer(value, name, fn, low=low, high=high)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(is_int(v) for v in value):
        first, last = (operator.index(v) for v in value)
        for v in (first, last):
            if not low <= v <= high:
                raise ValueError(f"{fn}(): {name} must lie in [{low}, {high}], got {value!r}.")
        if first > last:
            raise ValueError(f"{fn}(): {name}={value!r} is an empty range: low > high; write ({last}, {first}).")
    else:
        raise TypeError(f"{fn}(): {name} must be an int or an inclusive (low, high) pair of ints, "
                        f"got {_got(value)}.")
    return first, last


def interval(value: Any, name: str, fn: str, *, positive: bool = False, fixed_ok: bool = True
             ) -> tuple[float, float]:
    """A number (a fixed value, when `fixed_ok`) or a `(low, high)` pair -> `(low, high)`."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        if not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                   for v in value):
            raise TypeError(f"{fn}(): {name} must be a (low, high) pair of numbers, got {_got(value)}.")
        low, high = (float(v) for v in value)
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"{fn}(): {name} must be finite, got {value!r}.")
        if low > high:
            raise ValueError(f"{fn}(): {name} must be a non-empty (low, high) pair with low <= high, got {value!r}; "
                             f"write ({high}, {low}).")
        if positive and low <= 0:
            raise ValueError(f"{fn}(): {name} must lie above 0, got {value!r}.")
        return low, high
    if not fixed_ok:
        raise TypeError(f"{fn}(): {name} must be a (low, high) pair of numbers, got {_got(value)}.")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{fn}(): {name} must be a number or a (low, high) pair, got {_got(value)}.")
    fixed = number(value, name, fn, low=0.0 if positive else None, strict_low=positive)
    return fixed, fixed


def _is_number(value: Any) -> bool:
    return ((isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)))
            or (isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf"))


def is_traced(t: torch.Tensor) -> bool:
    """Whether `t` belongs to a `torch.func` transform or a trace, so that its values must not be read."""
    # is_compiling() first: Dynamo cannot trace the functorch query (and needs no answer from it)
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(t):
        return True
    return type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter)


def _tensor_rate(t: torch.Tensor, where: str, fn: str) -> torch.Tensor:
    if not t.is_floating_point():
        raise TypeError(f"{fn}(): {where} must be a floating-point tensor, got dtype {t.dtype}.")
    if not is_traced(t) and t.numel() and not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"{fn}(): {where} must be finite, got a tensor with NaN or infinite entries.")
    return t


def rate(value: Any, name: str, fn: str) -> Any:
    """A learning rate: a number (Python or numpy; returned as a float), a tensor, or a pytree of them.

    Every number must be finite, and so must every entry of a concrete tensor (tensors inside
    `torch.func` transforms or a `torch.compile` trace are not read). Tensors must be
    floating-point.

    Raises:
        TypeError: a leaf is neither a number nor a tensor (a bool, a string), or a tensor is not
            floating-point.
        ValueError: a number or a concrete tensor entry is NaN or infinite; the message names the leaf.
    """
    if isinstance(value, torch.Tensor):
        return _tensor_rate(value, name, fn)
    if _is_number(value):
        out = float(value)
        if not math.isfinite(out):
            raise ValueError(f"{fn}(): {name} must be finite, got {out!r}.")
        return out
    paths, leaves, spec = optree.tree_flatten_with_path(value)
    if not leaves:
        raise TypeError(f"{fn}(): {name} must be a number, a tensor, or a pytree of them like the parameters, "
                        f"got {_got(value)}.")
    rates: list[float | torch.Tensor] = []
    for path, leaf in zip(paths, leaves, strict=True):
        where = name + "".join(f"[{k!r}]" for k in path)
        if isinstance(leaf, torch.Tensor):
            rates.append(_tensor_rate(leaf, where, fn))
        elif _is_number(leaf):
            rates.append(rate(leaf, where, fn))
        else:
            raise TypeError(f"{fn}(): every leaf of {name} must be a number or a tensor, got {where} = "
                            f"{_got(leaf)}.")
    return optree.tree_unflatten(spec, rates)
