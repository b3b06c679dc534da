"""The parallel task loader: workers build whole, uniform batches of tasks.

:func:`task_loader` wraps ``torch.utils.data.DataLoader``. Its sampler is a
stream of :class:`~metabatch.BatchSpec`; each worker receives one spec, calls
``sample_task(fold_in(spec.key, spec.offset + j), spec.indices[j], spec.n_ctx,
spec.n_tgt)`` for every task ``j`` of it, and stacks the outputs into one
pytree whose leaves carry a leading task dimension.

Transport (measured in ``benchmarks/loader.py``): a worker writes every leaf of
the batch straight into *one* buffer, so a batch crosses the process boundary
as one message with one shared-memory buffer (or inline bytes when it is
small) instead of one segment per leaf; the main process rebuilds the leaves
as zero-copy views of that buffer. Shared buffers come from a small per-worker
pool and return to it when the batch's last view is garbage-collected; each
pooled buffer and each batch layout crosses once, later batches only name
them (see "transport" below). No shared-memory segment has a name: torch's
file-descriptor sharing unlinks it at creation, so nothing is left in
``/dev/shm`` when a process dies.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import pickle
import threading
import weakref
from typing import Any, Callable, Iterable

import numpy as np
import optree
import torch
import torch.utils.data

from . import random as _random
from .sampler import BatchSpec

__all__ = ["task_loader", "TaskDataLoader", "build_batch", "stack"]

# Batches below this many bytes travel inline in the message (a pipe copy is
# cheaper than creating and mapping a shared-memory segment); larger ones in
# one shared-memory buffer. See benchmarks/loader.py.
_INLINE_BYTES = 64 * 1024
_ALIGN = 64

_TORCH_DTYPE = {np.dtype(d): torch.from_numpy(np.empty(0, dtype=d)).dtype for d in (
    np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64, np.float16, np.float32,
    np.float64, np.complex64, np.complex128)}
_NUMPY_DTYPE = {t: n for n, t in _TORCH_DTYPE.items()}
_NUMBERS = (bool, int, float)

# How a leaf is stacked (chosen from task 0's leaf, kept in the layout).
_TENSOR, _ARRAY, _SCALAR, _NUMBER, _OTHER = range(5)


def _add_note(err: BaseException, note: str) -> None:
    if hasattr(err, "add_note"):
        err.add_note(note)
    else:  # Python 3.10: keep the context where tools can still find it
        err.__notes__ = getattr(err, "__notes__", []) + [note]


def _leaf_meta(leaf, i: int, treespec):
    """(torch dtype, shape, kind) of leaf ``i`` of task 0's output."""
    if isinstance(leaf, torch.Tensor):
        return leaf.dtype, tuple(leaf.shape), _TENSOR
    if isinstance(leaf, (np.ndarray, np.generic)):
        dtype = _TORCH_DTYPE.get(leaf.dtype)
        if dtype is not None:
            if isinstance(leaf, np.generic):
                return dtype, (), _SCALAR
            return dtype, leaf.shape, _ARRAY if leaf.ndim else _OTHER
        problem = f"a numpy array of dtype {leaf.dtype}, which torch cannot hold"
    elif isinstance(leaf, _NUMBERS):
        return torch.tensor(leaf).dtype, (), _NUMBER if type(leaf) in _NUMBERS else _OTHER
    else:
        problem = f"a {type(leaf).__name__} ({leaf!r:.60})"
    path = optree.tree_paths(optree.tree_unflatten(treespec, range(treespec.num_leaves)))[i]
    raise TypeError(f"leaf {_path_str(path)} of a task output is {problem}; task outputs must be "
                    f"pytrees of tensors, numeric numpy arrays or numbers.")


def _path_str(path) -> str:
    return "".join(f"[{p!r}]" for p in path) or "<root>"


def _describe(spec: BatchSpec | None, j: int) -> str:
    if spec is None:
        return f"task {j}"
    return f"task {j} (index {spec.indices[j]})"


def _mismatch(spec, j, what) -> ValueError:
    step = "" if spec is None else f"step {spec.step}: "
    return ValueError(f"{step}{_describe(spec, 0)} and {_describe(spec, j)} of one batch differ: {what}. "
                      f"Every task of a batch must return the same pytree with the same leaf shapes "
                      f"and dtypes; size arrays by n_ctx / n_tgt.")


