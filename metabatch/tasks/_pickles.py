"""Reading data sets shipped as Python pickles without running their code (private).

A pickle can call any importable function while it loads: `pickle.load` on
a file from the internet runs whatever its author wanted. The data sets that
ship as pickles (tiered-ImageNet's `*_labels.pkl` and `*_images_png.pkl`,
written by Python 2) hold only numpy arrays, lists, dicts and strings, so the
unpicklers here resolve only the few numpy constructors those need (an
allowlist, as `torch.load(weights_only=True)` does) and refuse anything else
with a `pickle.UnpicklingError` that names it; nothing else is ever imported
or called.

`load` reads a small pickle whole. `stream_arrays` walks a big pickle of
many arrays (a list of encoded images) and hands each array to a callback as
soon as it is read, keeping neither the arrays nor their bytes, so memory
stays flat whatever the file's size.
"""

from __future__ import annotations

import codecs
import collections
import pickle
import queue
import threading
from collections.abc import Callable, Generator

import numpy as np

__all__ = ["load", "stream_arrays"]

_BIG = 4096  # bytes: larger strings are never kept in the memo of a streaming load


def _encode(obj, encoding="utf-8"):
    """`_codecs.encode` as Python 3 pickles bytes for protocols < 3, text codecs only."""
    if codecs.lookup(encoding).name not in ("latin-1", "iso8859-1", "utf-8", "ascii"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with the codec {encoding!r}")
    return codecs.encode(obj, encoding)


def _allowed() -> dict:
    reconstruct = np.zeros(0).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
             ("_codecs", "encode"): _encode, ("collections", "OrderedDict"): collections.OrderedDict}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module, "_reconstruct")] = reconstruct
        table[(module, "scalar")] = scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        table[(module, "_frombuffer")] = frombuffer
    for module in ("builtins", "__builtin__"):
        for name, obj in (("set", set), ("frozenset", frozenset), ("bytearray", bytearray),
                          ("complex", complex)):
            table[(module, name)] = obj
    return table


_ALLOWED = _allowed()
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]


def _refuse(path, module: str, name: str):
    raise pickle.UnpicklingError(
        f"{path} asks to load {module}.{name}; metabatch reads only numpy arrays, lists, dicts and strings "
        f"from pickle files, because unpickling anything else can run arbitrary code. If you trust the "
        f"file, convert it yourself (e.g. to .npy with numpy.save) and load that.")


class _Safe(pickle.Unpickler):
    def __init__(self, f, path):
        super().__init__(f, encoding="latin1")
        self.path = path

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            _refuse(self.path, module, name)


def load(path) -> object:
    """Unpickle the file `path` with the allowlist (Python 2 strings decode as latin-1, as numpy needs)."""
    with open(path, "rb") as f:
        return _Safe(f, path).load()


# -- streaming -------------------------------------------------------------------------------------

class _Dropped:
    __slots__ = ()


_DROPPED = _Dropped()


def _big(value) -> bool:
    if isinstance(value, (bytes, bytearray, str)):
        return len(value) > _BIG
    if isinstance(value, tuple):
        return any(isinstance(v, (bytes, bytearray, str)) and len(v) > _BIG for v in value)
    return False


class _Memo(dict):
    """The unpickler's memo, without the big strings (an image's bytes): they are read once, never again."""

    def __setitem__(self, key, value):
        super().__setitem__(key, _DROPPED if _big(value) else value)

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if value is _DROPPED:
            raise pickle.UnpicklingError("the pickle refers back to a large string it held earlier; "
                                         "metabatch streams only pickles of independent arrays")
        return value


class _Pending:
    """Stands for an array being unpickled (`_reconstruct` then BUILD); hands it on once built."""

    __slots__ = ("emit",)

    def __init__(self, emit):
        self.emit = emit

    def __setstate__(self, state):
        array = _RECONSTRUCT(np.ndarray, (0,), b"b")
        array.__setstate__(state)
        self.emit(array)


class _Streaming(pickle._Unpickler):  # the Python implementation: its memo can be replaced
    def __init__(self, f, path, emit):
        super().__init__(f, encoding="latin1")
        self.memo = _Memo()
        self.path = path
        self.pending = _Pending(emit)
        self.emit = emit

    def find_class(self, module, name):
        target = _ALLOWED.get((module, name))
        if target is None:
            _refuse(self.path, module, name)
        if target is _RECONSTRUCT:
            return lambda cls, shape, dtype: self.pending  # one placeholder object, reused
        if target is _FROMBUFFER:
            def frombuffer(buf, dtype, shape, order):
                self.emit(_FROMBUFFER(buf, dtype, shape, order))
                return self.pending
            return frombuffer
        return target


def _read_all(path, emit: Callable) -> None:
    with open(path, "rb") as f:
        _Streaming(f, path, emit).load()


class _Stop(Exception):
    pass


def stream_arrays(path, *, ahead: int = 256) -> Generator[np.ndarray, None, None]:
    """Every numpy array in the pickle `path`, in the order they are stored, read lazily.

    A background thread unpickles; at most `ahead` arrays wait for the
    consumer. Closing the iterator early stops the thread.

    Raises:
        pickle.UnpicklingError: the file asks for anything but numpy arrays and
            plain containers (named), or is not a pickle.
    """
    items: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()
    done = object()

    def put(item):
        while True:
            if stop.is_set():
                raise _Stop
            try:
                items.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def produce():
        try:
            _read_all(path, put)
            put(done)
        except _Stop:
            pass
        except BaseException as err:  # handed to the consumer, raised there
            try:
                put(err)
            except _Stop:
                pass

    thread = threading.Thread(target=produce, name="metabatch-unpickle", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
