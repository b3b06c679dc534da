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
pool and return to it when the batch's last view is garbage-collected.
"""

from __future__ import annotations

import math
import multiprocessing
import pickle
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


def _add_note(err: BaseException, note: str) -> None:
    if hasattr(err, "add_note"):
        err.add_note(note)
    else:  # Python 3.10: keep the context where tools can still find it
        err.__notes__ = getattr(err, "__notes__", []) + [note]


def _leaf_meta(leaf, i: int, treespec):
    """(torch dtype, shape) of leaf ``i`` of task 0's output."""
    if isinstance(leaf, torch.Tensor):
        return leaf.dtype, tuple(leaf.shape)
    if isinstance(leaf, (np.ndarray, np.generic)):
        dtype = _TORCH_DTYPE.get(leaf.dtype)
        if dtype is not None:
            return dtype, leaf.shape
        problem = f"a numpy array of dtype {leaf.dtype}, which torch cannot hold"
    elif isinstance(leaf, (bool, int, float)):
        return torch.tensor(leaf).dtype, ()
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
    """Where each stacked leaf of a batch lives inside one flat byte buffer."""

    __slots__ = ("treespec", "dtypes", "shapes", "offsets", "nbytes")

    def __init__(self, treespec, leaves, num_tasks: int):
        self.treespec = treespec
        self.dtypes, self.shapes = [], []
        for i, leaf in enumerate(leaves):
            dtype, shape = _leaf_meta(leaf, i, treespec)
            self.dtypes.append(dtype)
            self.shapes.append((num_tasks,) + shape)
        self.offsets, offset = [], 0
        for dtype, shape in zip(self.dtypes, self.shapes):
            offset = -(-offset // _ALIGN) * _ALIGN
            self.offsets.append(offset)
            offset += math.prod(shape) * dtype.itemsize
        self.nbytes = offset

    def views(self, buf: torch.Tensor) -> list:
        """The stacked leaves as zero-copy tensor views of ``buf`` (a flat uint8 tensor).

        Views are cut through numpy (1.5 µs a leaf against 5 µs for
        ``buf[a:b].view(dtype).view(shape)``), so that every view keeps one
        numpy array alive: the handle whose death frees a pooled buffer.
        """
        if buf.device.type != "cpu" or buf.is_pinned():
            return [buf[off:off + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                    for off, dtype, shape in zip(self.offsets, self.dtypes, self.shapes)]
        return self._numpy_views(buf.numpy())

    def _numpy_views(self, raw: np.ndarray) -> list:
        out = []
        for off, dtype, shape in zip(self.offsets, self.dtypes, self.shapes):
            chunk = raw[off:off + math.prod(shape) * dtype.itemsize]
            np_dtype = _NUMPY_DTYPE.get(dtype)
            if np_dtype is not None:
                out.append(torch.from_numpy(chunk.view(np_dtype).reshape(shape)))
            else:  # e.g. bfloat16: reinterpret in torch, still a view of ``raw``
                out.append(torch.from_numpy(chunk).view(dtype).view(shape))
        return out


def _torch_dtype(leaf):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        return torch.tensor(leaf).dtype
    return _TORCH_DTYPE.get(dtype, dtype) if isinstance(dtype, np.dtype) else dtype


def _diagnose(spec, outs) -> ValueError:
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
    return ValueError(f"could not stack the task outputs of step {getattr(spec, 'step', '?')}; "
                      f"every task of a batch must return arrays of one shape and dtype per leaf.")


_POOL_SLOTS = 8  # reusable shared-memory buffers per worker
_FREE, _BUSY = 0, 1


class _SharedPool:
    """A worker's reusable shared-memory buffers.

    Allocating and first touching a fresh shared-memory segment costs
    milliseconds for a batch of images (``benchmarks/loader.py``); a pooled
    buffer is mapped once in each process and reused. The worker marks a slot
    busy when it sends it; the main process marks it free again when the last
    view of that batch dies. When every slot is busy (the user keeps many
    batches alive) the worker falls back to a one-off segment.
    """

    def __init__(self):
        self.flags = torch.zeros(_POOL_SLOTS, dtype=torch.uint8).share_memory_()
        self.bufs = [None] * _POOL_SLOTS

    def take(self, nbytes: int):
        """(slot or None, a shared uint8 buffer of at least ``nbytes``)."""
        flags = self.flags.numpy()
        free = [s for s in range(_POOL_SLOTS) if flags[s] == _FREE]
        if not free:
            return None, torch.empty(nbytes, dtype=torch.uint8).share_memory_()
        fits = [s for s in free if self.bufs[s] is not None and self.bufs[s].numel() >= nbytes]
        slot = fits[0] if fits else free[0]
        if not fits:  # headroom: n_ctx / n_tgt vary from batch to batch
            self.bufs[slot] = torch.empty(nbytes + nbytes // 4, dtype=torch.uint8).share_memory_()
        flags[slot] = _BUSY
        return slot, self.bufs[slot]


def _release(flags: torch.Tensor, slot: int) -> None:
    flags[slot] = _FREE


class _Packed:
    """One batch as a flat buffer plus its layout; unpacked in the main process.

    ``lease`` is ``(flags, slot)`` when ``buf`` is a pooled buffer that must be
    handed back to its worker once the batch's views are gone.
    """

    __slots__ = ("buf", "layout", "lease")

    def __init__(self, buf, layout, lease=None):
        self.buf, self.layout, self.lease = buf, layout, lease

    def pin_memory(self, device=None):  # called by DataLoader's pin-memory thread
        buf = torch.from_numpy(self.buf) if isinstance(self.buf, np.ndarray) else self.buf
        pinned = buf.pin_memory() if device is None else buf.pin_memory(device)
        if self.lease is not None:  # copied out: the worker may reuse its buffer
            _release(*self.lease)
        return _Packed(pinned, self.layout)

    def unpack(self):
        if isinstance(self.buf, np.ndarray):
            return optree.tree_unflatten(self.layout.treespec, self.layout._numpy_views(self.buf))
        if self.lease is None:
            return optree.tree_unflatten(self.layout.treespec, self.layout.views(self.buf))
        raw = self.buf.numpy()  # a fresh handle: every view of this batch keeps it alive
        weakref.finalize(raw, _release, *self.lease)
        return optree.tree_unflatten(self.layout.treespec, self.layout._numpy_views(raw))


def _plain(nbytes: int):
    return None, torch.empty(nbytes, dtype=torch.uint8)


def _fill(outs: list, spec, alloc=_plain):
    """Stack task outputs into one flat uint8 buffer. Returns (buf, layout, views, slot).

    One C-level flatten of the whole list, one structure comparison, then per
    leaf one ``concatenate``/``stack`` writing straight into its place in the
    buffer (``out=``). ``alloc(nbytes) -> (slot, buf)`` provides the buffer.
    """
    all_leaves, all_spec = optree.tree_flatten(outs)
    treespec = optree.tree_structure(outs[0])
    n, width = len(outs), treespec.num_leaves
    if all_spec != optree.treespec_list([treespec] * n):
        raise _diagnose(spec, outs)
    columns = [all_leaves[i::width] for i in range(width)]
    layout = _Layout(treespec, all_leaves[:width], n)
    slot, buf = alloc(layout.nbytes)
    views = layout.views(buf)
    try:
        for column, view, shape, dtype in zip(columns, views, layout.shapes, layout.dtypes):
            first = column[0]
            if isinstance(first, torch.Tensor):
                if any(leaf.dtype != dtype for leaf in column):
                    raise TypeError("dtype")
                torch.stack(column, out=view)
            elif isinstance(first, np.ndarray) and first.ndim:
                if len({a.shape for a in column}) != 1:  # concatenate alone would not see it
                    raise ValueError("shape")
                np.concatenate(column, out=view.numpy().reshape((-1,) + shape[2:]), casting="no")
            else:
                exact = isinstance(first, (np.ndarray, np.generic))
                np.stack(column, out=view.numpy(), casting="no" if exact else "same_kind")
    except (ValueError, TypeError, RuntimeError, AttributeError) as err:
        raise _diagnose(spec, outs) from err
    return buf, layout, views, slot


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
    _, layout, views, _ = _fill(list(outputs), None)
    return optree.tree_unflatten(layout.treespec, views)


def _tasks(sample_task, spec: BatchSpec) -> list:
    """The outputs of the tasks of one spec, errors annotated with step, index and key."""
    outs = []
    for j, idx in enumerate(spec.indices):
        k = _random.fold_in(spec.key, spec.offset + j)
        try:
            outs.append(sample_task(k, idx, spec.n_ctx, spec.n_tgt))
        except Exception as err:
            _add_note(err, f"metabatch: raised by sample_task at step {spec.step}, task {spec.offset + j} "
                           f"of the batch (index {idx}), key {k!r}, n_ctx={spec.n_ctx}, n_tgt={spec.n_tgt}; "
                           f"rerun it alone with sample_task(metabatch.random.Key._from_words"
                           f"{_random.key_data(k)}, {idx}, {spec.n_ctx}, {spec.n_tgt}).")
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
    _, layout, views, _ = _fill(_tasks(sample_task, spec), spec)
    return optree.tree_unflatten(layout.treespec, views)


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
        self._pool = None  # made lazily, inside each worker

    def __getstate__(self):
        return {**self.__dict__, "_pool": None}

    def _alloc(self, nbytes: int):
        if nbytes < _INLINE_BYTES:  # small: inline bytes beat mapping a segment
            return _plain(nbytes)
        if self._pool is None:
            self._pool = _SharedPool()
        return self._pool.take(nbytes)

    def __getitem__(self, spec):
        _check_spec(spec)
        outs = _tasks(self.sample_task, spec)
        if self.collate_fn is not None:
            return self.collate_fn(outs)
        if torch.utils.data.get_worker_info() is None:
            _, layout, views, _ = _fill(outs, spec)
            return optree.tree_unflatten(layout.treespec, views)
        buf, layout, _, slot = _fill(outs, spec, self._alloc)
        if buf.numel() < _INLINE_BYTES:
            return _Packed(buf.numpy(), layout)
        return _Packed(buf, layout, None if slot is None else (self._pool.flags, slot))


def _identity(x):
    return x


def _unpack(batch):
    return batch.unpack() if isinstance(batch, _Packed) else batch


class TaskDataLoader(torch.utils.data.DataLoader):
    """The ``DataLoader`` returned by :func:`task_loader`.

    It differs from its base in one way: iteration turns the one-buffer
    batches that workers send into the user's pytree of tensors (zero-copy
    views). ``loader.specs`` is the spec stream and ``loader.sample_task`` the
    task function.
    """

    def __iter__(self):
        # Holding each pooled buffer (and its flags) here keeps it mapped in this
        # process: torch's shared-storage cache then maps it once, not per batch.
        held = {}
        for batch in super().__iter__():
            if isinstance(batch, _Packed) and batch.lease is not None:
                flags, slot = batch.lease
                held[flags.data_ptr(), slot] = (flags, batch.buf)
            yield _unpack(batch)

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