class _Layout:
    """Where each stacked leaf of a batch lives inside one flat byte buffer.

    Layouts are cached (``_layout``): a batch of the same structure, leaf
    dtypes and shapes as an earlier one reuses its layout, and a worker sends
    each layout to the main process once (``_Sender``).
    """

    __slots__ = ("_cuts", "dtypes", "kinds", "nbytes", "offsets", "shapes", "treespec")

    def __init__(self, treespec, dtypes, shapes, kinds):
        self.treespec, self.dtypes, self.shapes, self.kinds = treespec, dtypes, shapes, kinds
        self.offsets, self._cuts, offset = [], [], 0
        for dtype, shape in zip(dtypes, shapes):
            offset = -(-offset // _ALIGN) * _ALIGN
            size = math.prod(shape) * dtype.itemsize
            self.offsets.append(offset)
            # numpy arrays are cut with np.ndarray(shape, dtype, buffer, offset) (1.8 µs a
            # leaf against 5 µs for torch slicing); dtypes numpy lacks (bfloat16) in torch.
            self._cuts.append((shape, _NUMPY_DTYPE.get(dtype), offset, size, dtype))
            offset += size
        self.nbytes = offset

    def __reduce__(self):
        return _Layout, (self.treespec, self.dtypes, self.shapes, self.kinds)

    def arrays(self, raw: np.ndarray) -> list:
        """Each stacked leaf as a view of ``raw`` (flat uint8): numpy where numpy has the dtype."""
        out = []
        for shape, np_dtype, offset, size, dtype in self._cuts:
            if np_dtype is not None and size:
                out.append(np.ndarray(shape, np_dtype, raw, offset))
            elif np_dtype is not None:
                out.append(np.empty(shape, np_dtype))  # no bytes to share
            else:
                out.append(torch.from_numpy(raw[offset:offset + size]).view(dtype).view(shape))
        return out

    def tensors(self, raw: np.ndarray) -> list:
        """The stacked leaves as zero-copy tensor views of ``raw``.

        Every view keeps ``raw`` alive: the handle whose death returns a pooled
        buffer to its worker.
        """
        from_numpy = torch.from_numpy
        return [from_numpy(a) if type(a) is np.ndarray else a for a in self.arrays(raw)]

    def torch_views(self, buf: torch.Tensor) -> list:
        """Views of a flat uint8 tensor cut in torch (for pinned or non-CPU buffers)."""
        return [buf[off:off + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                for off, dtype, shape in zip(self.offsets, self.dtypes, self.shapes)]


_LAYOUTS: dict = {}  # (treespec, num_tasks, default dtype, (type, dtype, shape) of each leaf) -> _Layout
_MAX_LAYOUTS = 1024


def _layout(treespec, leaves: list, num_tasks: int) -> _Layout:
    """The (cached) layout of a batch of ``num_tasks`` tasks whose task 0 has these leaves."""
    key = [treespec, num_tasks, torch.get_default_dtype()]
    for leaf in leaves:
        key += (type(leaf), getattr(leaf, "dtype", None), getattr(leaf, "shape", None))
    key = tuple(key)
    layout = _LAYOUTS.get(key)
    if layout is None:
        metas = [_leaf_meta(leaf, i, treespec) for i, leaf in enumerate(leaves)]
        layout = _Layout(treespec, [m[0] for m in metas], [(num_tasks,) + tuple(m[1]) for m in metas],
                         [m[2] for m in metas])
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    return layout


def _torch_dtype(leaf):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        return torch.tensor(leaf).dtype
    return _TORCH_DTYPE.get(dtype, dtype) if isinstance(dtype, np.dtype) else dtype


def _diagnose(spec, outs, err: BaseException | None = None) -> ValueError:
    """The error for the first task whose output differs from task 0's."""
    first, treespec = optree.tree_flatten(outs[0])
    paths = optree.tree_paths(outs[0])
    for j in range(1, len(outs)):
        leaves, other = optree.tree_flatten(outs[j])
        if other != treespec:
            return _mismatch(spec, j, f"pytree structure {treespec} vs {other}")
        for path, a, b in zip(paths, first, leaves):
            sa, sb = tuple(getattr(a, "shape", ())), tuple(getattr(b, "shape", ()))
            if sa != sb:
                return _mismatch(spec, j, f"leaf {_path_str(path)} has shape {sa} vs {sb}")
            da, db = _torch_dtype(a), _torch_dtype(b)
            if da != db:
                return _mismatch(spec, j, f"leaf {_path_str(path)} has dtype {da} vs {db}")
    why = "" if err is None else f" ({type(err).__name__}: {err})"
    return ValueError(f"could not stack the task outputs of step {getattr(spec, 'step', '?')}{why}; "
                      f"every task of a batch must return arrays of one shape and dtype per leaf.")


def _plain(nbytes: int) -> np.ndarray:
    return np.empty(nbytes, dtype=np.uint8)


def _fill(outs: list, spec, alloc=_plain):
    """Stack task outputs into one flat uint8 buffer. Returns ``(layout, raw)``.

    Task 0 is flattened once; every other task is cut along task 0's treespec
    (``flatten_up_to``: 0.3 µs a task against 2.3 µs for a full flatten), which
    fails on a structure that differs. Then per leaf one ``concatenate`` /
    ``stack`` / assignment writes the column straight into its place in the
    buffer. ``alloc(nbytes)`` returns the buffer as a flat uint8 numpy array.
    """
    leaves, treespec = optree.tree_flatten(outs[0])
    try:
        columns = list(zip(leaves, *[treespec.flatten_up_to(out) for out in outs[1:]]))
    except (ValueError, TypeError) as err:
        raise _diagnose(spec, outs) from err
    layout = _layout(treespec, leaves, len(outs))
    raw = alloc(layout.nbytes)
    try:
        for column, view, kind, shape, first in zip(columns, layout.arrays(raw), layout.kinds, layout.shapes,
                                                    leaves):
            if kind == _ARRAY:
                for leaf in column:
                    if leaf.shape != first.shape:  # concatenate alone would not see it
                        raise ValueError(f"shape {leaf.shape} vs {first.shape}")
                np.concatenate(column, out=view.reshape((-1,) + shape[2:]), casting="no")
            elif kind == _TENSOR:
                dtype = first.dtype
                for leaf in column:
                    if leaf.dtype != dtype:  # stack would cast
                        raise TypeError(f"dtype {leaf.dtype} vs {dtype}")
                torch.stack(column, out=torch.from_numpy(view) if type(view) is np.ndarray else view)
            elif kind != _OTHER and len({type(leaf) for leaf in column}) == 1:
                view[...] = column  # numbers or numpy scalars of one type: exact
            else:  # mixed types, 0-d arrays: numpy's casting rules decide
                exact = isinstance(first, (np.ndarray, np.generic))
                np.stack(column, out=view, casting="no" if exact else "same_kind")
    except (ValueError, TypeError, RuntimeError, AttributeError, OverflowError) as err:
        raise _diagnose(spec, outs, err) from err
    return layout, raw


def _unflatten(layout: _Layout, leaves: list):
    return optree.tree_unflatten(layout.treespec, leaves)


def stack(outputs: list) -> Any:
    """Stack a list of task outputs (same pytree, same leaf shapes) into one pytree of tensors.

    Numpy leaves and numbers become tensors; every leaf gains a leading task
    dimension. This is what each loader worker does to a batch.

    Args:
        outputs: a non-empty list of pytrees of tensors, arrays or numbers.

    Returns:
        One pytree of tensors with leading dimension ``len(outputs)``.

    Raises:
        ValueError: two outputs differ in structure, shape or dtype; the message
            names the first two tasks that differ.

    Examples:
        >>> import numpy as np, metabatch as mb
        >>> batch = mb.stack([{"x": np.zeros(3)}, {"x": np.ones(3)}])
        >>> batch["x"].shape, batch["x"].dtype
        (torch.Size([2, 3]), torch.float64)
    """
    if not outputs:
        raise ValueError("stack() needs at least one task output, got an empty list.")
    layout, raw = _fill(list(outputs), None)
    return _unflatten(layout, layout.tensors(raw))


# ----------------------------------------------------------------------------- transport
#
# A worker answers each spec with a ``_Message``; pickling it (in the worker's
# queue feeder thread) calls ``__reduce__``, unpickling it in the main process
# calls ``_receive``, in the order the worker sent its messages. Whatever the
# main process has received once stays there, so later messages refer to it:
#
# - a layout travels with the first batch that uses it, then as a number;
# - a pooled shared buffer (and the pool's flags array) travels once per
#   buffer, as torch's file descriptor; later batches in that buffer send only
#   (slot, generation). torch's fd reducer would otherwise make the main
#   process fetch the descriptor over a fresh connection to the worker on every
#   batch, a round trip that waits for the busy worker's GIL.
#
# The main process keeps what it received in ``_REMOTES[token]``, one entry
# per worker process (a new token when workers restart). ``TaskDataLoader``
# drops a worker's entry when the DataLoader iterator that ran it dies;
# registering a new worker also drops entries of workers that no longer exist.

_POOL_SLOTS = 8  # reusable shared-memory buffers per worker
_FREE, _BUSY = 0, 1
_MAX_SENT_LAYOUTS = 256


class _Sender:
    """A worker's transport state: its token, the layouts and buffers the main process already holds.

    Pooled buffers: allocating and first touching a fresh shared-memory segment
    costs milliseconds for a batch of images (``benchmarks/loader.py``); a
    pooled buffer is mapped once in each process and reused. The worker marks a
    slot busy when it fills it; the main process marks it free again when the
    last view of that batch dies. When every slot is busy (the user keeps many
    batches alive) the worker falls back to a one-off segment.
    """

    def __init__(self):
        self.pid = os.getpid()
        self.token = int.from_bytes(os.urandom(8), "little")
        self.hello = True  # the main process has not heard of this token yet
        self.layouts = {}  # _Layout -> id, for layouts sent
        self.flags = None  # the pool's shared flags, made with the first pooled buffer
        self.flags_sent = False
        self.bufs = [None] * _POOL_SLOTS  # (shared uint8 tensor, its numpy view)
        self.gens = [0] * _POOL_SLOTS  # bumped whenever a slot gets a new buffer
        self.sent = [-1] * _POOL_SLOTS  # generation of each slot that the main process holds

    def take(self, nbytes: int):
        """``(slot, generation, tensor, raw)``: a shared buffer of at least ``nbytes``; slot None if one-off."""
        if self.flags is None:
            self.flags = torch.zeros(_POOL_SLOTS, dtype=torch.uint8).share_memory_()
            self._flags = self.flags.numpy()
        flags, bufs, free = self._flags, self.bufs, None
        for slot in range(_POOL_SLOTS):
            if flags[slot] == _FREE:
                if bufs[slot] is not None and bufs[slot][1].size >= nbytes:
                    break
                if free is None:
                    free = slot
        else:
            if free is None:  # every slot holds a live batch
                tensor = torch.empty(nbytes, dtype=torch.uint8).share_memory_()
                return None, 0, tensor, tensor.numpy()
            slot = free
            tensor = torch.empty(nbytes + nbytes // 4, dtype=torch.uint8).share_memory_()  # n_ctx/n_tgt vary
            bufs[slot] = tensor, tensor.numpy()
            self.gens[slot] += 1
        flags[slot] = _BUSY
        return (slot, self.gens[slot]) + bufs[slot]

    def release(self, slot: int) -> None:
        self._flags[slot] = _FREE

    def message(self, layout: _Layout, slot, gen: int, data) -> _Message:
        hello = os.getpid() if self.hello else None
        self.hello = False
        layout_id = self.layouts.get(layout)
        new_layout = layout_id is None
        if new_layout:
            if len(self.layouts) >= _MAX_SENT_LAYOUTS:
                self.layouts.clear()  # the main process drops its copies when it sees id 0 again
            layout_id = self.layouts[layout] = len(self.layouts)
        flags = buf = None
        if slot is not None:
            if not self.flags_sent:
                flags, self.flags_sent = self.flags, True
            if self.sent[slot] != gen:
                buf, self.sent[slot] = self.bufs[slot][0], gen
        return _Message((self.token, hello, flags, layout_id, layout if new_layout else None, slot, gen, buf,
                         data))


class _Message:
    """What a worker returns for one spec; becomes a ``_Packed`` in the main process."""

    __slots__ = ("args",)

    def __init__(self, args):
        self.args = args

    def __reduce__(self):
        return _receive, self.args


class _Remote:
    """The main process's copy of one worker's layouts, flags and pooled buffers."""

    __slots__ = ("bufs", "flags", "layouts", "pid")

    def __init__(self, pid: int):
        self.pid, self.flags, self.layouts, self.bufs = pid, None, {}, {}


_REMOTES: dict = {}  # worker token -> _Remote
_REMOTES_LOCK = threading.Lock()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _receive(token, hello, flags, layout_id, layout, slot, gen, buf, data):
    """Unpickle a worker's message in the main process (in the order that worker sent them)."""
    remote = _REMOTES.get(token)
    if hello is not None:
        with _REMOTES_LOCK:
            for old in [t for t, r in _REMOTES.items() if not _alive(r.pid)]:
                del _REMOTES[old]
            remote = _REMOTES[token] = _Remote(hello)
    if remote is None:  # cannot happen while the messages of a worker arrive in order
        return _Lost(token)
    if flags is not None:
        remote.flags = flags.numpy()  # keeps the tensor, hence its mapping, alive
    if layout is not None:
        if layout_id == 0:
            remote.layouts.clear()
        remote.layouts[layout_id] = layout
    else:
        layout = remote.layouts[layout_id]
    if slot is None:
        return _Packed(token, data, layout)
    if buf is not None:
        remote.bufs[slot] = gen, buf
    held_gen, buf = remote.bufs[slot]
    if held_gen != gen:
        return _Lost(token)
    return _Packed(token, buf, layout, (remote.flags, slot))


def _release(flags: np.ndarray, slot: int) -> None:
    flags[slot] = _FREE


class _Packed:
    """One batch in the main process: a flat buffer plus its layout.

    ``buf`` is a bytearray (inline), a one-off shared tensor, or a pooled shared
    tensor, in which case ``lease`` is ``(flags, slot)``: the slot is handed
    back to its worker once the batch's views are gone (or at once, if this
    object dies unpacked).
    """

    __slots__ = ("buf", "layout", "lease", "token")

    def __init__(self, token, buf, layout, lease=None):
        self.token, self.buf, self.layout, self.lease = token, buf, layout, lease

    def __del__(self):
        if self.lease is not None:  # dropped unpacked (e.g. an epoch cut short): hand the slot back
            flags, slot = self.lease
            flags[slot] = _FREE

    def pin_memory(self, device=None):  # called by DataLoader's pin-memory thread
        buf = self.buf
        if isinstance(buf, bytearray):
            buf = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8))
        pinned = buf.pin_memory() if device is None else buf.pin_memory(device)
        lease, self.lease = self.lease, None
        if lease is not None:  # copied out: the worker may reuse its buffer
            _release(*lease)
        return _Packed(self.token, pinned, self.layout)

    def unpack(self):
        buf, layout = self.buf, self.layout
        if isinstance(buf, bytearray):
            return _unflatten(layout, layout.tensors(np.frombuffer(buf, dtype=np.uint8)))
        if buf.device.type != "cpu" or buf.is_pinned():
            return _unflatten(layout, layout.torch_views(buf))
        raw = buf.numpy()  # a fresh handle: every view of this batch keeps it alive
        lease, self.lease = self.lease, None
        if lease is not None:
            weakref.finalize(raw, _release, *lease)
        return _unflatten(layout, layout.tensors(raw))


class _Lost:
    """Stands for a batch whose shared buffer the main process no longer holds (a bug if ever seen)."""

    __slots__ = ("token",)

    def __init__(self, token):
        self.token = token

    def pin_memory(self, device=None):
        return self

    def unpack(self):
        raise RuntimeError(f"metabatch: a batch from loader worker {self.token:#x} refers to a shared buffer "
                           f"that this process does not hold; please report this bug.")


def _forget(tokens: set) -> None:
    """Drop what the main process holds of these workers (they died with their iterator)."""
    with _REMOTES_LOCK:
        for token in tokens:
            _REMOTES.pop(token, None)


def _clear_after_fork() -> None:  # a forked worker keeps none of its parent's buffers
    _REMOTES.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_clear_after_fork)


