"""What spawn and forkserver workers need of the main script, checked in the main process (private).

A `spawn` (the default on macOS and Windows) or `forkserver` worker starts a
fresh interpreter, imports the main script under the name `__mp_main__` — so
its `if __name__ == "__main__":` block does not run there — and unpickles
what the loader sends it. Two mistakes then kill every worker, and the main
process reads only "DataLoader worker (pid(s) …) exited unexpectedly":

- the task function (or the dataset, a collate function, or anything they
  refer to) lives in `__main__` where the worker's import does not define it:
  inside the main guard, or in a main module that has no file at all (a
  notebook, `python -c`, a script piped to stdin);
- the script iterates a loader at its top level, outside the main guard: each
  worker's import runs that loop again and tries to start workers of its own.

`check_importable` finds the first mistake before any worker starts: it
pickles the object as a worker receives it, records every global of `__main__`
that the pickle refers to, and looks each name up among the names the main
script binds at its top level (its AST, main-guard bodies left out).
`check_iteration` finds the second: a loader iterated from the main
script's top-level code outside a main guard; inside a worker that is still
importing the main script, it names the fix instead of multiprocessing's
"bootstrapping phase" error.
"""

from __future__ import annotations

import ast
import io
import multiprocessing
import os
import pickle
import sys
import types
from typing import Any

import numpy as np
import torch

__all__ = ["check_importable", "check_iteration", "check_main"]

_FIX = ('define it at the top level of the script, above `if __name__ == "__main__":`, or in a module '
        'of its own that the script imports')


class _Discard(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return len(b)


def _empty():
    return None


class _MainRefs(pickle.Pickler):
    """Pickles into nothing, recording the `__main__` globals (functions, classes) it refers to."""

    def __init__(self):
        super().__init__(_Discard(), protocol=pickle.HIGHEST_PROTOCOL)
        self.refs: list[str] = []

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray) and obj.dtype != object or isinstance(obj, torch.Tensor):
            return _empty, ()  # numeric data refers to no global: skip its bytes
        if isinstance(obj, type) or callable(obj) and hasattr(obj, "__qualname__"):
            if getattr(obj, "__module__", None) == "__main__":
                name = getattr(obj, "__qualname__", "")
                if name not in self.refs:
                    self.refs.append(name)
        return NotImplemented


def _is_main_guard(test: ast.expr) -> bool:
    """`__name__ == "__main__"` (either way round)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    return (any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides)
            and any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides))


def _bound(body: list[ast.stmt], names: set[str], guards: list[tuple[int, int]]) -> None:
    """Names bound by `body` when imported (main-guard bodies skipped; their line spans recorded)."""
    for node in body:
        if isinstance(node, ast.If) and _is_main_guard(node.test):
            guards.append((node.body[0].lineno, node.body[-1].end_lineno or node.body[-1].lineno))
            _bound(node.orelse, names, guards)
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names.add("*" if alias.name == "*" else (alias.asname or alias.name).split(".")[0])
            continue
        for child in ast.walk(node):  # assignments, for/with targets, walrus, nested blocks
            if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                names.add(child.id)
        for field in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(node, field, None)
            if isinstance(inner, list) and inner and isinstance(inner[0], (ast.stmt, ast.ExceptHandler)):
                _bound([s for h in inner for s in (h.body if isinstance(h, ast.ExceptHandler) else [h])],
                       names, guards)


_SCRIPTS: dict[tuple[str, float], tuple[set[str], list[tuple[int, int]]] | None] = {}


def _script(path: str):
    """`(names bound at import, main-guard line spans)` of the script at `path`; None if unreadable."""
    try:
        stamp = os.stat(path).st_mtime
    except OSError:
        return None
    if (path, stamp) not in _SCRIPTS:
        try:
            with open(path, "rb") as f:
                tree = ast.parse(f.read(), filename=path)
        except (OSError, SyntaxError, ValueError):
            _SCRIPTS[(path, stamp)] = None
        else:
            names: set[str] = set()
            guards: list[tuple[int, int]] = []
            _bound(tree.body, names, guards)
            _SCRIPTS[(path, stamp)] = names, guards
    return _SCRIPTS[(path, stamp)]


def _main_file() -> str | None:
    """The main script's path, or None when workers cannot import it (no file, or `<stdin>`)."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    return os.path.abspath(path) if isinstance(path, str) and os.path.isfile(path) else None


