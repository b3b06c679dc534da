"""The uint8 image cache of the dataset readers (private, shared by omniglot, miniimagenet, tieredimagenet).

A cache entry is a pair `<stem>.npy` (the images) + `<stem>.json` (format,
fingerprint of the source, the request: size, resample, ..., the shape, and
whatever the reader needs to rebuild its NamedTuple).

Where: in the user cache folder, `$METABATCH_CACHE/<dataset>`, else
`$XDG_CACHE_HOME/metabatch/<dataset>`, else `~/.cache/metabatch/<dataset>`,
as `<name>-<digest of the source's location>.<tag>`; or in `cache_dir`
when the caller gives one. Never next to the data unless `cache_dir` says
so. The folder is logged once per process (logger `metabatch.tasks`, level
INFO). A cache that metabatch < 0.10 wrote next to the data (`legacy`) is
still read while it matches the request, never written or refreshed there.

Reading: the entry's metadata must equal the request (format, fingerprint,
size, resample, ...) and the `.npy` must have the recorded shape; the images
come back memory-mapped (`metabatch.tasks.MmapArray`). Anything else (stale,
half written, damaged, another size copied over the names) is rebuilt, never
trusted.

Writing streams: the reader appends decoded images to a sink that writes
them in chunks (`CHUNK_BYTES`) to a hidden temporary file, so a build holds a
chunk, not the data set, in memory. Both files are fsynced and renamed into
place under an exclusive lock (`.<stem>.lock`, `fcntl.flock` where there is
one); readers take a shared lock. So concurrent builders of one entry all end
up mapping the one entry that was renamed first, and nobody reads a pair
from two builds. Temporaries of dead processes on this host, and any older
than a day, are removed; a live builder's temporary is left alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .mapped import open_npy

fcntl: Any
try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent builders may then replace each other's entry
    fcntl = None

log = logging.getLogger("metabatch.tasks")

_DAMAGED = (OSError, ValueError, KeyError, TypeError, EOFError)
CHUNK_BYTES = 32 << 20
STALE_SECONDS = 24 * 3600
_NOTED: set = set()
_TMP = re.compile(r"^\.(?P<stem>.+)\.(?:npy|json)\.(?P<pid>\d+)(?:@(?P<host>[^@/]*))?\.tmp$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64] or "host"


def default_root() -> Path:
    """`$METABATCH_CACHE`, else `$XDG_CACHE_HOME/metabatch`, else `~/.cache/metabatch`."""
    root = os.environ.get("METABATCH_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "metabatch"


def stem(source: Path, name: str, tag: str, dataset: str, cache_dir) -> Path:
    """`<folder>/<name>-<digest of source's location>.<tag>`: two copies of a data set never share an entry."""
    digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:10]
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_root() / dataset
    return folder / f"{name}-{digest}.{tag}"


def _note(folder: Path, what: str, explicit: bool) -> None:
    key = str(folder)
    if key not in _NOTED:
        _NOTED.add(key)
        how = "cache_dir=" if explicit else "set METABATCH_CACHE or pass cache_dir= to move it"
        log.info("metabatch.tasks: the %s cache lives in %s (%s)", what, folder, how)


# -- sinks: where a reader puts its decoded images -------------------------------------------------

class Sink:
    """Takes `prod(prefix)` uint8 items of one shape, in C order; keeps them in memory."""

    def __init__(self, prefix: tuple):
        self.prefix = tuple(int(n) for n in prefix)
        self.total = int(np.prod(self.prefix, dtype=np.int64))
        self.count = 0
        self.item_shape: tuple | None = None
        self.images: np.ndarray | None = None

    def append(self, item: np.ndarray) -> None:
        if self.item_shape is None:
            self.item_shape = tuple(item.shape)
            self._start(self.item_shape)
        elif tuple(item.shape) != self.item_shape:
            raise ValueError(f"item {self.count} has shape {tuple(item.shape)}, earlier ones {self.item_shape}")
        if self.count >= self.total:
            raise ValueError(f"more than the {self.total} items announced")
        self._put(item)
        self.count += 1

    def _start(self, item_shape: tuple) -> None:
        self.images = np.empty(self.prefix + item_shape, np.uint8)
        self._flat = self.images.reshape((self.total,) + item_shape)

    def _put(self, item) -> None:
        self._flat[self.count] = item

    def finish(self) -> np.ndarray | None:
        if self.count != self.total or self.images is None:
            raise ValueError(f"got {self.count} items, expected {self.total}")
        return self.images


class FileSink(Sink):
    """Writes the items as one `.npy` to the open file `f`, `chunk_bytes` at a time."""

    def __init__(self, prefix: tuple, f, chunk_bytes: int | None = None, where: str = "the cache"):
        super().__init__(prefix)
        self.f, self.filled, self.where = f, 0, where
        self.chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes

    def _start(self, item_shape: tuple) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": self.prefix + item_shape}
        np.lib.format.write_array_header_1_0(self.f, header)
        per_item = max(1, int(np.prod(item_shape, dtype=np.int64)))
        rows = max(1, min(self.total, self.chunk_bytes // per_item))
        self.buffer: np.ndarray = np.empty((rows,) + item_shape, np.uint8)

    def _put(self, item) -> None:
        self.buffer[self.filled] = item
        self.filled += 1
        if self.filled == len(self.buffer):
            self._flush()

    def _flush(self) -> None:
        if self.filled:
            try:
                self.f.write(self.buffer[:self.filled].data)  # C-contiguous: written as is
            except OSError as err:
                raise OSError(err.errno, f"could not write {self.where} ({err.strerror or err}); free space "
                                         f"there, point METABATCH_CACHE or cache_dir= to another folder, or "
                                         f"pass cache=False") from err
            self.filled = 0

    def finish(self) -> None:
        if self.count != self.total or self.item_shape is None:
            raise ValueError(f"got {self.count} items, expected {self.total}")
        self._flush()
        self.buffer = np.empty(0, np.uint8)  # free the chunk


def collect(build: Callable) -> tuple[np.ndarray, dict]:
    """Run `build(new_sink)` in memory: `(images, meta)`."""
    made = []

    def new(prefix):
        made.append(Sink(prefix))
        return made[-1]

    meta = build(new)
    return made[-1].finish(), meta


# -- reading ----------------------------------------------------------------------------------------

def _json(stem: Path) -> Path:
    return stem.with_name(stem.name + ".json")


def _npy(stem: Path) -> Path:
    return stem.with_name(stem.name + ".npy")


def _read(stem: Path, request: dict, decode: Callable) -> Any:
    """The entry at `stem` if its metadata equals `request` and its array fits, else `None`."""
    try:
        info = json.loads(_json(stem).read_text())
        if not isinstance(info, dict) or any(info.get(k) != v for k, v in request.items()):
            return None
        images = open_npy(_npy(stem))
        if images.dtype != np.uint8 or list(images.shape) != info["shape"]:
            return None
        return decode(images, info)
    except _DAMAGED:
        return None


@contextlib.contextmanager
def _locked(stem: Path, exclusive: bool):
    """An advisory lock on `.<stem>.lock` beside the entry (none where it cannot be had)."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(stem.with_name(f".{stem.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError:
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock


# -- stale temporaries -------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: judge by age only
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def clean(folder: Path, only: str | None = None) -> list:
    """Remove the temporaries a crashed build left in `folder` (those of `.<only>.` when given).

    A temporary is stale when its process (on this host) is gone, or when it
    has not been written to for `STALE_SECONDS`; a live builder's file stays.
    Returns the removed paths.
    """
    removed: list[Path] = []
    host, now = _host(), time.time()
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TMP.match(name)
        if not m or (only is not None and m["stem"] != only):
            continue
        path, pid = folder / name, int(m["pid"])
        try:
            age = now - path.stat().st_mtime
        except OSError:
            continue
        here = m["host"] in (None, host)
        if (here and pid != os.getpid() and not _alive(pid)) or age > STALE_SECONDS:
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    if removed:
        log.info("metabatch.tasks: removed %d temporary file(s) that a crashed cache build left in %s",
                 len(removed), folder)
    return removed


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- the entry point --------------------------------------------------------------------------------

def cached(stem: Path, *, request: dict, build: Callable, decode: Callable, what: str, explicit: bool,
           legacy: Path | None = None, chunk_bytes: int | None = None) -> Any:
    """The data from a valid cache entry, else `build` it into one (streamed) and map that.

    Args:
        stem: the entry, from `stem`.
        request: what the entry's metadata must say (format, fingerprint,
            source, size, resample, ...); recorded with the entry.
        build: `build(new_sink) -> meta`: calls `new_sink(prefix)` once and
            appends `prod(prefix)` uint8 images to it; returns the json-able
            metadata `decode` needs.
        decode: `(images, metadata) -> data`, or `None` when they do not fit.
        what: the data set's name, for messages.
        explicit: the caller passed `cache_dir` (write errors raise).
        legacy: an entry next to the data written by metabatch < 0.10: read if valid, never written.

    Raises:
        OSError: `explicit` and the entry could not be written.
    """
    folder = stem.parent
    _note(folder, what, explicit)
    clean(folder)
    if folder.is_dir():
        with _locked(stem, exclusive=False):
            data = _read(stem, request, decode)
        if data is not None:
            return data
    if legacy is not None:
        clean(legacy.parent, only=legacy.name)
        data = _read(legacy, request, decode)
        if data is not None:
            log.info("metabatch.tasks: reading the %s cache that an older metabatch wrote at %s.npy",
                     what, legacy)
            return data
    suffix = f"{os.getpid()}@{_host()}.tmp"
    tmp_npy, tmp_json = (stem.with_name(f".{stem.name}.{ext}.{suffix}") for ext in ("npy", "json"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(tmp_npy, "wb")
    except OSError as err:
        if explicit:
            raise OSError(f"could not write the {what} cache into cache_dir={str(folder)!r} ({err}); pass a "
                          f"writable folder or cache=False.") from None
        warnings.warn(f"could not cache {request.get('source', what)} in {folder} ({err}); set "
                      f"METABATCH_CACHE or cache_dir= to a writable folder to load it faster next time (and "
                      f"to memory-map it instead of holding it in memory).", RuntimeWarning, stacklevel=3)
        images, meta = collect(build)
        return decode(images, dict(request, **meta, shape=list(images.shape)))
    log.info("metabatch.tasks: building the %s cache %s.npy", what, stem)
    try:
        sinks = []
        with f:
            def new(prefix):
                sinks.append(FileSink(prefix, f, chunk_bytes, where=f"the {what} cache {stem}.npy"))
                return sinks[-1]

            meta = build(new)
            sinks[-1].finish()
            f.flush()
            os.fsync(f.fileno())
        shape = list(sinks[-1].prefix + sinks[-1].item_shape)
        info = dict(request, **meta, shape=shape)
        with open(tmp_json, "w") as g:
            g.write(json.dumps(info, indent=1))
            g.flush()
            os.fsync(g.fileno())
        with _locked(stem, exclusive=True):
            data = _read(stem, request, decode)  # another process finished first: share its entry
            if data is None:
                os.replace(tmp_npy, _npy(stem))
                os.replace(tmp_json, _json(stem))
                _fsync_dir(folder)
                data = _read(stem, request, decode)
        if data is None:
            raise OSError(f"the {what} cache just written to {stem}.npy does not read back; is {folder} a "
                          f"working local folder? Pass another cache_dir= or cache=False.")
        return data
    finally:
        for tmp in (tmp_npy, tmp_json):
            with contextlib.suppress(OSError):
                tmp.unlink()
