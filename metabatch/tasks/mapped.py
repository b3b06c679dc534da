"""Big arrays for `sample_task`: memory-mapped `.npy` files that every worker shares.

`mmap_array` opens a `.npy` file (or writes an array to one, then opens it)
as a read-only `MmapArray`: a `numpy.memmap` that pickles as a *reference*
to the file (its path, dtype, shape, strides and byte offset), never as its
bytes. A `sample_task` that holds one crosses to `spawn` / `forkserver`
loader workers in microseconds, each worker maps the same file again, and
all processes share one copy of the data in the operating system's page
cache; with `fork` workers the main process's mapping is inherited. Data
larger than memory works too: pages are read from disk when a task first
touches them and the system drops them again when it needs the memory.

Slices and views of an `MmapArray` (`images[:10]`, `images[:, ::2]`,
`.view()`, `.T`) are `MmapArray`s of the same file and pickle by reference
too; anything that copies (fancy indexing, arithmetic, `astype`,
`np.asarray`, `torch.from_numpy(...)` followed by a copy) is an ordinary
in-memory array again.

Bounded footprint. A page of the file that a process has touched stays mapped
in that process, and while no other process maps it, it counts in that
process's unique memory (USS: `Private_Clean`), although it is page cache the
kernel can drop at any time; a fault may even map a whole large folio (up to
2 MiB on Linux 6.x), so one task reading 80 images of 21 KB can map 7-160 MB.
So that an epoch over a set of any size leaves every process's footprint
bounded, indexing an `MmapArray` (gathers `images[rows]`, views
`images[i]`, elements) counts an upper bound of what it may map, in granules
of the PMD size (2 MiB on x86-64), and once that passes `release_every`
(64 MiB by default) the process drops its mapping of the file with
`madvise(MADV_DONTNEED)` (Linux): the data stays in the page cache, views
stay valid, and a later touch is a minor page fault. A file no larger than
`release_every` is never released. Elsewhere (macOS, Windows), and with
`release_every=None`, nothing is released and the operating system manages
the mapping as usual.

The dataset readers (`metabatch.tasks.omniglot.load`,
`metabatch.tasks.miniimagenet.load`, `metabatch.tasks.tieredimagenet.load`)
return their cached images as `MmapArray`s.
"""

from __future__ import annotations

import mmap
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from .. import _validate

__all__ = ["MmapArray", "mmap_array"]

#: Default of `mmap_array(..., release_every=)`: bytes of the file's pages a process may have
#: touched through indexing before it drops its mapping of them (the data stays in the page cache).
RELEASE_EVERY = 64 * 2**20

#: madvise(MADV_DONTNEED) keeps a read-only shared file mapping's contents (later touches read the
#: page cache again) on Linux, as madvise(2) documents; elsewhere its meaning differs or it is missing.
CAN_RELEASE = (sys.platform.startswith("linux") and hasattr(mmap.mmap, "madvise")
               and hasattr(mmap, "MADV_DONTNEED"))

_PAGE = mmap.PAGESIZE


def _granule() -> int:
    """Bytes of a file that touching one byte may map: a page, or where the kernel keeps files in large
    folios (Linux 6.x on ext4, xfs, tmpfs...) and maps a whole folio on a fault, up to the PMD size."""
    if not CAN_RELEASE:
        return _PAGE
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return max(int(f.read()), _PAGE)
    except (OSError, ValueError):  # no transparent huge pages: no large folios either
        return _PAGE


_GRANULE = _granule()


class _Pager:
    """What indexing has handed out of one mapping since its last release; releases past `every` bytes.

    Shared by an `MmapArray` and every view of it (one per mapping and process: fork children get
    their own copy, spawned workers build their own when they map the file again).
    """

    __slots__ = ("every", "map", "on", "pending", "releases")
    every: int | None

    def __init__(self, map_: mmap.mmap, every: int | None):
        self.map, self.every, self.pending, self.releases = map_, every, 0, 0
        self.on = CAN_RELEASE and every is not None  # `every` travels with a pickle even where it is off

    def charge(self, nbytes: int, *, read: bool) -> None:
        """Count `nbytes` of pages: just `read` (a copy; release once past `every`) or to be read (a view).

        A view is counted when it is made: if it would pass `every`, the mapping is released first, so
        the pages it is about to touch stay counted. Call only when `on`.
        """
        size = len(self.map)  # nothing maps more than the whole file: a file up to `every` is never released
        every = self.every if self.every is not None else size  # `on` implies a bound
        if read:
            self.pending = min(self.pending + nbytes, size)
            if self.pending > every:
                self.release()
            return
        if self.pending and min(self.pending + nbytes, size) > every:
            self.release()
        self.pending = min(self.pending + nbytes, size)

    def release(self) -> None:
        """Drop this process's mapping of the file's pages (not the page cache); count from zero."""
        self.pending = 0
        if not self.on or self.map.closed:
            return
        try:
            self.map.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # a kernel or sandbox that refuses it: stop trying, map as usual
            self.on = False
            return
        self.releases += 1