def _tasks(sample_task, spec: BatchSpec) -> list:
    """The outputs of the tasks of one spec, errors annotated with step, index and key.

    A ``sample_task`` with a ``_start_batch(spec)`` method (the compat layer's)
    has it called first.
    """
    start = getattr(sample_task, "_start_batch", None)
    if start is not None:
        start(spec)
    outs, key, offset, n_ctx, n_tgt, fold_in = [], spec.key, spec.offset, spec.n_ctx, spec.n_tgt, _random.fold_in
    for j, idx in enumerate(spec.indices):
        k = fold_in(key, offset + j)
        try:
            outs.append(sample_task(k, idx, n_ctx, n_tgt))
        except Exception as err:
            if start is None:
                again = (f"rerun it alone with sample_task(metabatch.random.Key._from_words"
                         f"{_random.key_data(k)}, {idx}, {n_ctx}, {n_tgt})")
            else:
                again = ("its tasks draw from generators seeded once per batch: rebuild the batch with "
                         "metabatch.build_batch(loader.sample_task, spec) for this step's spec")
            _add_note(err, f"metabatch: raised by sample_task at step {spec.step}, task {offset + j} "
                           f"of the batch (index {idx}), key {k!r}, n_ctx={n_ctx}, n_tgt={n_tgt}; {again}.")
            raise
    return outs