def check_main(method: str, fn: str) -> None:
    """Raise a RuntimeError when `method` workers would fail to run the main script's file.

    A script piped to `python -` has `__file__ == "<stdin>"`: multiprocessing
    then makes every spawn/forkserver worker run a file of that name, and each dies.
    """
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if isinstance(path, str) and not os.path.isfile(path):
        raise RuntimeError(
            f"{fn}(): the main script was read from {path!r}, not from a file, and '{method}' workers run "
            f"the main script's file before they start: every one of them would die. Fix: save the script "
            f"as a .py file and run that file; or use num_workers=0, or multiprocessing_context='fork' where "
            f"the platform has it (not macOS or Windows).")


def check_importable(name: str, obj: Any, method: str, fn: str) -> None:
    """Raise a TypeError unless `method` workers can unpickle `obj` (see the module docstring)."""
    pickler = _MainRefs()
    try:
        pickler.dump(obj)
    except Exception as err:
        raise TypeError(
            f"{fn}(): {name}={obj!r:.120} cannot be pickled ({err}), but '{method}' workers receive it "
            f"pickled. Define it at module level (def {name}(...) in an importable module, not a lambda "
            f"or a nested function), use functools.partial of such a function for its settings, or use "
            f"multiprocessing_context='fork' where the platform has it.") from err
    if not pickler.refs:
        return

    def subject(ref: str) -> str:
        return (f"{name} is __main__.{ref}" if ref == getattr(obj, "__qualname__", None)
                else f"{name}={obj!r:.100} refers to __main__.{ref}")

    path = _main_file()
    if path is None:
        raise TypeError(
            f"{fn}(): {subject(pickler.refs[0])}, and __main__ has no file here (a notebook or interactive "
            f"session, python -c, a script read from stdin): '{method}' workers start a fresh interpreter "
            f"and cannot import anything defined there. Fix: put it in a .py module and import it from "
            f"there; or use num_workers=0, or multiprocessing_context='fork' where the platform has it "
            f"(not macOS or Windows).")
    script = _script(path)
    if script is None or "*" in script[0]:
        return  # no source to read (a zipapp, a .pyc), or a star import that may bind anything
    for ref in pickler.refs:
        if ref.split(".")[0] not in script[0]:
            raise TypeError(
                f"{fn}(): {subject(ref)}, which is not defined at the top level of {path} (it is inside "
                f"`if __name__ == \"__main__\":`, or made at run time); '{method}' workers import that "
                f"script without running its main guard, so they cannot unpickle it. Fix: {_FIX}; or use "
                f"multiprocessing_context='fork' where the platform has it (not macOS or Windows).")


def check_iteration(method: str, fn: str) -> None:
    """Raise a RuntimeError when a loader with `method` workers is iterated where they would rerun it."""
    fix = (f"put the code that builds and iterates the loader under `if __name__ == \"__main__\":` (or in "
           f"a function called from there); '{method}' workers import the main script to find your task "
           f"function, and everything at its top level runs again in each of them")
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(f"{fn}: a loader with workers was iterated while this worker process was still "
                           f"importing the main script, which runs that loop again. Fix: {fix}.")
    main = sys.modules.get("__main__")
    path = _main_file()
    if path is None or method == "fork":
        return
    script = _script(path)
    if script is None:
        return
    _, guards = script
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals is getattr(main, "__dict__", None):
            line = frame.f_lineno
            if not any(lo <= line <= hi for lo, hi in guards):
                raise RuntimeError(
                    f"{fn}: a loader with '{method}' workers is iterated at the top level of {path} (line "
                    f"{line}), outside `if __name__ == \"__main__\":`; each worker would import the script "
                    f"and run this line again. Fix: {fix}.")
            return
        frame = frame.f_back