def _pages(shape: tuple, strides: tuple, itemsize: int) -> int:
    """Bytes of the file that reading an array of this layout may map, at most.

    The array is `prod(shape[:k])` contiguous blocks (the C-contiguous tail of its axes); a block of
    `b` bytes spans at most `ceil(b / g) + 1` granules of `g` bytes (`_GRANULE`: what one fault may
    map). A stride of `None` marks an axis that is not laid out contiguously (a gathered one).
    """
    if 0 in shape:
        return 0
    k, block = len(shape), itemsize
    while k and (shape[k - 1] == 1 or strides[k - 1] == block):
        k -= 1
        block *= shape[k]
    blocks = 1
    for n in shape[:k]:
        blocks *= n
    return blocks * (-(-block // _GRANULE) + 1) * _GRANULE


class MmapArray(np.memmap):
    """A read-only `numpy.memmap` of a `.npy` file that pickles as a reference to the file.

    Make one with `mmap_array`. It is a `numpy.memmap` (and so a
    `numpy.ndarray`) in every other respect: index it, slice it, pass it to
    `metabatch.tasks.classification`. Writing into it raises numpy's
    "assignment destination is read-only".

    Pickling stores the file's path and identity (inode, size, modification
    time) and the view's dtype, shape, strides and byte offset; unpickling
    maps the file again. If the file was replaced or changed in between (a
    cache rebuilt, an array written again), unpickling raises an `OSError`
    naming the file rather than handing out other data. An `MmapArray` that no
    longer refers to the file (the result of a copy) pickles its values, as a
    plain `numpy.ndarray`.

    Indexing counts what it may map of the file and, past `release_every`
    (an argument of `mmap_array`, kept by views and pickles), drops this
    process's mapping of the file's pages (Linux); see `mmap_array`.

    Examples:
        >>> import pickle, tempfile, pathlib, numpy as np
        >>> from metabatch.tasks import mmap_array
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     images = mmap_array(pathlib.Path(tmp, "x.npy"), np.arange(12, dtype=np.uint8).reshape(3, 4))
        ...     view = images[1:, ::-1]
        ...     blob = pickle.dumps(view)          # a reference: a few hundred bytes, whatever the size
        ...     again = pickle.loads(blob)
        ...     (type(again).__name__, again.tolist(), again.flags.writeable)
        ('MmapArray', [[7, 6, 5, 4], [11, 10, 9, 8]], False)
    """

    _mmap: Any  # numpy.memmap's own: the mmap.mmap, None for arrays that map no file
    _anchor: int | None = None   # address of the file's byte 0 in this mapping (virtual; may lie outside it)
    _ident: tuple | None = None  # (inode, size, mtime_ns) of the file when it was mapped
    _pager: _Pager | None = None  # shared by the views of one mapping: releases its pages now and then

    def __array_finalize__(self, obj):
        super().__array_finalize__(obj)
        if self._mmap is not None:
            self._anchor = getattr(obj, "_anchor", None)
            self._ident = getattr(obj, "_ident", None)
            self._pager = getattr(obj, "_pager", None)
        else:
            self._anchor = self._ident = self._pager = None

    def __getitem__(self, index):
        res = super().__getitem__(index)
        pager = self._pager
        if pager is not None and not pager.on:
            pager = None
        if isinstance(res, MmapArray) and res._mmap is not None:  # a view: counted now, read later
            if pager is not None:
                pager.charge(_pages(res.shape, res.strides, res.itemsize), read=False)
            return res
        if pager is not None:  # a copy (fancy indexing) or an element: the file's pages were just read
            if isinstance(res, np.ndarray):
                tail = 0
                while (tail < min(res.ndim, self.ndim) and res.shape[res.ndim - 1 - tail]
                       == self.shape[self.ndim - 1 - tail]):
                    tail += 1
                strides = (None,) * (res.ndim - tail) + self.strides[self.ndim - tail:]
                pager.charge(_pages(res.shape, strides, res.itemsize), read=True)
            else:
                pager.charge(_GRANULE, read=True)
        if isinstance(res, MmapArray):  # a copy: a plain array
            return res.view(np.ndarray)
        return res

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        arr = np.ndarray.__array_wrap__(self, arr, context)
        if arr is self or (isinstance(arr, MmapArray) and arr._mmap is not None):
            return arr
        if return_scalar or arr.shape == ():
            return arr[()]
        return arr.view(np.ndarray)

    def _reference(self) -> tuple | None:
        """`(filename, ident, dtype, shape, strides, position, release_every)`, or `None` if no view."""
        if self._mmap is None or self._anchor is None or self._ident is None or self.filename is None:
            return None
        position = self.__array_interface__["data"][0] - self._anchor
        every = None if self._pager is None else self._pager.every
        return (str(self.filename), self._ident, self.dtype, self.shape, self.strides, position, every)

    def __reduce_ex__(self, protocol):
        ref = self._reference()
        if ref is None:
            return self.view(np.ndarray).__reduce_ex__(protocol)
        return _reopen, ref

    def __reduce__(self):
        return self.__reduce_ex__(2)


def _read_header(f) -> tuple:
    """`(shape, fortran_order, dtype)` of the open `.npy` file `f`, left at its data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")  # 3.0: utf8 field names; no objects


def _ident(st: os.stat_result) -> tuple:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def open_npy(path: str | os.PathLike, release_every: int | None = RELEASE_EVERY) -> MmapArray | np.ndarray:
    """Map the `.npy` file `path` read-only (an empty array is returned as a plain read-only array).

    `release_every`: see `mmap_array`.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: not a `.npy` file, an object array (pickled, not mappable), or a truncated file.
    """
    path = Path(path)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        try:
            shape, fortran, dtype = _read_header(f)
        except ValueError as err:
            raise ValueError(f"{path} is not a .npy file numpy can map ({err}).") from None
        if dtype.hasobject:
            raise ValueError(f"{path} holds a numpy array of Python objects (dtype {dtype}); only arrays of "
                             f"numbers can be memory-mapped: save numeric data (e.g. uint8 images) instead.")
        offset = f.tell()
        count = int(np.prod(shape, dtype=np.int64))
        if offset + count * dtype.itemsize > st.st_size:
            raise ValueError(f"{path} is truncated: its header says {shape} {dtype} "
                             f"({count * dtype.itemsize} bytes of data) but the file holds "
                             f"{st.st_size - offset}.")
        if count == 0:  # mmap cannot map nothing
            empty = np.empty(shape, dtype, order="F" if fortran else "C")
            empty.flags.writeable = False
            return empty
        array = cast(MmapArray, np.memmap.__new__(MmapArray, f, dtype=dtype, mode="r", offset=offset,
                                                  shape=shape, order="F" if fortran else "C"))
        array._pager = _Pager(array._mmap, release_every)
    array.filename = os.path.abspath(path)
    array._anchor = array.__array_interface__["data"][0] - offset
    array._ident = _ident(st)
    return array


def _reopen(filename: str, ident: tuple, dtype, shape: tuple, strides: tuple, position: int,
            release_every: int | None = RELEASE_EVERY) -> MmapArray:
    """Unpickle an `MmapArray`: map `filename` again and take the same view of it."""
    try:
        f = open(filename, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"the memory-mapped array's file {filename} is gone (it was deleted or moved "
                                f"after the array was pickled); load or create it again.") from None
    with f:
        st = os.fstat(f.fileno())
        if _ident(st) != tuple(ident):
            raise OSError(f"the memory-mapped array's file {filename} changed after the array was opened (it "
                          f"was rebuilt or written again: inode, size, mtime {tuple(ident)} then "
                          f"{_ident(st)}); open it again in the main process (mmap_array(path), or the "
                          f"dataset's load()) and restart the loader.")
        whole = cast(MmapArray, np.memmap.__new__(MmapArray, f, dtype=np.uint8, mode="r", offset=0,
                                                  shape=(st.st_size,)))
        pager = _Pager(whole._mmap, release_every)
    array = np.ndarray.__new__(MmapArray, shape, dtype=dtype, buffer=whole._mmap, offset=position,
                               strides=strides)
    array._mmap, array.filename, array.offset, array.mode = whole._mmap, filename, whole.offset, "r"
    array._anchor = whole.__array_interface__["data"][0]
    array._ident = tuple(ident)
    array._pager = pager
    array.flags.writeable = False
    return array


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write `array` to `path` as `.npy`: a temporary file in the same folder, fsync, atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{os.getpid()}.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.lib.format.write_array(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def mmap_array(path: str | os.PathLike, data: np.ndarray | torch.Tensor | None = None, *,
               release_every: int | None = RELEASE_EVERY) -> MmapArray | np.ndarray:
    """A large array for `sample_task` that every loader worker shares instead of copying.

    `mmap_array(path)` maps an existing `.npy` file read-only;
    `mmap_array(path, data)` first writes `data` there (atomically: a
    temporary file, then a rename), then maps it. The result pickles as a
    reference to the file, so `spawn` and `forkserver` workers re-map it in
    microseconds instead of receiving a copy, and all processes share the
    page cache. See "Big data in sample_task" in the concepts guide.

    Cost: opening is instant; the first touch of each page reads it from
    disk (or from the page cache, if another process read it already). On a
    set larger than memory every task may read from disk: keep such files on
    an SSD.

    Footprint: each process (the main one and every worker) keeps about
    `release_every` bytes of the file mapped at most, between indexing calls
    (Linux). Indexing (`images[rows]`, `images[i]`, slices) counts an upper
    bound of the pages it reads or that the view it returns spans (in 2 MiB
    granules where the kernel maps large folios); once the count would pass
    `release_every`, the process drops its mapping of the file's pages with
    `madvise(MADV_DONTNEED)`. The data stays in the page cache, arrays and
    views stay valid, and touching a page again is a minor page fault.
    Reads that do not index (`images.sum()`, `np.take(images, ...)`) are
    not counted; what they mapped goes at the next release.

    Args:
        path: the `.npy` file (conventionally named `*.npy`).
        data: a numpy array or CPU tensor of numbers to write to `path`
            first (an existing file is replaced); `None` (the default) opens
            `path` as it is.
        release_every: bytes of the file (64 MiB by default) a process may
            keep mapped; `None`: no bound (a little faster when one process
            re-reads a warm set; the pages a process touched count in its
            unique memory until the kernel needs them). Workers get the value
            with the array.

    Returns:
        A read-only `MmapArray` (a `numpy.memmap` subclass). An empty array
        cannot be mapped and comes back as a plain read-only `numpy.ndarray`.

    Raises:
        FileNotFoundError: `path` does not exist (and no `data` was given).
        TypeError: `data` is not an array of numbers; `release_every` is not an int or `None`.
        ValueError: `path` is not a `.npy` file, holds Python objects, or is truncated;
            `release_every` is negative.

    Examples:
        >>> import tempfile, pathlib, numpy as np
        >>> import metabatch as mb
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = pathlib.Path(tmp, "images.npy")
        ...     images = mb.tasks.mmap_array(path, np.zeros((10, 4, 3, 3), np.uint8))
        ...     sample_task = mb.tasks.classification(images, ways=2)     # shares the file with every worker
        ...     x, y = sample_task(mb.random.key(0), 0, 1, 1)["context"]
        ...     (type(images).__name__, x.shape, y.tolist())
        ('MmapArray', (2, 1, 3, 3), [0, 1])
    """
    if release_every is not None:
        release_every = _validate.integer(release_every, "release_every", "mmap_array", low=0)
    path = Path(path).expanduser()
    if data is not None:
        if isinstance(data, torch.Tensor):
            if data.device.type != "cpu":
                raise TypeError(f"mmap_array(): data is a tensor on {data.device}; move it to the CPU first "
                                f"(data.cpu()).")
            data = data.detach().numpy()
        if not isinstance(data, np.ndarray):
            raise TypeError(f"mmap_array(): data must be a numpy array or a CPU tensor, got "
                            f"{type(data).__name__}; wrap it with np.asarray(...).")
        if data.dtype.hasobject or data.dtype.kind not in "biufc":
            raise TypeError(f"mmap_array(): data has dtype {data.dtype}; only arrays of numbers (bool, ints, "
                            f"floats, complex) can be memory-mapped.")
        save_npy(path, data)
    elif not path.exists():
        raise FileNotFoundError(f"mmap_array(): no file at {path}; pass data= to write an array there first.")
    return open_npy(path, release_every)