def build_batch(sample_task: Callable, spec: BatchSpec) -> Any:
    """Build and stack the tasks of one spec in this process (what a worker does).

    Task ``j`` is ``sample_task(fold_in(spec.key, spec.offset + j), spec.indices[j],
    spec.n_ctx, spec.n_tgt)``.

    Examples:
        >>> import numpy as np, metabatch as mb
        >>> def sample_task(key, idx, n_ctx, n_tgt):
        ...     x = mb.random.numpy_rng(key).uniform(size=(n_ctx + n_tgt, 1))
        ...     return x[:n_ctx], x[n_ctx:]
        >>> spec = mb.batch_specs(0, num_tasks=100, batch_size=4, n_ctx=3, n_tgt=5)[0]
        >>> ctx, tgt = mb.build_batch(sample_task, spec)
        >>> tuple(ctx.shape), tuple(tgt.shape)
        ((4, 3, 1), (4, 5, 1))
    """
    _check_spec(spec)
    layout, raw = _fill(_tasks(sample_task, spec), spec)
    return _unflatten(layout, layout.tensors(raw))


def _check_spec(spec):
    if not isinstance(spec, BatchSpec):
        raise TypeError(f"the loader's sampler must yield metabatch.BatchSpec values, got {spec!r:.80}; "
                        f"pass the result of metabatch.batch_specs(...).")
    if not spec.indices:
        raise ValueError(f"step {spec.step}: the batch spec holds no task indices.")


class _BatchBuilder(torch.utils.data.Dataset):
    """A map-style dataset indexed by BatchSpec: item = one whole batch."""

    def __init__(self, sample_task, collate_fn=None):
        self.sample_task = sample_task
        self.collate_fn = collate_fn
        self._sender = None  # made lazily, inside each worker

    def __getstate__(self):
        return {**self.__dict__, "_sender": None}

    def __getitem__(self, spec):
        _check_spec(spec)
        outs = _tasks(self.sample_task, spec)
        if self.collate_fn is not None:
            return self.collate_fn(outs)
        if torch.utils.data.get_worker_info() is None:  # num_workers=0: the batch itself
            layout, raw = _fill(outs, spec)
            return _unflatten(layout, layout.tensors(raw))
        sender = self._sender
        if sender is None or sender.pid != os.getpid():  # (a forked copy is not this worker's)
            sender = self._sender = _Sender()
        got = []

        def alloc(nbytes):
            if nbytes < _INLINE_BYTES:  # small: a pipe copy beats mapping a segment
                got.append(bytearray(nbytes))
                return np.frombuffer(got[0], dtype=np.uint8)
            got[:] = sender.take(nbytes)
            return got[3]

        try:
            layout, _ = _fill(outs, spec, alloc)
        except BaseException:
            if len(got) == 4 and got[0] is not None:  # hand the pooled slot back
                sender.release(got[0])
            raise
        if len(got) == 1:
            return sender.message(layout, None, 0, got[0])
        slot, gen, tensor, _ = got
        return sender.message(layout, slot, gen, tensor if slot is None else None)


def _identity(x):
    return x


_SEEN = weakref.WeakKeyDictionary()  # DataLoader iterator -> tokens of the workers whose batches it yielded


def _seen_by(iterator) -> set:
    tokens = _SEEN.get(iterator)
    if tokens is None:
        tokens = _SEEN[iterator] = set()
        weakref.finalize(iterator, _forget, tokens)
    return tokens


class TaskDataLoader(torch.utils.data.DataLoader):
    """The ``DataLoader`` returned by :func:`task_loader`.

    It differs from its base in one way: iteration turns the one-buffer
    batches that workers send into the user's pytree of tensors (zero-copy
    views). ``loader.specs`` is the spec stream and ``loader.sample_task`` the
    task function.
    """

    def __iter__(self):
        iterator = super().__iter__()
        if self.num_workers == 0:
            yield from iterator
            return
        # What the main process holds of the workers (their pooled buffers stay mapped,
        # layouts received once) lives as long as the iterator that runs them.
        seen = _seen_by(iterator)
        for batch in iterator:
            if type(batch) is _Packed or type(batch) is _Lost:
                seen.add(batch.token)
                batch = batch.unpack()
            yield batch

    @property
    def specs(self):
        return self.sampler

    @property
    def sample_task(self):
        return self.dataset.sample_task


_NOT_OPTIONS = ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last")


def _start_method(context) -> str:
    if context is None:
        return multiprocessing.get_start_method(allow_none=False)
    if isinstance(context, str):
        return context
    return context.get_start_method()


def _check_loader_args(sample_task, num_workers, collate_fn, options) -> None:
    if not callable(sample_task):
        raise TypeError(f"task_loader(): sample_task must be callable, got {sample_task!r}.")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"task_loader(): num_workers must be an int >= 0, got {num_workers!r}.")
    bad = [k for k in _NOT_OPTIONS if k in options]
    if bad:
        raise TypeError(f"task_loader(): {', '.join(bad)} cannot be set here: batches come from the "
                        f"specs; set batch_size and shuffle in metabatch.batch_specs(...).")
    if num_workers == 0:
        return
    method = _start_method(options.get("multiprocessing_context"))
    if method == "fork":
        return
    for name, obj in (("sample_task", sample_task), ("collate_fn", collate_fn)):
        try:
            pickle.dumps(obj)
        except Exception as err:
            raise TypeError(
                f"task_loader(): {name}={obj!r} cannot be pickled ({err}), but '{method}' workers "
                f"receive it pickled. Define it at module level (def {name}(...) in an importable "
                f"module, not a lambda or a nested function), use functools.partial of such a "
                f"function for its settings, or use multiprocessing_context='fork' where the "
                f"platform has it.") from err


def task_loader(sample_task: Callable, specs: Iterable[BatchSpec], *, num_workers: int = 0,
                collate_fn: Callable | None = None, **dataloader_options: Any) -> TaskDataLoader:
    """A DataLoader whose workers build whole, stacked batches of tasks.

    Args:
        sample_task: ``sample_task(key, idx, n_ctx, n_tgt) -> pytree`` of tensors,
            numpy arrays or numbers. It must take all randomness from ``key``
            (e.g. :func:`metabatch.random.numpy_rng`) and, for ``spawn`` /
            ``forkserver`` workers, be picklable: a module-level function or a
            ``functools.partial`` of one.
        specs: the batch-spec stream, usually :func:`metabatch.batch_specs`.
        num_workers: worker processes; 0 builds batches in the calling process.
            The stream is identical for every value.
        collate_fn: optional ``collate_fn(list_of_task_outputs) -> batch``, run
            in the worker instead of the built-in stacking (as in metabatch 0.9.1).
        **dataloader_options: passed to ``torch.utils.data.DataLoader``:
            ``multiprocessing_context``, ``timeout``, ``pin_memory``,
            ``prefetch_factor``, ``persistent_workers``, ``worker_init_fn``...

    Returns:
        A :class:`TaskDataLoader` yielding one pytree per spec, every leaf a
        tensor with leading dimension ``len(spec.indices)``.

    Raises:
        TypeError: ``sample_task`` is not callable, or cannot be pickled for a
            ``spawn``/``forkserver`` worker; a batch option was passed.
        ValueError: ``num_workers < 0``.

    Examples:
        >>> import metabatch as mb
        >>> def sample_task(key, idx, n_ctx, n_tgt):
        ...     x = mb.random.numpy_rng(key).uniform(-5, 5, size=(n_ctx + n_tgt, 1))
        ...     return {"context": x[:n_ctx], "target": x[n_ctx:]}
        >>> specs = mb.batch_specs(seed=0, num_tasks=100, batch_size=8, n_ctx=(1, 5), n_tgt=10,
        ...                        num_batches=2)
        >>> for batch in mb.task_loader(sample_task, specs):
        ...     assert batch["target"].shape == (8, 10, 1)
    """
    _check_loader_args(sample_task, num_workers, collate_fn, dataloader_options)
    return TaskDataLoader(_BatchBuilder(sample_task, collate_fn), batch_size=None, sampler=specs,
                          num_workers=num_workers, collate_fn=_identity, **dataloader_options)
